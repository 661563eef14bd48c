"""FLUX.1 [schnell/dev]: CLIP-L + T5 text encoders, MMDiT transformer, 16-channel VAE.

Guidance-distilled: one pass per step, no negative prompt; the pipeline encodes its prompts.
Its published GGUFs keep BFL's own tensor names (`flux_sources` maps them).
"""

from __future__ import annotations

from typing import Any

from .latent_rgb import FLUX1_16CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, GgufLayout, GgufNames, LayerMap, LoraSignature, SourceTable


def flux_sources(model: Any) -> SourceTable:
    """diffusers name -> [(BFL name, first row, end row)] for FluxTransformer2DModel: the layout of
    BFL's own checkpoints, which the published FLUX GGUFs keep (diffusers'
    convert_flux_transformer_checkpoint_to_diffusers does the same on tensors)."""
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    mlp = model.single_transformer_blocks[0].proj_mlp.out_features if cfg.num_single_layers else 4 * inner
    out: SourceTable = {}

    def whole(target: str, source: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", 0, -1)]

    def rows(target: str, source: str, r0: int, r1: int) -> None:
        for kind in ("weight", "bias"):
            out[f"{target}.{kind}"] = [(f"{source}.{kind}", r0, r1)]

    for a, b in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        whole(f"time_text_embed.{a}.linear_1", f"{b}.in_layer")
        whole(f"time_text_embed.{a}.linear_2", f"{b}.out_layer")
    whole("context_embedder", "txt_in")
    whole("x_embedder", "img_in")
    for i in range(cfg.num_layers):
        t, s = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        whole(t + "norm1.linear", s + "img_mod.lin")
        whole(t + "norm1_context.linear", s + "txt_mod.lin")
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            rows(t + f"attn.{name}", s + "img_attn.qkv", j * inner, (j + 1) * inner)
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            rows(t + f"attn.{name}", s + "txt_attn.qkv", j * inner, (j + 1) * inner)
        for target, source in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                               ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[t + f"attn.{target}.weight"] = [(s + f"{source}.scale", 0, -1)]
        whole(t + "ff.net.0.proj", s + "img_mlp.0")
        whole(t + "ff.net.2", s + "img_mlp.2")
        whole(t + "ff_context.net.0.proj", s + "txt_mlp.0")
        whole(t + "ff_context.net.2", s + "txt_mlp.2")
        whole(t + "attn.to_out.0", s + "img_attn.proj")
        whole(t + "attn.to_add_out", s + "txt_attn.proj")
    for i in range(cfg.num_single_layers):
        t, s = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        whole(t + "norm.linear", s + "modulation.lin")
        for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            rows(t + name, s + "linear1", j * inner, (j + 1) * inner)
        rows(t + "proj_mlp", s + "linear1", 3 * inner, 3 * inner + mlp)
        out[t + "attn.norm_q.weight"] = [(s + "norm.query_norm.scale", 0, -1)]
        out[t + "attn.norm_k.weight"] = [(s + "norm.key_norm.scale", 0, -1)]
        whole(t + "proj_out", s + "linear2")
    whole("proj_out", "final_layer.linear")
    # BFL's final modulation is [shift, scale]; diffusers' AdaLayerNormContinuous wants [scale, shift]
    for kind in ("weight", "bias"):
        out[f"norm_out.linear.{kind}"] = [(f"final_layer.adaLN_modulation.1.{kind}", inner, 2 * inner),
                                          (f"final_layer.adaLN_modulation.1.{kind}", 0, inner)]
    return out


FAMILY = Family(
    name="flux1",
    pipeline_class="FluxPipeline",
    stages={"text_encoder": ENCODE, "text_encoder_2": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer", "tokenizer_2"),
    denoiser="transformer",
    denoiser_class="diffusers.models.transformers.transformer_flux.FluxTransformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    uses_negative_prompt=False,
    img2img_pipeline="FluxImg2ImgPipeline",
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "diffusers.models.normalization.RMSNorm": MODULE,
            "torch.nn.RMSNorm": MODULE,
        },
        blocks=("transformer_blocks", "single_transformer_blocks"),
    ),
    lora_loader="FluxLoraLoaderMixin",
    # BFL's and diffusers' block names; the attention-only names come late (Qwen-Image's LoRAs
    # share `to_add_out`, BFL's share `img_mlp` / `img_mod` with Qwen-Image's)
    lora_signatures=(
        LoraSignature(30, ("double_blocks", "single_blocks", "single_transformer_blocks", "proj_mlp")),
        LoraSignature(60, ("ff_context", "img_attn", "txt_attn", "to_add_out")),
    ),
    gguf=GgufNames(("flux",), GgufLayout("BFL FLUX", (".double_blocks.",), flux_sources)),
    latent_rgb=FLUX1_16CH,
)
