"""Qwen-Image-2.1 (QwenImage21Pipeline): a Qwen3-VL-8B text encoder that also reads the condition
images, a 7B single-stream-style MMDiT over unpatched 64-channel latents, and an RGBA VAE (16x
spatial compression, four channels in and out).

One pipeline does text-to-image and image-conditioned generation (`image=`: condition images,
resized to the output area, seen by the text encoder's vision tower and by the VAE). True CFG
(`true_cfg_scale` > 1 with a negative prompt) runs as two transformer calls per step, with the
text and condition keys cached after the first step; the pipeline encodes its own prompts.
"""

from __future__ import annotations

from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, LayerMap

_QI21 = "diffusers.models.transformers.transformer_qwenimage21"

FAMILY = Family(
    name="qwen-image-21",
    pipeline_class="QwenImage21Pipeline",
    stages={"text_encoder": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("processor",),  # Qwen3VLProcessor: tokenizer files, chat template, image processor
    denoiser="transformer",
    denoiser_class=f"{_QI21}.QwenImage21Transformer2DModel",
    text_encoders=("text_encoder",),
    guidance_arg="true_cfg_scale",
    empty_negative_prompt=" ",  # QwenImage21Pipeline does true CFG only with a negative prompt
    max_reference_images=3,  # the pipeline takes a list; the model card shows up to three
    reference_area=1024 * 1024,  # output_resolution**2: every condition image is resized to it
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "diffusers.models.normalization.RMSNorm": MODULE,
            f"{_QI21}.QwenImage21ZeroCenterRMSNorm": MODULE,
        },
        blocks=("transformer_blocks",),
    ),
    lora_loader="QwenImageLoraLoaderMixin",
    # its VAE is 3-D (Wan-style, RGBA): the CPU dtype probe times a Conv3d
    cpu_conv_probes={"vae": "Conv3d"},
)
