"""Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline): Qwen-Image's components plus the Qwen2.5-VL
processor; 1-3 reference images.

Each reference image goes twice into the model: through Qwen2.5-VL's vision tower (at ~384² px,
as image tokens of the prompt; the vision tower is part of the text encoder, so it is managed
and streamed like the language layers, in the encode stage) and through the VAE (at ~1024² px,
its latents appended to the transformer's sequence: activations, not weights). The pipeline
encodes its own prompts (the images are part of them), so its two CFG passes run unbatched.
"""

from __future__ import annotations

from dataclasses import replace

from . import qwen_image

FAMILY = replace(
    qwen_image.FAMILY,
    name="qwen-image-edit",
    pipeline_class="QwenImageEditPlusPipeline",
    tokenizers=("tokenizer", "processor"),
    pair_batched_cfg=False,
    encode_prompts=None,
    img2img_pipeline=None,
    max_reference_images=3,
    reference_area=1024 * 1024,  # diffusers' QwenImageEditPlusPipeline: VAE_IMAGE_SIZE
    requires_image=True,
    # Qwen-Image's LoRA files are tagged qwen-image by the LoRA library, as they always were
    lora_signatures=(),
)
