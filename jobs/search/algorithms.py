"""The search algorithms tlctl gives Tune: Tune's own, recording each save of Tune's state.

Tune saves its experiment state by calling the search algorithm's `save_to_dir` on the
driver, after it has written the experiment state file and before the upload; the
subclasses here add one step, `StateRecorder.record` (jobs.search.state). They are module
level because Tune pickles the search algorithm into `tuner.pkl` by reference.
"""

from __future__ import annotations

from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.basic_variant import BasicVariantGenerator

from jobs.errors import TlctlError
from jobs.search.state import StateRecorder
from jobs.spec.search import SearchSpec


class _RecordsState:
    recorder: StateRecorder

    def save_to_dir(self, dirpath: str, session_str: str):
        saved = super().save_to_dir(dirpath, session_str)  # type: ignore[misc]
        self.recorder.record(dirpath)
        return saved


class RecordedVariantGenerator(_RecordsState, BasicVariantGenerator):
    """Tune's random/grid generator."""

    def __init__(self, recorder: StateRecorder, **kwargs) -> None:
        super().__init__(**kwargs)
        self.recorder = recorder


class RecordedSearchGenerator(_RecordsState, SearchGenerator):
    """The wrapper Tune would put around a Searcher (Optuna) itself."""

    def __init__(self, searcher, recorder: StateRecorder) -> None:
        super().__init__(searcher)
        self.recorder = recorder


def search_algorithm(search: SearchSpec, *, seed: int, concurrency: int, recorder: StateRecorder):
    """The searcher, seeded with train.seed: the same spec samples the same trials."""
    if search.search_alg != "optuna":
        return RecordedVariantGenerator(recorder, max_concurrent=concurrency, random_state=seed)
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as exc:
        raise TlctlError(
            f"search.search_alg: optuna is not installed ({exc}); pip install 'tlctl[optuna]' "
            "(valid without it: random, grid)"
        ) from exc
    limited = ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrency)
    return RecordedSearchGenerator(limited, recorder)
