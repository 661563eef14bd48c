"""FLUX.2 [klein]: Qwen3 text encoder, Flux2 DiT, 32-channel VAE.

Distilled: one pass per step, no negative prompt; the pipeline encodes its prompts.
"""

from __future__ import annotations

from .latent_rgb import FLUX2_32CH
from .spec import MANAGED_LINEAR, MANAGED_MODULE, Family, LayerMap

FAMILY = Family(
    name="flux2-klein",
    pipeline_class="Flux2KleinPipeline",
    weighted=("text_encoder", "transformer", "vae"),
    tokenizers=("tokenizer",),
    denoiser="transformer",
    text_encoders=("text_encoder",),
    uses_negative_prompt=False,
    # reference images go to the same pipeline (image=); BFL documents up to 4 for klein
    max_reference_images=4,
    layer_map=LayerMap(
        model_class="diffusers.models.transformers.transformer_flux2.Flux2Transformer2DModel",
        layers={
            "torch.nn.Linear": MANAGED_LINEAR,
            "diffusers.models.normalization.RMSNorm": MANAGED_MODULE,
            "torch.nn.RMSNorm": MANAGED_MODULE,
        },
        blocks=("transformer_blocks", "single_transformer_blocks"),
    ),
    latent_rgb=FLUX2_32CH,
)
