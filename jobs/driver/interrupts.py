"""Ctrl-C that always reaches the driver, even when Ray swallows the KeyboardInterrupt.

The driver's main thread waits in `ray.get` (the progress queue) while training runs in a
thread. Ray runs Python's signal handlers itself while it waits, and the KeyboardInterrupt
raised there does not always come out of the call. So the driver also watches for SIGINT
itself: Python's C-level handler writes each caught signal's number to the wakeup fd as it
arrives, before any Python code runs and whatever happens to the exception; the driver's
loop reads that pipe between waits and raises KeyboardInterrupt on its own.
"""

from __future__ import annotations

import os
import signal
import threading
from types import TracebackType


class SigintWatch:
    """`with SigintWatch() as watch: ... watch.check()` raises KeyboardInterrupt once a
    SIGINT has arrived while the block ran, even if the KeyboardInterrupt Python raised for
    it was swallowed on the way.

    Only in the main thread (the only one that can set signals up), and not when SIGINT is
    ignored (a background job of a non-interactive shell, `nohup`). The previous wakeup fd
    and handler come back on exit.
    """

    def __init__(self) -> None:
        self.active = False
        self._read = self._write = -1
        self._prev_fd = -1
        self._prev_handler: object = None

    def __enter__(self) -> SigintWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        handler = signal.getsignal(signal.SIGINT)
        if handler is signal.SIG_IGN:
            return self
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._prev_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._prev_handler = handler
        if not callable(handler):  # SIG_DFL: the fd is only written for Python handlers
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.active = True
        return self

    def check(self) -> None:
        """Raise KeyboardInterrupt if a SIGINT has arrived since the last check."""
        if not self.active:
            return
        try:
            seen = os.read(self._read, 4096)
        except BlockingIOError:
            return
        if signal.SIGINT in seen:
            raise KeyboardInterrupt

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.active:
            return
        self.active = False
        signal.set_wakeup_fd(self._prev_fd)
        if self._prev_handler is not None:
            signal.signal(signal.SIGINT, self._prev_handler)  # type: ignore[arg-type]
        os.close(self._read)
        os.close(self._write)
