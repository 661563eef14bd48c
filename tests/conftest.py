"""Shared pytest set-up: GPU-only tests skip (visibly) on hosts without CUDA."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (docs/gpu_bench.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
