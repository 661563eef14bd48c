"""The demo's tiny component configs: Z-Image's Qwen3 text encoder, transformer and VAE.

Each constructor returns a float32 model of the real class with the library's random init;
seeding is the caller's job, and sizes a tokenizer decides (vocabulary, special token ids) are
arguments. The tests' tiny configs of the other families (tests/fixtures/tiny_components.py)
build on these, so a tiny model is the same wherever it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["TEXT_HIDDEN", "autoencoder_kl", "demo_transformer", "demo_vae", "flux_vae", "padded", "qwen3_text_encoder", "z_image_transformer"]

TEXT_HIDDEN = 32  # hidden size of every tiny text encoder


def padded(n: int, multiple: int = 64) -> int:
    """Embedding tables are padded past the tokenizer size, as in the real checkpoints."""
    return -(-n // multiple) * multiple


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
        vocab_size=padded(vocab_size),
        hidden_size=TEXT_HIDDEN,
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
        cap_feat_dim=TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[4, 6, 6],  # sums to dim / n_heads
        axes_lens=[1024, 512, 512],
    )


def autoencoder_kl(**config: Any) -> torch.nn.Module:
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
    return autoencoder_kl(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )


# The shipped demo (model_registry/demo/weights, trained by tools/train_demo.py) is wider than the
# tests' tiny models above: a 64x64 picture is an 8x8x16 latent, 16 image tokens, and the DiT needs
# room to compose colour, shape and position from a caption. Still ~2 M parameters in all.


def demo_transformer() -> torch.nn.Module:
    """The demo's DiT: Z-Image's layout at dim 128, 3 layers plus 1 refiner layer per stream."""
    from diffusers import ZImageTransformer2DModel

    return ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=128,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=4,
        n_kv_heads=4,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=TEXT_HIDDEN,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 12, 12],  # sums to dim / n_heads
        axes_lens=[1024, 512, 512],
    )


def demo_vae(scaling_factor: float = 1.0, shift_factor: float = 0.0) -> torch.nn.Module:
    """The demo's 16-channel 8x VAE (FLUX.1's layout, no quant convs), wider than `flux_vae`;
    its latent scale and shift are measured after training and stored in its config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 48, 48),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=1024,
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
