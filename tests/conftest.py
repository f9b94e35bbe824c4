"""Shared fixtures: an offline environment, the tiny model zoo, one Prefect test harness per session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Offline and quiet before anything imports huggingface_hub or prefect (both read these at import).
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ipaflow-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["HF_HUB_CACHE"] = str(_SESSION_TMP / "hf-cache")
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    """The session's zoo, HF cache, Prefect home and inputs go with it."""
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The tiny model zoo, built once per session, also registered in the (fake, offline) HF cache so
    that the guide's code with bare hub ids loads it unchanged."""
    from ipaflow.tasks.zoo import build_zoo, link_into_hf_cache

    root = _SESSION_TMP / "zoo"
    build_zoo(root)
    link_into_hf_cache(root, Path(os.environ["HF_HUB_CACHE"]))
    return root


@pytest.fixture(scope="session")
def models_env(zoo_dir):
    """Specs resolve hub ids to the zoo, as `--models` / IPAFLOW_MODELS does for users."""
    os.environ["IPAFLOW_MODELS"] = str(zoo_dir)
    return zoo_dir


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect API for the whole session (a real server subprocess behind the test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def inputs_dir() -> Path:
    """The demo's synthetic input images (diner, bear, gummy, face, mask, depth, style/img0..3)."""
    from ipaflow.flows.demo import draw_inputs

    root = _SESSION_TMP / "inputs"
    for name, image in draw_inputs().items():
        path = root / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return root


@pytest.fixture(scope="module")
def moto():
    """moto's S3 server on loopback (``tests/s3.py``), one per test module."""
    from s3 import MotoS3

    server = MotoS3()
    yield server
    server.close()
