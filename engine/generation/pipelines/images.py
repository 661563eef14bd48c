"""Images in: image-to-image (one image + strength) and reference images (edit models).

The same managed components serve every mode. A text-to-image family with an `img2img_pipeline`
gets a second diffusers object of that class built from the very same component objects (no
file is read, nothing is copied), so its VAE encode, text encoders and denoiser run under the
one budget with the same stage switching: the VAE's `encode` goes through the engine's entry
hook like `decode` (engine.runtime.entry), and `budget.on_demand` onloads the VAE when the
pipeline encodes the input image. Edit families (Qwen-Image-Edit, FLUX.1 Kontext, FLUX.2
[klein]) take the images as `image=` of their own pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from model_registry.families import Family

# What a reference image costs the denoiser: its latents join the sequence. Qwen-Image-Edit-2509
# resizes every reference to about 1024² pixels for the VAE (family.reference_area); the others
# keep it (Kontext is called with _auto_resize=False), and about 1024² is the most one adds.
REFERENCE_PIXELS_MAX = 1024 * 1024


DEFAULT_STRENGTH = 0.6


def image_kwargs(
    family: Family, images: Sequence[Any], strength: float | None, call: Any = None, pixels: int | None = None
) -> dict[str, Any]:
    """The `__call__` keyword arguments for `images` (PIL, RGB) under `family`'s mode. `call`: the
    pipeline's __call__ (FLUX.1 Kontext resizes references itself, and scales the output up to
    `max_area`, unless told not to; the images come here already at a valid size, and the output
    is the requested `pixels`)."""
    params = inspect.signature(call).parameters if call is not None else {}
    if not images:
        return {"max_area": pixels} if pixels and "max_area" in params else {}
    if family.image_mode == "img2img":
        return {"image": images[0], "strength": DEFAULT_STRENGTH if strength is None else float(strength)}
    if family.image_mode == "reference":
        out: dict[str, Any] = {"image": images[0] if family.max_reference_images == 1 else list(images)}
        if "_auto_resize" in params:
            out["_auto_resize"] = False
        if pixels and "max_area" in params:
            out["max_area"] = pixels
        return out
    raise ValueError(f"{family.name} takes no input image")


def _vae_pixels(family: Family, image: Any) -> int:
    """Pixels at which the family's pipeline VAE-encodes a reference (family.reference_area)."""
    if family.reference_area:
        return family.reference_area
    return min(image.width * image.height, REFERENCE_PIXELS_MAX)


def reference_pixels(family: Family, images: Sequence[Any]) -> int:
    """Pixels of input-image latents that join the denoiser's sequence (edit models only). A
    256x256 reference to Qwen-Image-Edit-2509 is encoded at ~1024x1024: counting its own size
    under-estimated the real-size run's RAM by 1.1 GiB (bench/results/realsize-cpu.md)."""
    if family.image_mode != "reference":
        return 0
    return sum(_vae_pixels(family, im) for im in images)


def vae_input_pixels(family: Family, images: Sequence[Any]) -> int:
    """The largest image the VAE encodes for a request: an edit model's references at the size
    its pipeline resizes them to, the image-to-image input at its own (already fitted) size."""
    if not images:
        return 0
    if family.image_mode == "reference":
        return max(_vae_pixels(family, im) for im in images)
    return max(im.width * im.height for im in images)


def img2img_steps(family: Family, steps: int, strength: float) -> int:
    """Denoising steps diffusers' image-to-image pipeline runs for `steps` at `strength`."""
    if (family.img2img_pipeline or "").startswith("StableDiffusion"):
        return min(int(steps * strength), steps)
    return steps - int(max(steps - min(steps * strength, steps), 0))


def build_img2img(pipe: Any, family: Family, parts: dict[str, Any], extra: dict[str, Any], subclass: Any) -> Any:
    """A diffusers `family.img2img_pipeline` over the same component objects as `pipe`."""
    import diffusers

    base = getattr(diffusers, family.img2img_pipeline)
    cls = subclass(base)
    params = inspect.signature(base.__init__).parameters
    kwargs = {k: v for k, v in parts.items() if k in params}
    for name, p in params.items():  # optional parts a t2i repo lacks (IP-adapter image encoders)
        if name not in kwargs and name != "self" and p.default is inspect.Parameter.empty and p.kind == p.POSITIONAL_OR_KEYWORD:
            kwargs[name] = None
    kwargs.update({k: v for k, v in extra.items() if k in params})
    vae = parts.get("vae")
    if vae is not None and getattr(vae.config, "force_upcast", False):
        # SDXL's image-to-image moves the VAE to float32 around the encode (`vae.to`), which the
        # engine, holding the weights in its own copies at the computation dtype, must not see
        import torch

        if getattr(vae, "dtype", None) != torch.float16:
            vae.register_to_config(force_upcast=False)
    out = cls(**kwargs)
    out.__dict__["_engine_device"] = pipe.__dict__["_engine_device"]
    out.set_progress_bar_config(disable=True)
    return out
