"""FLUX.1 [schnell/dev]: CLIP-L + T5 text encoders, MMDiT transformer, 16-channel VAE.

Guidance-distilled: one pass per step, no negative prompt; the pipeline encodes its prompts.
"""

from __future__ import annotations

from .latent_rgb import FLUX1_16CH
from .spec import MANAGED_LINEAR, MANAGED_MODULE, Family, LayerMap

FAMILY = Family(
    name="flux1",
    pipeline_class="FluxPipeline",
    weighted=("text_encoder", "text_encoder_2", "transformer", "vae"),
    tokenizers=("tokenizer", "tokenizer_2"),
    denoiser="transformer",
    text_encoders=("text_encoder", "text_encoder_2"),
    uses_negative_prompt=False,
    img2img_pipeline="FluxImg2ImgPipeline",
    layer_map=LayerMap(
        model_class="diffusers.models.transformers.transformer_flux.FluxTransformer2DModel",
        layers={
            "torch.nn.Linear": MANAGED_LINEAR,
            "diffusers.models.normalization.RMSNorm": MANAGED_MODULE,
            "torch.nn.RMSNorm": MANAGED_MODULE,
        },
        blocks=("transformer_blocks", "single_transformer_blocks"),
    ),
    latent_rgb=FLUX1_16CH,
)
