"""Tune's saved state is restored only as tlctl recorded it (jobs.search.state).

Storage is a local directory laid out as `<run>/tune/`; the staging directory stands in for
the one Tune saves into before its upload. The generator is Tune's own BasicVariantGenerator
(through tlctl's subclass), saving for real. The whole path (a real search interrupted,
its state changed, the resubmit refused) is in tests/e2e/test_search.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from jobs.errors import EXIT_INVALID, TlctlError
from jobs.search import state
from jobs.storage.layout import TUNE_MANIFEST, TUNER_STATE, RunLayout
from jobs.storage.location import Location, resolve


@pytest.fixture
def tune(tmp_path: Path) -> Location:
    loc = RunLayout(resolve(str(tmp_path / "runs")).join("r1")).tune
    Path(loc.path).mkdir(parents=True)
    Path(loc.path, TUNER_STATE).write_bytes(b"tuner state")
    return loc


def _recorder(tune: Location) -> state.StateRecorder:
    return state.StateRecorder(str(Path(tune.path).parent), None, "r1")


def _save(staging: Path, tune: Location, recorder: state.StateRecorder, **files: bytes) -> None:
    """What one Tune save does: write into staging, record, then upload."""
    staging.mkdir(exist_ok=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    recorder.record(str(staging))
    for name in files:
        Path(tune.path, name).write_bytes((staging / name).read_bytes())


def _refusal(tune: Location, run: str = "r1") -> str:
    with pytest.raises(TlctlError) as info:
        state.verify(tune, run)
    assert info.value.exit_code == EXIT_INVALID
    return info.value.message


def test_state_tlctl_saved_is_restored_and_any_change_is_refused(tune, tmp_path) -> None:
    state.start(tune, "r1")
    recorder = _recorder(tune)
    staging = tmp_path / "staging"
    _save(staging, tune, recorder, **{"experiment_state-a.json": b"v1"})
    state.verify(tune, "r1")

    Path(tune.path, "experiment_state-a.json").write_bytes(b"v1 + payload")
    message = _refusal(tune)
    assert "experiment_state-a.json" in message and "is not one tlctl saved" in message

    Path(tune.path, "experiment_state-a.json").write_bytes(b"v1")
    Path(tune.path, "callback-states-a.pkl").write_bytes(b"foreign pickle")
    assert "callback-states-a.pkl: this Ray Tune state file was not written" in _refusal(tune)

    Path(tune.path, "callback-states-a.pkl").unlink()
    Path(tune.path, TUNER_STATE).write_bytes(b"another tuner")
    assert TUNER_STATE in _refusal(tune)


def test_an_upload_behind_the_manifest_is_accepted(tune, tmp_path) -> None:
    """The manifest is written before Tune uploads: storage may still hold older files."""
    state.start(tune, "r1")
    recorder = _recorder(tune)
    staging = tmp_path / "staging"
    _save(staging, tune, recorder, **{"experiment_state-a.json": b"v1"})
    (staging / "experiment_state-a.json").write_bytes(b"v2")
    recorder.record(str(staging))  # killed before the upload of v2
    state.verify(tune, "r1")
    Path(tune.path, "experiment_state-a.json").write_bytes(b"v2")
    state.verify(tune, "r1")


def test_history_is_bounded_and_survives_pickling_and_a_new_process(tune, tmp_path) -> None:
    state.start(tune, "r1")
    recorder = _recorder(tune)
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(state.HISTORY + 5):
        (staging / "experiment_state-a.json").write_bytes(f"v{i}".encode())
        recorder.record(str(staging))
    # Tune pickles the search algorithm with its recorder; the copy reads the history back.
    again = pickle.loads(pickle.dumps(recorder))
    assert again.__getstate__() == {"run_uri": recorder.run_uri, "endpoint": None, "run": "r1"}
    (staging / "experiment_state-b.json").write_bytes(b"resumed session")
    again.record(str(staging))
    body = state._read(tune)
    assert body is not None
    assert len(body["files"]["experiment_state-a.json"]) == state.HISTORY
    assert body["files"][TUNER_STATE]  # kept from start(), never in staging
    Path(tune.path, "experiment_state-a.json").write_bytes(b"v4")  # dropped from the history
    assert "is not one tlctl saved" in _refusal(tune)
    Path(tune.path, "experiment_state-a.json").write_bytes(f"v{state.HISTORY + 4}".encode())
    Path(tune.path, "experiment_state-b.json").write_bytes(b"resumed session")
    state.verify(tune, "r1")


def test_state_without_a_manifest_or_for_another_run_is_refused(tune) -> None:
    assert f"without tlctl's manifest ({TUNE_MANIFEST})" in _refusal(tune)
    state.start(tune, "other")
    assert "saved for run 'other', not 'r1'" in _refusal(tune)
    Path(tune.path, TUNE_MANIFEST).write_text("[1, 2]")
    assert "not a tlctl Tune state manifest" in _refusal(tune)


def test_start_replaces_a_manifest_left_by_an_earlier_search(tune, tmp_path) -> None:
    state.start(tune, "r1")
    recorder = _recorder(tune)
    _save(tmp_path / "staging", tune, recorder, **{"experiment_state-a.json": b"old"})
    Path(tune.path, "experiment_state-a.json").unlink()
    state.start(tune, "r1")
    Path(tune.path, "experiment_state-a.json").write_bytes(b"old")
    assert "was not written by tlctl" in _refusal(tune)


def test_a_failing_manifest_write_does_not_stop_tunes_save(tune, tmp_path, caplog) -> None:
    Path(tune.path, TUNE_MANIFEST).mkdir()  # the write cannot replace a directory
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "experiment_state-a.json").write_bytes(b"v1")
    _recorder(tune).record(str(staging))
    assert "could not record Tune's state manifest" in caplog.text


def test_tunes_generator_records_each_save(tune, tmp_path) -> None:
    from jobs.search.algorithms import RecordedVariantGenerator

    state.start(tune, "r1")
    generator = RecordedVariantGenerator(_recorder(tune), max_concurrent=1, random_state=0)
    staging = tmp_path / "staging"
    staging.mkdir()
    generator.save_to_dir(str(staging), session_str="s1")
    saved = staging / "basic-variant-state-s1.json"
    assert saved.exists()
    Path(tune.path, saved.name).write_bytes(saved.read_bytes())
    state.verify(tune, "r1")
    # Tune restores the generator's state from that file, recorder included.
    restored = RecordedVariantGenerator(_recorder(tune), max_concurrent=1)
    restored.restore_from_dir(str(staging))
    assert isinstance(restored.recorder, state.StateRecorder)
