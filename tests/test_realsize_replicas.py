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
