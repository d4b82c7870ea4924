import os

import pytest
import torch

from generator.launch import STATIC_MATMUL_ENV

# Tests use tiny tensors: one thread avoids oversubscribing the 2-core CI machine (with 2 threads a
# tiny forward was 10-30x slower there under load) and keeps timings steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (library code never seeds globally), and the cuBLAS
    variables a sampling command sets in its process (``prefer_static_matmul_schedules``) end with the test."""
    torch.manual_seed(0)
    saved = {name: os.environ.get(name) for name in STATIC_MATMUL_ENV}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
