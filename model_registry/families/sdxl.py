"""Stable Diffusion XL: two CLIP text encoders, UNet, 4-channel VAE; fp16 weight variant.

The pipeline batches cond + uncond itself and encodes its own prompts. The UNet has no
shipped layer map: the engine's default rule manages every module with parameters.
"""

from __future__ import annotations

from .latent_rgb import SDXL_4CH
from .spec import Family

FAMILY = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    weighted=("text_encoder", "text_encoder_2", "unet", "vae"),
    tokenizers=("tokenizer", "tokenizer_2"),
    variant="fp16",
    denoiser="unet",
    text_encoders=("text_encoder", "text_encoder_2"),
    native_batched_cfg=True,
    img2img_pipeline="StableDiffusionXLImg2ImgPipeline",
    sampler="Euler",
    latent_rgb=SDXL_4CH,
)
