"""Latent-to-RGB projections for the live preview: rgb = latents . factors + bias, per pixel.

A cheap linear stand-in for the VAE decoder (Forge, ComfyUI and Wan2GP preview the same way).
Each row is one latent channel's (R, G, B) contribution, for latents in the space the
pipelines denoise in (scaled / normalised the way the VAE's decode undoes), which is the space
ComfyUI's `process_in` gives; the results are roughly in [-1, 1].

Sources (ComfyUI, comfy/latent_formats.py, github.com/comfyanonymous/ComfyUI; fitted by the
ComfyUI contributors by least squares from latents to downscaled decoded images):
* SDXL_4CH: `SDXL.latent_rgb_factors` / `latent_rgb_factors_bias` (4-channel SD-XL VAE).
* FLUX1_16CH: `Flux.latent_rgb_factors` / `_bias` (the 16-channel FLUX.1 VAE, also Z-Image's).
* WAN21_16CH: `Wan21.latent_rgb_factors` / `_bias` (the Wan 2.1 VAE that Qwen-Image uses; ComfyUI
  previews Qwen-Image with this format).
* FLUX2_32CH: `Flux2.latent_rgb_factors` / `_bias` (the 32-channel FLUX.2 VAE; the transformer
  sees 128 channels, 2x2 patches of 32, which the preview unpacks first, as ComfyUI's
  `latent_rgb_factors_reshape` does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


MODEL_FILE = "latent_rgb.json"  # a model folder's own factors (the demo's: fitted to its trained VAE)


@dataclass(frozen=True)
class LatentRGB:
    factors: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per VAE latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""

    @property
    def channels(self) -> int:
        return len(self.factors)


SDXL_4CH = LatentRGB(
    (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    (0.1084, -0.0175, -0.0011),
    "ComfyUI comfy/latent_formats.py SDXL",
)

FLUX1_16CH = LatentRGB(
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
    "ComfyUI comfy/latent_formats.py Flux",
)

WAN21_16CH = LatentRGB(
    (
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    (-0.1835, -0.0868, -0.3360),
    "ComfyUI comfy/latent_formats.py Wan21",
)

FLUX2_32CH = LatentRGB(
    (
        (0.0058, 0.0113, 0.0073),
        (0.0495, 0.0443, 0.0836),
        (-0.0099, 0.0096, 0.0644),
        (0.2144, 0.3009, 0.3652),
        (0.0166, -0.0039, -0.0054),
        (0.0157, 0.0103, -0.0160),
        (-0.0398, 0.0902, -0.0235),
        (-0.0052, 0.0095, 0.0109),
        (-0.3527, -0.2712, -0.1666),
        (-0.0301, -0.0356, -0.0180),
        (-0.0107, 0.0078, 0.0013),
        (0.0746, 0.0090, -0.0941),
        (0.0156, 0.0169, 0.0070),
        (-0.0034, -0.0040, -0.0114),
        (0.0032, 0.0181, 0.0080),
        (-0.0939, -0.0008, 0.0186),
        (0.0018, 0.0043, 0.0104),
        (0.0284, 0.0056, -0.0127),
        (-0.0024, -0.0022, -0.0030),
        (0.1207, -0.0026, 0.0065),
        (0.0128, 0.0101, 0.0142),
        (0.0137, -0.0072, -0.0007),
        (0.0095, 0.0092, -0.0059),
        (0.0000, -0.0077, -0.0049),
        (-0.0465, -0.0204, -0.0312),
        (0.0095, 0.0012, -0.0066),
        (0.0290, -0.0034, 0.0025),
        (0.0220, 0.0169, -0.0048),
        (-0.0332, -0.0457, -0.0468),
        (-0.0085, 0.0389, 0.0609),
        (-0.0076, 0.0003, -0.0043),
        (-0.0111, -0.0460, -0.0614),
    ),
    (-0.0329, -0.0718, -0.0851),
    "ComfyUI comfy/latent_formats.py Flux2",
)


def for_model(path: "str | os.PathLike[str]", default: "LatentRGB | None") -> "LatentRGB | None":
    """The model folder's own factors (`latent_rgb.json`: {"factors": [[r, g, b], ...], "bias": [r, g, b]})
    when it has them, else the family's `default`; a file that does not parse is ignored (a preview
    must never break a generation)."""
    file = Path(path) / MODEL_FILE
    if not file.is_file():
        return default
    try:
        data = json.loads(file.read_text())
        return LatentRGB(tuple(tuple(float(v) for v in row) for row in data["factors"]),
                         tuple(float(v) for v in data.get("bias", (0, 0, 0))), str(data.get("source", file)))
    except (OSError, ValueError, KeyError, TypeError):
        return default
