"""SigintWatch: a SIGINT is noticed even when the KeyboardInterrupt for it was lost."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobs.driver.interrupts import SigintWatch


def _sigint_swallowed() -> None:
    """A SIGINT whose KeyboardInterrupt some library catches and drops."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here
    except KeyboardInterrupt:
        pass


def test_a_swallowed_interrupt_is_raised_at_the_next_check() -> None:
    with SigintWatch() as watch:
        assert watch.active
        watch.check()  # nothing arrived yet
        _sigint_swallowed()
        with pytest.raises(KeyboardInterrupt):
            watch.check()
        watch.check()  # reported once


def test_a_handler_that_drops_sigint_does_not_hide_it() -> None:
    previous = signal.getsignal(signal.SIGINT)
    with SigintWatch() as watch:
        signal.signal(signal.SIGINT, lambda *_: None)  # e.g. a library's own handler
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        with pytest.raises(KeyboardInterrupt):
            watch.check()
    assert signal.getsignal(signal.SIGINT) is previous


def test_other_signals_are_not_taken_for_ctrl_c() -> None:
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        with SigintWatch() as watch:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.1)
            watch.check()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_the_previous_wakeup_fd_and_handler_come_back() -> None:
    read, write = os.pipe()
    os.set_blocking(write, False)
    old_fd = signal.set_wakeup_fd(write)
    try:
        before = signal.getsignal(signal.SIGINT)
        with SigintWatch():
            pass
        assert signal.set_wakeup_fd(write) == write
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.set_wakeup_fd(old_fd)
        os.close(read)
        os.close(write)


def test_an_ignored_sigint_stays_ignored() -> None:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with SigintWatch() as watch:
            assert not watch.active
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            watch.check()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
