from __future__ import annotations

import pytest
import torch

from harness.local import RankPool


@pytest.fixture(scope="session")
def ranks():
    """Eight long-lived gloo rank processes shared by the whole session."""
    pool = RankPool(8, strict=True)
    yield pool
    pool.close()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
