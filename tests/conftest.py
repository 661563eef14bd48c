"""Shared pytest set-up: GPU-only tests skip (visibly) on hosts without CUDA; tiny checkpoints."""

import pytest
import torch

from tests.fixtures.tiny_models import save_sharded, tiny_model


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (docs/gpu_bench.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """tiny_checkpoints(name) -> (model class, directory of its bf16 sharded checkpoint, inputs)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model, inputs = tiny_model(name, torch.bfloat16)
            directory = save_sharded(model, tmp_path_factory.mktemp(name))
            cache[name] = (type(model), directory, inputs)
        return cache[name]

    return get
