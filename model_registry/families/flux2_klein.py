"""FLUX.2 [klein]: Qwen3 text encoder, Flux2 DiT, 32-channel VAE.

Distilled: one pass per step, no negative prompt; the pipeline encodes its prompts.
"""

from __future__ import annotations

from typing import Any

from .latent_rgb import FLUX2_32CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, GgufLayout, GgufNames, LayerMap, LoraSignature, SourceTable

# diffusers name pieces -> BFL's (diffusers' convert_flux2_transformer_checkpoint_to_diffusers, inverted)
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}  # fmt: skip
_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}  # fmt: skip
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_QKV = {"to_q": ("img_attn.qkv", 0), "to_k": ("img_attn.qkv", 1), "to_v": ("img_attn.qkv", 2),
        "add_q_proj": ("txt_attn.qkv", 0), "add_k_proj": ("txt_attn.qkv", 1), "add_v_proj": ("txt_attn.qkv", 2)}  # fmt: skip


def flux2_sources(model: Any) -> SourceTable:
    """diffusers name -> [(BFL name, first row, end row)] for Flux2Transformer2DModel: the layout of
    BFL's FLUX.2 checkpoints, which ComfyUI-style FLUX.2 GGUFs keep (diffusers'
    convert_flux2_transformer_checkpoint_to_diffusers does the same on tensors: a double block's
    fused qkv is three row ranges, a norm's `scale` is diffusers' `weight`, the final modulation's
    [shift, scale] halves are swapped)."""
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    out: SourceTable = {}
    for target in model.state_dict():
        stem, _, kind = target.rpartition(".")
        parts = stem.split(".")
        if stem == "norm_out.linear":
            src = f"final_layer.adaLN_modulation.1.{kind}"
            out[target] = [(src, inner, 2 * inner), (src, 0, inner)]
            continue
        if stem in _TOP:
            out[target] = [(f"{_TOP[stem]}.{kind}", 0, -1)]
            continue
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            double = parts[0] == "transformer_blocks"
            block, rest = f"{'double' if double else 'single'}_blocks.{parts[1]}", ".".join(parts[2:])
            if double and rest.startswith("attn.") and rest[5:] in _QKV:
                fused, j = _QKV[rest[5:]]
                out[target] = [(f"{block}.{fused}.{kind}", j * inner, (j + 1) * inner)]
                continue
            table = _DOUBLE if double else _SINGLE
            if rest in table:
                source = table[rest]
                src_kind = "scale" if "norm" in source and kind == "weight" else kind
                out[target] = [(f"{block}.{source}.{src_kind}", 0, -1)]
                continue
        raise ValueError(f"Flux2Transformer2DModel: no BFL name known for {target!r}")
    return out


FAMILY = Family(
    name="flux2-klein",
    pipeline_class="Flux2KleinPipeline",
    stages={"text_encoder": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer",),
    denoiser="transformer",
    denoiser_class="diffusers.models.transformers.transformer_flux2.Flux2Transformer2DModel",
    text_encoders=("text_encoder",),
    uses_negative_prompt=False,
    # reference images go to the same pipeline (image=); BFL documents up to 4 for klein
    max_reference_images=4,
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "diffusers.models.normalization.RMSNorm": MODULE,
            "torch.nn.RMSNorm": MODULE,
        },
        blocks=("transformer_blocks", "single_transformer_blocks"),
    ),
    lora_loader="Flux2LoraLoaderMixin",
    # before FLUX.1's: FLUX.2's diffusers names share `single_transformer_blocks` with FLUX.1's
    lora_signatures=(
        LoraSignature(20, ("double_stream_modulation", "single_stream_modulation", "to_qkv_mlp_proj", "ff.linear_in", "ff_linear_in")),
    ),
    # FLUX.2 GGUFs in diffusers' names (a ComfyUI prefix at most) or, recognised by these markers,
    # in BFL's original names (ComfyUI's convention)
    gguf=GgufNames(
        ("flux2",),
        GgufLayout("original FLUX.2 (BFL / ComfyUI)", (".img_attn.qkv.", "double_blocks.", "single_blocks."), flux2_sources),
    ),
    latent_rgb=FLUX2_32CH,
)
