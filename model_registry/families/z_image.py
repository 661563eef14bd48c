"""Z-Image (Tongyi-MAI/Z-Image-Turbo): Qwen3 text encoder, single-stream DiT, FLUX.1's VAE.

Its pipeline batches cond + uncond itself and encodes its own prompts.
"""

from __future__ import annotations

from .latent_rgb import FLUX1_16CH
from .spec import MANAGED_LINEAR, MANAGED_MODULE, Family, LayerMap

_TRANSFORMER = "diffusers.models.transformers.transformer_z_image.ZImageTransformer2DModel"

FAMILY = Family(
    name="z-image",
    pipeline_class="ZImagePipeline",
    weighted=("text_encoder", "transformer", "vae"),
    tokenizers=("tokenizer",),
    denoiser="transformer",
    text_encoders=("text_encoder",),
    native_batched_cfg=True,
    cfg_threshold=0.0,
    img2img_pipeline="ZImageImg2ImgPipeline",
    layer_map=LayerMap(
        model_class=_TRANSFORMER,
        layers={
            "torch.nn.Linear": MANAGED_LINEAR,
            "torch.nn.RMSNorm": MANAGED_MODULE,
            "diffusers.models.normalization.RMSNorm": MANAGED_MODULE,
            "torch.nn.LayerNorm": MANAGED_MODULE,
            _TRANSFORMER: MANAGED_MODULE,  # pad tokens are direct parameters of the model itself
        },
        blocks=("noise_refiner", "context_refiner", "layers"),
    ),
    latent_rgb=FLUX1_16CH,
)
