"""Real-size structure of every catalogue model (issue #17), fast enough for CI.

For each model, tools/replica writes a sparse replica (real configs, real checkpoint names,
shapes, dtypes, shard split and index files; data as file holes, so no disk and no reads), and
the engine's loader loads every component under disk offload (meta-device build, headers only,
no weight read): no missing, unexpected or mis-shaped key, and the replica's bytes equal the
sizes stored in models.json.
"""

from __future__ import annotations

import json

import pytest

from model_registry import list_models
from tools import replica

MODELS = [e.id for e in list_models() if not e.is_demo]


@pytest.mark.parametrize("model_id", MODELS)
def test_replica_loads_with_real_names_shapes_and_shards(tmp_path, model_id):
    root = replica.write_replica(model_id, tmp_path)
    report = replica.check_replica(model_id, root)  # raises on missing/unexpected/mis-shaped keys
    for name, r in report.items():
        want = replica.SHARDS.get((model_id, name), 1)
        assert r["shards"] == want, (name, r)
        assert r["disk_blocks_bytes"] < 64 * 1024**2, "a replica must be sparse"
    for index in root.glob("*/*.index*.json"):
        data = json.loads(index.read_text())
        assert len(set(data["weight_map"].values())) == replica.SHARDS[(model_id, index.parent.name)]


def test_qwen25vl_keeps_its_on_disk_names(tmp_path):
    specs = replica.component_specs("qwen-image")["text_encoder"][1]
    names = {s.name for s in specs}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert any(n.startswith("visual.blocks.0.") for n in names)
    assert not any(n.startswith("model.language_model.") for n in names)


def test_rewrite_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "z-image-turbo").mkdir()
    with pytest.raises(FileExistsError):
        replica.write_replica("z-image-turbo", tmp_path)


@pytest.mark.parametrize("model_id,component", [("z-image-turbo", "transformer"), ("qwen-image", "text_encoder")])
def test_the_estimate_costs_are_the_planner_input_of_a_real_load(tmp_path, model_id, component):
    """One source of truth (issue #17): the meta-device costs the pre-flight estimate plans with
    (engine.generation.estimate.model_cost) are, layer by layer, the `VramRuntime.costs()` of the
    component loaded from its real-size replica (disk offload: nothing is read)."""
    from engine.generation.estimate import model_cost
    from engine.generation.pipelines.components import (
        component_classes,
        read_model_index,
    )
    from engine.generation.settings import vram_config_for
    from engine.loading.loader import load_model
    from engine.management import runtime_of
    from model_registry import get_model
    from model_registry.sizes import build_on_meta, load_component_configs

    root = replica.write_replica(model_id, tmp_path)
    cls = component_classes(read_model_index(root))[component]
    loaded = runtime_of(load_model(cls, root / component, vram_config=vram_config_for(False, True, "cpu"), onload=False)).costs()
    comp = get_model(model_id).components[component]
    meta = model_cost(build_on_meta(comp.library, comp.class_name, load_component_configs()[comp.config_id]), False, True).member
    shape = lambda m: [(l.resident_bytes, l.transient_resident, l.transient_streamed, l.is_leaf) for l in m.layers]
    assert len(meta.layers) == len(loaded.layers) > 100
    assert shape(meta) == shape(loaded)
