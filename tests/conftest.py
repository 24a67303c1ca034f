"""Shared test settings: one CPU thread, a deterministic Hypothesis profile, GPU tests skipped without CUDA."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")   # tiny models: a second thread only adds contention (and subprocesses inherit this)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings

settings.register_profile("ci", derandomize=True, max_examples=50, deadline=None)
settings.load_profile("ci")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """One model cache per test session: the tiny teacher and student are trained once and shared."""
    return str(tmp_path_factory.mktemp("model_cache"))
