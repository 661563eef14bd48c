"""What the engine knows of a model class is data registered from above (engine.model_tables).

* A record is looked up along the model's MRO; registering it again is a no-op, a different
  record for a registered class is refused.
* A user's own class gets its layer map (in the words "linear" / "module") and block lists
  through `register_model_tables`, as the families' classes do.
* The memory engine works without the catalogue: with model_registry unimportable, `import
  engine` and `enable_vram_management(..., module_map=None)` fall back to the default rule.
* The shipped families' records are the ones the engine finds for their denoiser classes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import engine
from engine.layers.managed import ManagedLinear, ManagedModule
from engine.management import runtime_of
from engine.model_tables import ModelTables, dotted_path, register, tables_for

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class MyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class MySubclass(MyModel):
    pass


def test_a_users_class_gets_its_registered_map_and_blocks():
    tables = ModelTables(dotted_path(MyModel), layers={"torch.nn.Linear": "linear", "torch.nn.LayerNorm": "module"}, blocks=("blocks",))
    engine.register_model_tables(tables)
    register(tables)  # the same record again: a no-op
    with pytest.raises(ValueError, match="already has other tables"):
        register(ModelTables(dotted_path(MyModel), blocks=("head",)))
    assert tables_for(MySubclass) is tables  # along the MRO
    torch.manual_seed(0)
    plain = MySubclass().to(torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    expected = plain(x)
    model = engine.enable_vram_management(plain, vram_config={"computation_device": "cpu", "computation_dtype": "bfloat16"}, vram_limit=0)
    assert type(model.blocks[0].proj)._vram_original_class is nn.Linear and isinstance(model.blocks[0].proj, ManagedLinear)
    assert isinstance(model.blocks[0].norm, ManagedModule) and not isinstance(model.blocks[0].norm, ManagedLinear)
    assert {layer.block for layer in runtime_of(model).layers} == {"blocks.0", "blocks.1", None}
    assert torch.equal(model(x), expected)


def test_the_families_records_are_the_ones_the_engine_finds():
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from engine.generation.family_tables import tables_of
    from model_registry.families import FAMILIES

    assert tables_for(FluxTransformer2DModel) == tables_of(FAMILIES["flux1"]) == tables_of(FAMILIES["flux1-kontext"])
    sdxl = tables_for(UNet2DConditionModel)
    assert sdxl.layers is None and sdxl.lora_loader == "StableDiffusionXLLoraLoaderMixin" and sdxl.lora_prefix == "unet"
    assert sdxl.gguf_architectures == ("sdxl", "sd1")


def test_the_engine_works_without_the_catalogue():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["model_registry"] = None  # the engine used on its own: no catalogue to import
        import torch
        from diffusers import FluxTransformer2DModel
        import engine
        from engine.model_tables import all_tables
        from engine.management import runtime_of
        model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
        engine.enable_vram_management(model, vram_config={"computation_device": "cpu"}, vram_limit=0)
        print(len(all_tables()), sorted({layer.block is None for layer in runtime_of(model).layers}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "[True]"]  # no records, so the default rule: no block lists
