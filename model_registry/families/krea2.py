"""Krea 2 (Krea2Pipeline): a bare Qwen3-VL-4B text encoder (Qwen3VLModel; twelve of its hidden
states are stacked per token and fused by the transformer's own text blocks), Krea's DiT
(grouped-query, gated attention), Qwen-Image's Wan-style 16-channel VAE with 2x2 patches.

The base checkpoint runs classifier-free guidance (guidance > 0) as two transformer calls per
step; the pipeline encodes its own prompts (an empty negative prompt when none is given).
"""

from __future__ import annotations

from .latent_rgb import WAN21_16CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, LayerMap, LoraSignature

_KREA2 = "diffusers.models.transformers.transformer_krea2"

FAMILY = Family(
    name="krea2",
    pipeline_class="Krea2Pipeline",
    stages={"text_encoder": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer",),
    denoiser="transformer",
    denoiser_class=f"{_KREA2}.Krea2Transformer2DModel",
    text_encoders=("text_encoder",),
    cfg_threshold=0.0,  # Krea2Pipeline: guidance is on whenever guidance_scale > 0
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            f"{_KREA2}.Krea2RMSNorm": MODULE,
            # their own scale_shift_table (a managed container holds its direct parameters only)
            f"{_KREA2}.Krea2TransformerBlock": MODULE,
            f"{_KREA2}.Krea2FinalLayer": MODULE,
        },
        blocks=("text_fusion.layerwise_blocks", "text_fusion.refiner_blocks", "transformer_blocks"),
    ),
    lora_loader="Krea2LoraLoaderMixin",
    lora_signatures=(LoraSignature(30, ("text_fusion", "time_mod_proj", "txt_in.proj")),),
    # Qwen-Image's VAE (Wan 2.1's, 3-D)
    cpu_conv_probes={"vae": "Conv3d"},
    latent_rgb=WAN21_16CH,
)
