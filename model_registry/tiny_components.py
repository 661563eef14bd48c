"""Tiny configs of the real component classes, written once for everything that needs tiny models.

The tiny pipeline repos (model_registry.tiny_repos: the offline demo model and the tests'
repos) and the single-model engine fixtures (tests/fixtures/tiny_models.py) build their
text encoders, denoisers and VAEs with these constructors, so a tiny model is the same
wherever it is used. Each returns a float32 model with the library's random init; seeding is
the caller's job. Sizes that a tokenizer decides (vocabulary, special token ids) are arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "QWEN_CONFIG_TOKENS",
    "clip_text",
    "flux2_transformer",
    "flux2_vae",
    "flux_transformer",
    "flux_vae",
    "qwen3_text_encoder",
    "qwen25_vl",
    "qwen_image_transformer",
    "qwen_image_vae",
    "qwen_special_ids",
    "sdxl_unet",
    "sdxl_vae",
    "t5_encoder",
    "z_image_transformer",
]

_TEXT_HIDDEN = 32  # hidden size of every tiny text encoder

# The special tokens the tiny Qwen configs name (their ids come from the tokenizer).
QWEN_CONFIG_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def qwen_special_ids(vocab_size: int) -> dict[str, int]:
    """Ids for QWEN_CONFIG_TOKENS at the top of a `vocab_size` vocabulary, for a model used without its tokenizer."""
    first = vocab_size - len(QWEN_CONFIG_TOKENS)
    return {token: first + i for i, token in enumerate(QWEN_CONFIG_TOKENS)}


def _padded(n: int, multiple: int = 64) -> int:
    """Embedding tables are padded past the tokenizer size, as in the real checkpoints."""
    return -(-n // multiple) * multiple


def qwen25_vl(vocab_size: int, special_ids: Mapping[str, int]) -> torch.nn.Module:
    """Qwen2.5-VL with a 1-block vision tower (the pipeline only runs the text path).

    `vocab_size` is the tokenizer's (added tokens included); `special_ids` maps each of
    QWEN_CONFIG_TOKENS to its id.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text_config = {
        "vocab_size": _padded(vocab_size),
        "hidden_size": _TEXT_HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
        "rope_theta": 1_000_000.0,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
    }
    vision_config = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_heads": 2,
        "out_hidden_size": _TEXT_HIDDEN,
        "fullatt_block_indexes": [0],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        vision_token_id=special_ids["<|vision_pad|>"],
        tie_word_embeddings=False,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen3_text_encoder(
    vocab_size: int, special_ids: Mapping[str, int], layers: int, *, lm_head: bool = True
) -> torch.nn.Module:
    """Qwen3-4B-style text encoder.

    The real repos save it from Qwen3ForCausalLM (keys ``model.*``, tied lm_head), which is
    what ``lm_head=True`` builds; Z-Image's pipeline loads those weights as the bare
    Qwen3Model, which ``lm_head=False`` builds from the same config.
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(
        vocab_size=_padded(vocab_size),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
    )
    return (Qwen3ForCausalLM if lm_head else Qwen3Model)(config)


def clip_text(vocab_size: int, act: str = "quick_gelu", with_projection: bool = False) -> torch.nn.Module:
    """A 2-layer CLIP text encoder (SDXL reads the penultimate layer, so 2 is the minimum)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=_TEXT_HIDDEN,
        # As in the real configs: eos_token_id == 2 selects the legacy argmax
        # pooling, which finds <|endoftext|> because it is the last vocab entry.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def t5_encoder(vocab_size: int) -> torch.nn.Module:
    """T5 v1.1-style encoder (gated GELU, untied embeddings), as FLUX.1 uses T5-XXL."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_padded(vocab_size),
        d_model=_TEXT_HIDDEN,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def qwen_image_transformer() -> torch.nn.Module:
    """Qwen-Image's MMDiT: 2 blocks of 2 heads, reading the Qwen2.5-VL hidden states."""
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,  # 16 latent channels x 2x2 patch
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )


def z_image_transformer() -> torch.nn.Module:
    """Z-Image's single-stream DiT: 2 layers plus 1 refiner layer per stream."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=_TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[4, 6, 6],  # sums to dim / n_heads
        axes_lens=[1024, 512, 512],
    )


def flux_transformer() -> torch.nn.Module:
    """FLUX.1 [schnell]'s MMDiT: 1 double-stream and 2 single-stream blocks."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels x 2x2 packing
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,  # T5 hidden size
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP pooled output
        guidance_embeds=False,  # schnell is not guidance-distilled
        axes_dims_rope=(4, 6, 6),
    )


def flux2_transformer() -> torch.nn.Module:
    """FLUX.2 [klein]'s DiT: 1 double-stream and 2 single-stream blocks, 4-axis RoPE."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,  # 32 latent channels x 2x2 patch
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_HIDDEN,  # three stacked Qwen3 hidden states
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    )


def sdxl_unet() -> torch.nn.Module:
    """SDXL's UNet: the real three-level block layout with text-time added conditioning, narrow."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4, 4),  # diffusers' name for the head count: 8-wide heads
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=2 * _TEXT_HIDDEN,  # CLIP-L and CLIP-G hidden states, concatenated
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six size/crop numbers, each embedded, plus the CLIP-G pooled projection
        projection_class_embeddings_input_dim=6 * time_embed_dim + _TEXT_HIDDEN,
    )


def _autoencoder_kl(**config: Any) -> torch.nn.Module:
    """An 8x AutoencoderKL with the real four-level layout, far narrower than the real 128/256/512/512."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=1024,
        **config,
    )


def flux_vae() -> torch.nn.Module:
    """FLUX.1's 16-channel VAE, which Z-Image ships too (no quant convs, shifted and scaled latents)."""
    return _autoencoder_kl(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )


def sdxl_vae() -> torch.nn.Module:
    """SDXL's 4-channel VAE (upcast to fp32 by the pipeline, as the real config asks)."""
    return _autoencoder_kl(latent_channels=4, scaling_factor=0.13025, force_upcast=True)


def qwen_image_vae() -> torch.nn.Module:
    """Keeps the real z_dim, 8x spatial factor and latent statistics; only the width shrinks."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=4, z_dim=16, num_res_blocks=1)


def flux2_vae() -> torch.nn.Module:
    """32 latent channels, 2x2 patchified and batch-norm normalised by the pipeline."""
    from diffusers import AutoencoderKLFlux2

    return AutoencoderKLFlux2(
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=32,
        sample_size=1024,
    )


