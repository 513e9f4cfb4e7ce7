"""The one exception type of tlctl, and the cause of a failure in one line.

It lives in `jobs` (not `orchestrator`) because cluster-side code raises it too and
`jobs` must not import the client side. The CLI turns it into a message and an exit code.
Storage failures are typed subclasses (jobs.storage.errors).
"""

from __future__ import annotations

import re
import traceback

EXIT_FAILED = 1  # the job ran and failed
EXIT_INVALID = 2  # bad input: spec, data, storage, cluster address
# Ray Data wraps a decode task's error in its own; this marker finds the file again.
CORRUPT_MARKER = "tlctl: corrupt image"


class TlctlError(Exception):
    """A failure the user can act on: `message` is shown as is, `exit_code` is returned."""

    def __init__(self, message: str, *, exit_code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


def error_text(exc: BaseException, depth: int = 0) -> str:
    """All the text of a Ray error: its traceback, causes and each worker's failure."""
    if depth > 5:
        return ""
    parts = ["".join(traceback.format_exception(exc))]
    for inner in (getattr(exc, "worker_failures", None) or {}).values():
        parts.append(error_text(inner, depth + 1))
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        parts.append(error_text(controller, depth + 1))
    return "\n".join(parts)


def root_cause(exc: BaseException) -> str:
    """The last `SomeError: message` line of a Ray error, not the whole traceback dump."""
    text = error_text(exc)
    corrupt = corrupt_image_message(text)
    if corrupt:
        return corrupt
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b.*:", line):
            return line
    return lines[-1] if lines else type(exc).__name__


def corrupt_image_message(text: str) -> str | None:
    """`data: corrupt image <file>: <why>` out of a (wrapped) Ray error text, if it is one."""
    for line in text.splitlines():
        if CORRUPT_MARKER in line:
            return (
                "data: corrupt image "
                + line[line.index(CORRUPT_MARKER) + len(CORRUPT_MARKER) :].strip()
            )
    return None
