"""The live preview: the current latents as a small RGB image, without the VAE.

    image = latents_to_image(latents, family.latent_rgb, width, height)   # PIL, latent resolution

A linear projection per family (model_registry/families/latent_rgb.py: the published ComfyUI
factors) on the computation device, then 3 x h x w bytes to the host. Packed latents (FLUX.1,
Qwen-Image: a sequence of 2x2 patches of 16 channels; FLUX.2: of 32) are unpacked first, the way
the pipelines' `_unpack_latents` do; Qwen-Image's 5-D (B, C, T, H, W) latents show their last
frame. A family without factors, or latents whose channel count does not match them, get a
generic view: the first three channels, each stretched by its own spread.

`Previewer` decides when: at most once per step (the step callback), and only once
`interval_s` (default 0.25 s) has passed since the denoising began or since the last preview,
and once `cost / budget` has (a preview that took 3 ms waits at least 0.1 s with the 3% budget),
so the previews take at most 3% of the denoising time, counted over the steps since the previous
preview; a preview is never skipped once `max_interval_s` (2 s) has gone by. A run whose steps
take milliseconds (the demo) gets a preview every quarter second, a run whose steps take longer
than that one every step. It times itself: `seconds` is what the previews of a run cost
(bench/bench_preview.py measures it; docs/app.md has the figures).
"""

from __future__ import annotations

import time
from typing import Any

import torch

#: a preview is skipped while the last one is younger than this (seconds) ...
PREVIEW_INTERVAL_S = 0.25
#: ... or while previews would take more than this fraction of the time ...
PREVIEW_BUDGET = 0.03
#: ... unless this long has passed ("at least every 2 s", as far as the steps allow)
PREVIEW_MAX_INTERVAL_S = 2.0


def _unpack(x: torch.Tensor, width: int, height: int, channels: int | None) -> torch.Tensor:
    """(seq, C) tokens -> (C', H, W): 2x2 patches unpacked when C = 4 x the factors' channels."""
    seq, c = x.shape
    h, w = height // 16, width // 16
    if h * w != seq:  # another patch size: the squarest grid that holds the tokens
        h = max(1, int(round((seq * height / max(1, width)) ** 0.5)))
        w = max(1, seq // h)
        x = x[: h * w]
    grid = x.reshape(h, w, c)
    if channels is not None and c == 4 * channels:  # c * 4 + dy * 2 + dx, as _pack_latents packs
        return grid.reshape(h, w, channels, 2, 2).permute(2, 0, 3, 1, 4).reshape(channels, 2 * h, 2 * w)
    return grid.permute(2, 0, 1)


_FACTORS: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _factors(latent_rgb: Any, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = (id(latent_rgb), str(device), dtype)
    if key not in _FACTORS:
        _FACTORS[key] = (
            torch.tensor(latent_rgb.factors, dtype=dtype, device=device),
            torch.tensor(latent_rgb.bias, dtype=dtype, device=device),
        )
    return _FACTORS[key]


def project(latents: torch.Tensor, latent_rgb: Any, width: int, height: int) -> torch.Tensor:
    """The first image of `latents` as an (H, W, 3) float tensor in [0, 1] (on its device)."""
    x = latents.detach()[0]
    channels = latent_rgb.channels if latent_rgb is not None else None
    if x.ndim == 2:
        x = _unpack(x, width, height, channels)
    elif x.ndim == 4:  # (C, T, H, W): the last frame
        x = x[:, -1]
    if x.ndim != 3:
        raise ValueError(f"no preview for latents of shape {tuple(latents.shape)}")
    c, h, w = x.shape
    if latent_rgb is not None and c == channels:
        factors, bias = _factors(latent_rgb, x.device, torch.float32)
        # (H*W, C) @ (C, 3): one small matmul, already in image (row, column, RGB) order
        rgb = torch.addmm(bias, x.permute(1, 2, 0).reshape(h * w, c).float(), factors)
        return ((rgb + 1) * 0.5).clamp_(0, 1).reshape(h, w, 3)
    # generic: three channels, each centred and stretched by its own spread
    rgb = (x[:3] if c >= 3 else x[:1].expand(3, -1, -1)).float()
    mean = rgb.mean(dim=(1, 2), keepdim=True)
    std = rgb.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    return ((rgb - mean) / (4 * std) + 0.5).clamp_(0, 1).permute(1, 2, 0)


def latents_to_image(latents: torch.Tensor, latent_rgb: Any, width: int, height: int) -> Any:
    """A PIL image of the latents (latent resolution: width/8 x height/8 for these VAEs)."""
    from PIL import Image

    rgb = project(latents, latent_rgb, width, height)
    array = rgb.mul_(255).round_().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


class Previewer:
    """Makes the previews of one run, at most one per step (see the module docstring)."""

    def __init__(self, latent_rgb: Any, width: int, height: int, *, interval_s: float | None = None,
                 max_interval_s: float | None = None):
        interval_s = PREVIEW_INTERVAL_S if interval_s is None else interval_s
        max_interval_s = PREVIEW_MAX_INTERVAL_S if max_interval_s is None else max_interval_s
        self.latent_rgb = latent_rgb
        self.width, self.height = width, height
        self.interval_s = min(interval_s, max_interval_s)
        self.max_interval_s = max_interval_s
        self.budget = PREVIEW_BUDGET
        self.last_at: float | None = None
        self.last_cost = 0.0
        self.count = 0
        self.seconds = 0.0  # time spent making previews in this run
        self.failed = False

    def start(self) -> None:
        """The denoising begins: the first preview waits `interval_s` from here."""
        self.last_at = time.perf_counter()

    def due(self, step: int, total: int) -> bool:
        if self.failed:
            return False
        if self.last_at is None:
            self.start()
        waited = time.perf_counter() - self.last_at
        if waited >= self.max_interval_s:
            return True
        return waited >= max(self.interval_s, self.last_cost / self.budget)

    def __call__(self, latents: Any, step: int, total: int) -> Any | None:
        """The preview of this step's latents, or None when not due (or not possible)."""
        if latents is None or not isinstance(latents, torch.Tensor) or not self.due(step, total):
            return None
        start = time.perf_counter()
        try:
            image = latents_to_image(latents, self.latent_rgb, self.width, self.height)
        except Exception:  # a preview must never break a generation
            self.failed = True
            return None
        finally:
            self.last_cost = time.perf_counter() - start
            self.seconds += self.last_cost
        self.last_at = time.perf_counter()
        self.count += 1
        return image
