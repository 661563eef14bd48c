"""FLUX.2 [klein]: Qwen3 text encoder, Flux2 DiT, 32-channel VAE.

Distilled: one pass per step, no negative prompt; the pipeline encodes its prompts.
"""

from __future__ import annotations

from .latent_rgb import FLUX2_32CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, GgufNames, LayerMap, LoraSignature

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
    gguf=GgufNames(("flux2",)),
    latent_rgb=FLUX2_32CH,
)
