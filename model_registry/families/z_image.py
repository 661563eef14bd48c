"""Z-Image (Tongyi-MAI/Z-Image-Turbo): Qwen3 text encoder, single-stream DiT, FLUX.1's VAE.

Its pipeline batches cond + uncond itself. The engine encodes the prompts (`encode_prompts`)
because the pipeline pads every prompt to 512 tokens before the 4B text encoder and then keeps
only the real tokens: with right padding and causal attention the real tokens never see the
padding, so encoding just the real tokens gives the same embeddings at a fraction of the cost
(a 30-token prompt: ~17x fewer tokens; tests/test_min_steps.py checks the equality).
"""

from __future__ import annotations

from typing import Any

from .latent_rgb import FLUX1_16CH
from .spec import MANAGED_LINEAR, MANAGED_MODULE, Family, LayerMap

_TRANSFORMER = "diffusers.models.transformers.transformer_z_image.ZImageTransformer2DModel"

MAX_SEQUENCE_LENGTH = 512  # the pipeline's default


def _token_count(pipe: Any, text: str) -> int:
    """Tokens of `text` as the pipeline's _encode_prompt templates it, without padding."""
    templated = pipe.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    return max(1, min(MAX_SEQUENCE_LENGTH, len(pipe.tokenizer(templated).input_ids)))


def encode_prompts(pipe: Any, prompt: str, negative_prompt: str, cfg: bool, device: Any) -> dict[str, Any]:
    """prompt_embeds (and with CFG negative_prompt_embeds) for ZImagePipeline.__call__, each
    encoded at its own length instead of padded to 512 tokens (same embeddings, see above)."""
    import torch

    if getattr(pipe.tokenizer, "padding_side", "right") != "right":  # left padding would shift positions
        return {"prompt": prompt, **({"negative_prompt": negative_prompt} if negative_prompt.strip() else {})}

    def encode(text: str) -> Any:
        embeds, _ = pipe.encode_prompt(text, device=device, do_classifier_free_guidance=False, max_sequence_length=_token_count(pipe, text))
        return embeds

    with torch.no_grad():
        out: dict[str, Any] = {"prompt_embeds": encode(prompt)}
        if cfg:
            out["negative_prompt_embeds"] = encode(negative_prompt)
    return out


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
    encode_prompts=encode_prompts,
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
