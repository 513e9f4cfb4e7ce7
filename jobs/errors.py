"""The one exception type of tlctl.

It lives in `jobs` (not `orchestrator`) because cluster-side code raises it too and
`jobs` must not import the client side. The CLI turns it into a message and an exit code.
"""

from __future__ import annotations

EXIT_FAILED = 1  # the job ran and failed
EXIT_INVALID = 2  # bad input: spec, data, storage, cluster address


class TlctlError(Exception):
    """A failure the user can act on: `message` is shown as is, `exit_code` is returned."""

    def __init__(self, message: str, *, exit_code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message
