"""Qwen-Image (Qwen/Qwen-Image): Qwen2.5-VL text encoder, MMDiT transformer, Wan-style 3D VAE.

Its pipeline runs true CFG as two transformer calls per step; the engine batches that pair into
one forward, so it encodes the prompts itself (in the encode stage) to hand the batcher both.
"""

from __future__ import annotations

from typing import Any

from .latent_rgb import WAN21_16CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, GgufNames, LayerMap, LoraSignature


def encode_prompts(pipe: Any, prompt: str, negative_prompt: str, cfg: bool, device: Any) -> dict[str, Any]:
    """prompt_embeds + mask, and with CFG the negative pair, for QwenImagePipeline.__call__."""
    import torch

    def encode(text: str) -> tuple[Any, Any]:
        embeds, mask = pipe.encode_prompt(prompt=text, device=device)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    with torch.no_grad():
        pe, pm = encode(prompt)
        out: dict[str, Any] = {"prompt_embeds": pe, "prompt_embeds_mask": pm}
        if cfg:
            # Qwen-Image's own pipeline uses " " for "no negative prompt".
            ne, nm = encode(negative_prompt if negative_prompt.strip() else " ")
            out.update(negative_prompt_embeds=ne, negative_prompt_embeds_mask=nm)
    return out


FAMILY = Family(
    name="qwen-image",
    pipeline_class="QwenImagePipeline",
    stages={"text_encoder": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer",),
    denoiser="transformer",
    denoiser_class="diffusers.models.transformers.transformer_qwenimage.QwenImageTransformer2DModel",
    text_encoders=("text_encoder",),
    guidance_arg="true_cfg_scale",
    pair_batched_cfg=True,
    img2img_pipeline="QwenImageImg2ImgPipeline",
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "diffusers.models.normalization.RMSNorm": MODULE,
        },
        blocks=("transformer_blocks",),
    ),
    lora_loader="QwenImageLoraLoaderMixin",
    lora_signatures=(LoraSignature(40, ("img_mlp", "txt_mlp", "img_mod", "txt_mod")),),
    # the published Qwen-Image GGUFs use diffusers' own names (a ComfyUI prefix at most)
    gguf=GgufNames(("qwen_image", "qwenimage")),
    # its VAE (Wan 2.1's) is 3-D: the CPU dtype probe times a Conv3d
    cpu_conv_probes={"vae": "Conv3d"},
    encode_prompts=encode_prompts,
    latent_rgb=WAN21_16CH,
)
