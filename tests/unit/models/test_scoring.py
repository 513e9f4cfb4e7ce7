"""How the scorer pool is sized from what Ray offers (jobs.models.scoring.pool_shape)."""

from __future__ import annotations

from jobs.models.scoring import pool_shape


def test_one_actor_per_cpu_without_gpus() -> None:
    assert pool_shape({"CPU": 2.0, "memory": 1e9}) == (2, 0.0)
    assert pool_shape({"CPU": 16.0, "GPU": 0.0}) == (16, 0.0)


def test_one_actor_per_gpu_where_there_are_gpus() -> None:
    assert pool_shape({"CPU": 16.0, "GPU": 1.0}) == (1, 1.0)
    assert pool_shape({"CPU": 64.0, "GPU": 8.0}) == (8, 1.0)


def test_a_fraction_of_a_gpu_is_not_asked_for_and_nothing_is_still_one_actor() -> None:
    assert pool_shape({"CPU": 4.0, "GPU": 0.5}) == (4, 0.0)
    assert pool_shape({}) == (1, 0.0)
