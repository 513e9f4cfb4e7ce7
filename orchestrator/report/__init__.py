"""`tlctl report`: a run as PNG plots, a CSV and one self-contained HTML page.

A search gets its trials compared (report.search), a plain run its training story
(report.run). Reads storage only; no Ray, no torch. matplotlib is imported inside the
functions that draw, so the rest of the CLI stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.report.page import prepare_out_dir
from orchestrator.report.run import run_context, write_run_report
from orchestrator.report.search import search_context, write_search_report
from orchestrator.runs import locate_run


def build_report(storage: str, endpoint: str | None, name: str, out_dir: Path) -> dict[str, Any]:
    """Write the report of run `name` to `out_dir`; returns the files written and a summary.

    Storage is read (and bad input refused) before `out_dir` is created."""
    run = locate_run(storage, endpoint, name)
    spec = run.read_spec()
    if spec.search:
        return write_search_report(search_context(run, spec), prepare_out_dir(Path(out_dir)))
    return write_run_report(run_context(run, spec), prepare_out_dir(Path(out_dir)))
