"""Z-Image's prompts are encoded at their own length, not padded to 512 tokens (issue #17: text
encoding was most of a real-size run on the CPU), and the embeddings are those of the padded
encode the pipeline itself does (right padding + causal attention: the padding is never seen)."""

from __future__ import annotations

import torch

from engine.generation.pipelines import build_pipeline
from engine.generation.pipelines.families import ENCODE
from engine.generation.settings import vram_config_for
from model_registry.families.z_image import encode_prompts
from tests.fixtures.tiny_repos import write_tiny_repo


def test_unpadded_encode_equals_the_pipelines_padded_encode(tmp_path):
    mp = build_pipeline(write_tiny_repo("z-image", tmp_path / "z"), vram_config_for(False, False, "cpu"), None)
    mp.switch(ENCODE)
    lengths = []
    mp.components["text_encoder"].register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        padded, negative = mp.pipe.encode_prompt("a cat on a chair", device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    ours = encode_prompts(mp.pipe, "a cat on a chair", "blurry", True, torch.device("cpu"))
    assert lengths[:2] == [512, 512] and max(lengths[2:]) < 64, lengths
    for a, b in ((padded, ours["prompt_embeds"]), (negative, ours["negative_prompt_embeds"])):
        assert a[0].shape == b[0].shape
        torch.testing.assert_close(a[0].float(), b[0].float(), atol=2e-2, rtol=2e-2)
