"""FLUX.2 [dev] (Flux2Pipeline): a 24B Mistral Small 3.1 text encoder (Mistral3, a Pixtral vision
tower beside the language layers), the 32B Flux2 DiT, FLUX.2's 32-channel VAE.

Guidance-distilled: the guidance goes into the transformer as an embedding (one pass per step,
no negative prompt); the pipeline encodes its own prompts (hidden states 10, 20 and 30 of the
Mistral language model, stacked). Reference images go to the same pipeline as `image=`. The
denoiser is FLUX.2 [klein]'s class at another size, so the engine's tables (layer map, LoRA
loader, GGUF architecture) are klein's.
"""

from __future__ import annotations

from dataclasses import replace

from . import flux2_klein

FAMILY = replace(
    flux2_klein.FAMILY,
    name="flux2",
    pipeline_class="Flux2Pipeline",
    tokenizers=("tokenizer",),  # a PixtralProcessor folder: tokenizer, chat template, image processor
    # BFL's model card: up to 10 reference images (the pipeline takes a list as `image=`)
    max_reference_images=10,
    # FLUX.2 LoRA files share their layer names between [dev] and [klein]; the library tags them
    # flux2-klein (both load through the same Flux2LoraLoaderMixin)
    lora_signatures=(),
)
