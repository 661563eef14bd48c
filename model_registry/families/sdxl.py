"""Stable Diffusion XL: two CLIP text encoders, UNet, 4-channel VAE; fp16 weight variant.

The pipeline batches cond + uncond itself and encodes its own prompts. The UNet has no
shipped layer map: the engine's default rule manages every module with parameters.
"""

from __future__ import annotations

from .latent_rgb import SDXL_4CH
from .spec import DECODE, DENOISE, ENCODE, Family, GgufNames, LoraSignature

FAMILY = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    stages={"text_encoder": ENCODE, "text_encoder_2": ENCODE, "unet": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer", "tokenizer_2"),
    variant="fp16",
    denoiser="unet",
    denoiser_class="diffusers.models.unets.unet_2d_condition.UNet2DConditionModel",
    text_encoders=("text_encoder", "text_encoder_2"),
    native_batched_cfg=True,
    img2img_pipeline="StableDiffusionXLImg2ImgPipeline",
    sampler="Euler",
    lora_loader="StableDiffusionXLLoraLoaderMixin",
    # first: a UNet's block names, kohya's text-encoder prefixes and the second text encoder
    lora_signatures=(
        LoraSignature(10, ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "lora_te1_", "lora_te2_", "text_encoder_2")),
    ),
    gguf=GgufNames(("sdxl", "sd1")),
    latent_rgb=SDXL_4CH,
)
