"""Shared fixtures: one Ray instance and one generated data set for the whole test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mardct-sample"


@pytest.fixture(scope="session")
def mardct_sample() -> Path:
    """The real MarDCT sample in its raw layout; tests that use it skip where it is absent."""
    if not (SAMPLE / "sc5").is_dir():
        pytest.skip(f"real MarDCT sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every test that needs Ray (4 logical CPUs)."""
    import ray

    from boatray.cluster import start_ray

    start_ray("local", num_cpus=4, num_gpus=0, log_to_driver=False)
    yield ray
    ray.shutdown()
