"""Shared fixtures: tiny configs, real-data paths (skipped when absent), --runslow."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/data beside the checkout; MEDIVAE_SHARED_DATA names it for a checkout elsewhere (a git worktree)
SHARED_DATA = Path(os.environ.get("MEDIVAE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def normal_run(tmp_path_factory):
    """A tiny anomaly run on lesion phantoms through the CLI (normal = lesion-free): the plumbing, not the
    quality. One per test module, so a module's scoring never meets another's results.json."""
    from medivae.cli import main

    from tiny import TINY

    run = tmp_path_factory.mktemp("anomaly") / "run"
    argv = ["anomaly", "fit", "--data", "phantoms:200", "--normal-label", "normal", "--out", str(run)]
    assert main([*argv, "--epochs", "1", "--seed", "7", *TINY]) == 0
    return run


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory) -> Path:
    """A tiny run trained and evaluated through the CLI, shared by the whole session. Read it, never write into
    it: copy it first (shutil.copytree) to change it."""
    from medivae.cli import main

    from tiny import TINY_EVALUATE, TINY_TRAIN

    run = tmp_path_factory.mktemp("evaluated") / "run"
    assert main([*TINY_TRAIN, "--out", str(run)]) == 0
    assert main(["evaluate", str(run), *TINY_EVALUATE]) == 0
    return run


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture
def pneumonia_npz(shared_data) -> Path:
    p = shared_data / "pneumoniamnist.npz"
    if not p.exists():
        pytest.skip("pneumoniamnist.npz is absent")
    return p


@pytest.fixture
def mednist_sample(shared_data) -> Path:
    p = shared_data / "mednist" / "sample"
    if not p.is_dir():
        pytest.skip("mednist/sample is absent")
    return p


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Keep the decoded-data cache of the test session out of the user's ~/.cache."""
    old = os.environ.get("MEDIVAE_CACHE")
    os.environ["MEDIVAE_CACHE"] = str(tmp_path_factory.mktemp("medivae-cache"))
    yield
    if old is None:
        os.environ.pop("MEDIVAE_CACHE", None)
    else:
        os.environ["MEDIVAE_CACHE"] = old
