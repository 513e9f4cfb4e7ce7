"""`backbone.weights` entries that are not plausible weights files are refused unread."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from jobs.errors import TlctlError
from jobs.training import model as models


def _feed_fifo_if_opened(path: Path, stop: threading.Event) -> threading.Thread:
    """Writes garbage into the FIFO if anything opens it for reading, so that code which
    does (the old behaviour) fails on bad bytes instead of blocking the test forever."""

    def feed() -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader yet
                time.sleep(0.05)
                continue
            os.write(fd, b"not weights")
            os.close(fd)
            return

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    stop = threading.Event()
    feeder = _feed_fifo_if_opened(fifo, stop)
    try:
        with pytest.raises(TlctlError) as info:
            models.build_model("resnet18", 2, weights=str(fifo))
    finally:
        stop.set()
        feeder.join(timeout=5)
    assert info.value.exit_code == 2
    assert info.value.message.startswith(f"backbone.weights: {fifo} is not a regular file;")


def test_a_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "w.pth"
    os.symlink("/dev/null", link)  # a device (/dev/zero, read whole, would never end)
    with pytest.raises(TlctlError, match=r"w.pth is not a regular file; it was not read"):
        models.build_model("resnet18", 2, weights=str(link))
    run = tmp_path / "run" / "model"
    run.mkdir(parents=True)
    os.symlink("/dev/null", run / "model.pt")  # found inside a run prefix: the same
    with pytest.raises(TlctlError, match=r"model/model.pt is not a regular file"):
        models.build_model("resnet18", 2, weights=str(tmp_path / "run"), load_bytes=models.read_uri)


def test_a_file_over_the_cap_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "huge.pt"
    with open(big, "wb") as f:  # sparse: the size is real, the disk blocks are not
        f.truncate(models.MAX_WEIGHTS_BYTES + 1)
    for reader in (None, models.read_uri):
        with pytest.raises(TlctlError) as info:
            models.build_model("resnet18", 2, weights=str(big), load_bytes=reader)
        assert info.value.message.startswith(
            f"backbone.weights: {big} is {models.MAX_WEIGHTS_BYTES + 1:,} bytes, over the "
            f"{models.MAX_WEIGHTS_BYTES:,}-byte limit"
        )
    source = models.build_model("resnet18", 3).state_dict()  # a real one still loads
    torch.save(source, tmp_path / "model.pt")
    for reader in (None, models.read_uri):
        model = models.build_model("resnet18", 2, weights=str(tmp_path), load_bytes=reader)
        assert torch.equal(model.state_dict()["conv1.weight"], source["conv1.weight"])
