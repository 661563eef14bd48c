"""Z-Image (Tongyi-MAI/Z-Image-Turbo): Qwen3 text encoder, single-stream DiT, FLUX.1's VAE.

Its pipeline batches cond + uncond itself. The engine encodes the prompts (`encode_prompts`)
because the pipeline pads every prompt to 512 tokens before the 4B text encoder and then keeps
only the real tokens: with right padding and causal attention the real tokens never see the
padding, so encoding just the real tokens gives the same embeddings at a fraction of the cost
(a 30-token prompt: ~17x fewer tokens; tests/test_min_steps.py checks the equality).
Its published GGUFs keep the original Z-Image / ComfyUI Lumina2 names (`z_image_sources` maps them).
"""

from __future__ import annotations

from typing import Any

from .latent_rgb import FLUX1_16CH
from .spec import DECODE, DENOISE, ENCODE, LINEAR, MODULE, Family, GgufLayout, GgufNames, LayerMap, LoraSignature, SourceTable

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


#: diffusers' infix -> the original one, inside a block (`layers.N.`, `noise_refiner.N.`,
#: `context_refiner.N.`, `siglip_refiner.N.`): the inverse of the renames in diffusers'
#: convert_z_image_transformer_checkpoint_to_diffusers (loaders/single_file_utils.py); the
#: original names are those of ComfyUI's comfy/ldm/lumina/model.py (JointAttention's `qkv`, `out`,
#: `q_norm`, `k_norm`), the Z-Image code the published Z-Image GGUFs were converted from
_Z_IMAGE_BLOCK_RENAMES = (
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = ("to_q", "to_k", "to_v")


def z_image_sources(model: Any) -> SourceTable:
    """diffusers name -> [(original name, first row, end row)] for ZImageTransformer2DModel.

    As diffusers' converter: `x_embedder.` / `final_layer.` are the model's one patch size's
    `all_x_embedder.{p}-{f}.` / `all_final_layer.{p}-{f}.` (the converter writes "2-1", Z-Image's
    only patch size; here it is read from the config's first entry), a block's
    `attention.qkv.weight` is [to_q; to_k; to_v] by rows (the converter's torch.chunk into 3: the
    row counts are read from the model, equal for Z-Image), `attention.out` is `to_out.0`,
    `q_norm`/`k_norm` are `norm_q`/`norm_k`; every other name (feed_forward.w1/w2/w3,
    attention_norm1/2, ffn_norm1/2, adaLN_modulation.0, t_embedder.mlp.*, cap_embedder.*,
    x_pad_token, cap_pad_token, siglip_*) is the same in both."""
    cfg = model.config
    patch = f"{cfg.all_patch_size[0]}-{cfg.all_f_patch_size[0]}"
    state = model.state_dict()
    out: SourceTable = {}
    for target in state:
        block, sep, tail = target.partition(".attention.")
        if sep and tail in tuple(f"{q}.weight" for q in _QKV):
            sizes = [state[f"{block}.attention.{q}.weight"].shape[0] for q in _QKV]
            j = _QKV.index(tail.removesuffix(".weight"))
            r0 = sum(sizes[:j])
            out[target] = [(f"{block}.attention.qkv.weight", r0, r0 + sizes[j])]
            continue
        source = target
        if target.startswith(("all_x_embedder.", "all_final_layer.")):
            group, key, rest = target.split(".", 2)
            if key != patch:
                continue  # another patch size: the original layout has one (left missing)
            source = f"{group.removeprefix('all_')}.{rest}"
        for new, old in _Z_IMAGE_BLOCK_RENAMES:
            source = source.replace(new, old)
        out[target] = [(source, 0, -1)]
    return out


FAMILY = Family(
    name="z-image",
    pipeline_class="ZImagePipeline",
    stages={"text_encoder": ENCODE, "transformer": DENOISE, "vae": DECODE},
    tokenizers=("tokenizer",),
    denoiser="transformer",
    denoiser_class=_TRANSFORMER,
    text_encoders=("text_encoder",),
    native_batched_cfg=True,
    cfg_threshold=0.0,
    img2img_pipeline="ZImageImg2ImgPipeline",
    encode_prompts=encode_prompts,
    layer_map=LayerMap(
        layers={
            "torch.nn.Linear": LINEAR,
            "torch.nn.RMSNorm": MODULE,
            "diffusers.models.normalization.RMSNorm": MODULE,
            "torch.nn.LayerNorm": MODULE,
            _TRANSFORMER: MODULE,  # pad tokens are direct parameters of the model itself
        },
        blocks=("noise_refiner", "context_refiner", "layers"),
    ),
    lora_loader="ZImageLoraLoaderMixin",
    lora_signatures=(
        LoraSignature(50, ("noise_refiner", "context_refiner", "feed_forward", "adaln_modulation", "attention.to_q", "attention_to_q")),
    ),
    # the published Z-Image GGUFs keep the original Z-Image / ComfyUI Lumina2 names; norm_final.weight
    # is Lumina2's unused final RMSNorm, in some files (diffusers' converter drops it)
    gguf=GgufNames(
        ("lumina2", "z_image", "zimage"),
        GgufLayout("original Z-Image (ComfyUI Lumina2)", (".attention.qkv.", ".x_embedder.", ".final_layer."),
                   z_image_sources, unused=("norm_final.weight",)),
    ),
    latent_rgb=FLUX1_16CH,
)
