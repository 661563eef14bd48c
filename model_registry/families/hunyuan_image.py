"""HunyuanImage-2.1 (HunyuanImagePipeline): a Qwen2.5-VL-7B text encoder plus a ByT5 glyph encoder
(the quoted text of a prompt, for rendering it), Tencent's 17B dual/single-stream DiT, a 32x VAE
with 64 latent channels (2K images from a 64x64 latent grid).

Guidance is the pipeline's guider, a diffusers `AdaptiveProjectedMixGuidance` whose scale is in
guider/guider_config.json (an OCR guider takes over for prompts with quoted text); the
pipeline's only guidance argument is the distilled checkpoint's embedded scale, which the base
model ignores, so the catalogue fixes the base model's guidance at its guider's. It runs the
guider's passes and encodes its own prompts; no LoRA loader and no GGUF support in diffusers.
"""

from __future__ import annotations

from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, LayerMap

FAMILY = Family(
    name="hunyuan-image",
    pipeline_class="HunyuanImagePipeline",
    stages={"text_encoder": ENCODE, "text_encoder_2": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer", "tokenizer_2"),
    configs=("guider", "ocr_guider"),
    denoiser="transformer",
    denoiser_class="diffusers.models.transformers.transformer_hunyuanimage.HunyuanImageTransformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    guidance_arg="distilled_guidance_scale",
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "diffusers.models.normalization.RMSNorm": MODULE,
            "torch.nn.LayerNorm": MODULE,
            "torch.nn.Conv2d": MODULE,  # the patch embedding
        },
        blocks=("context_embedder.token_refiner.refiner_blocks", "transformer_blocks", "single_transformer_blocks"),
    ),
)
