"""Process settings for Ray and Tune, set in one place when a driver starts.

Ray and Tune read these from the environment when they start their components, so they are
set before Ray is initialized: by the CLI for every command, and by a cluster job's
entrypoint. Each is a default (`setdefault`): a user's own setting wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULTS = {
    # No usage reports from offline machines, CI or users' jobs.
    "RAY_USAGE_STATS_ENABLED": "0",
    # Identical lines from many workers once, not once per worker (--verbose output).
    "RAY_DEDUP_LOGS": "1",
    # A search starts a few actors per trial at once (Tune's, Train's controller and
    # workers); past 4x this many starting, the raylet warns on the console, as is normal here.
    "RAY_worker_maximum_startup_concurrency": "16",
    # Tune saves its experiment state every 5 s (default: adaptive, minutes apart), so an
    # interrupted search resumes with all but the last seconds of its trials' progress.
    "TUNE_GLOBAL_CHECKPOINT_S": "5",
    # With verbose=0, no Tune console output at all (the new output engine prints anyway).
    "RAY_AIR_NEW_OUTPUT": "0",
}


def apply_process_settings() -> None:
    """Ray's and Tune's environment defaults for this process (and the Ray it starts)."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)


def token_source() -> str | None:
    """Where Ray would read its auth token from (a description, never the value)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def enable_token_auth() -> None:
    """Before talking to a cluster: Ray's token auth on when a token is available and
    RAY_AUTH_MODE is unset, as `ray start` does (Ray 2.60 refuses tokenless clients)."""
    if os.environ.get("RAY_AUTH_MODE") is not None or not token_source():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray._raylet" in sys.modules:
        # Ray read its config when it was imported (a test session, a notebook): re-read it.
        from ray._raylet import Config

        Config.initialize("")
