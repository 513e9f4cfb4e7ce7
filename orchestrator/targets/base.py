"""The interface both targets implement: how a submit is asked for, and what a target does
with a validated spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from jobs.spec.model import JobSpec


@dataclass(frozen=True)
class SubmitOptions:
    """How to submit, beside the spec (the cluster-only ones are ignored by --local)."""

    submitted_at: float
    verbose: bool = False
    json_out: bool = False
    wait: bool = False
    pass_credentials: bool = False
    pip: tuple[str, ...] = ()
    driver_cpus: float = 0.0
    driver_memory_mb: int = 0


class Target(Protocol):
    """Runs a validated spec; `local` says which defaults the spec resolves with."""

    local: bool

    def submit(self, spec: JobSpec, options: SubmitOptions) -> int:
        """Pre-flight and run (or submit) the job; returns the process's exit code."""
        ...
