"""FLUX.1 Kontext [dev]: FLUX.1's components (CLIP-L + T5, MMDiT, 16-channel VAE), edit-trained.

The reference image is VAE-encoded and its latents are appended to the transformer's sequence
(FluxKontextPipeline); one reference image, distilled guidance, no negative prompt. Without an
image it generates from text like FLUX.1 [dev].
"""

from __future__ import annotations

from dataclasses import replace

from . import flux1

FAMILY = replace(
    flux1.FAMILY,
    name="flux1-kontext",
    pipeline_class="FluxKontextPipeline",
    img2img_pipeline=None,
    max_reference_images=1,
    # FLUX.1's LoRA files are tagged flux1 by the LoRA library, as they always were
    lora_signatures=(),
)
