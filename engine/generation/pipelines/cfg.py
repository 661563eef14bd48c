"""Classifier-free guidance as ONE batched denoiser forward per step.

Qwen-Image's pipeline runs true CFG as two transformer calls per step (cond, then uncond with the
negative prompt). With streamed weights that moves every streamed byte over the bus twice per step.
`CfgPairBatcher` is a named hook on the transformer's `forward` (engine.layers.hooks; outside the
engine's step hook, so the batched forward is one step; `remove_hook(model, CFG_HOOK)` takes it
off). It is primed with the cond and
uncond text embeddings the pipeline will be called with; when the cond call comes, it pads both
prompt embeddings to a common length (masks mark the padding, which the Qwen-Image attention
masks out as keys), runs one forward with batch [cond, uncond], returns the cond half and keeps
the uncond half for the uncond call that follows with the same latents and timestep.

Every call is checked against what was primed (same embeddings, same latents object, same
timestep); anything unexpected runs a normal forward, so the batcher can never return a wrong
result, only miss a chance to batch. The batching is the same under every memory strategy, so
images are identical across strategies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.layers.hooks import ModelHook, get_hook, register_hook

CFG_HOOK = "lowvram.cfg_pair_batcher"


def cfg_batch(family: Any, guidance: float, negative_prompt: str) -> int:
    """The denoiser's batch per forward: 2 where classifier-free guidance runs cond and uncond as
    one batch (the family's pipeline does, or `CfgPairBatcher` makes it), else 1. The pipeline's
    activation reserve and the estimates size by it."""
    batched = family.pair_batched_cfg or family.native_batched_cfg
    return 2 if batched and family.does_cfg(guidance, negative_prompt) else 1


def _bool_mask(mask: torch.Tensor | None, embeds: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    return mask.to(device=embeds.device, dtype=torch.bool)


def pad_and_stack(
    embeds: list[torch.Tensor], masks: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad [B, L_i, D] embeddings with zeros to max L, concatenate on the batch dim, with a bool mask."""
    length = max(e.shape[1] for e in embeds)
    out_e, out_m = [], []
    for e, m in zip(embeds, masks):
        m = _bool_mask(m, e)
        pad = length - e.shape[1]
        if pad:
            e = torch.cat([e, e.new_zeros(e.shape[0], pad, e.shape[2])], dim=1)
            m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
        out_e.append(e)
        out_m.append(m)
    return torch.cat(out_e, dim=0), torch.cat(out_m, dim=0)


def _same(a: torch.Tensor | None, a_mask: torch.Tensor | None, b: torch.Tensor, b_mask: torch.Tensor | None) -> bool:
    if a is None or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a is not b and not torch.equal(a, b.to(a.device)):
        return False
    return torch.equal(_bool_mask(a_mask, a), _bool_mask(b_mask, b).to(a.device))


class CfgPairBatcher(ModelHook):
    """Batches a Qwen-Image transformer's cond/uncond call pair into one forward."""

    name = CFG_HOOK
    methods = ("forward",)

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.primed: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None] | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, Any] | None = None
        self._inner: Callable[..., Any] | None = None
        self.real_forwards = 0  # forwards that ran the network
        self.batched_forwards = 0  # of them, batched cond+uncond
        self.served_from_batch = 0  # uncond calls answered from a batched forward

    # --- installation -------------------------------------------------------------------------
    @classmethod
    def install(cls, model: torch.nn.Module) -> CfgPairBatcher:
        existing = get_hook(model, CFG_HOOK)
        if isinstance(existing, CfgPairBatcher):
            return existing
        batcher = cls(model)
        register_hook(model, batcher)
        return batcher

    def prime(self, cond: torch.Tensor, cond_mask: torch.Tensor | None, uncond: torch.Tensor, uncond_mask: torch.Tensor | None) -> None:
        self.primed = (cond, cond_mask, uncond, uncond_mask)
        self._pending = None

    def clear(self) -> None:
        self.primed = None
        self._pending = None

    # --- the call -----------------------------------------------------------------------------
    def _run(self, *args: Any, **kwargs: Any) -> Any:
        self.real_forwards += 1
        assert self._inner is not None
        return self._inner(*args, **kwargs)

    def call(self, method: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._inner = inner
        try:
            return self._batched(*args, **kwargs)
        finally:
            self._inner = None

    def _batched(self, *args: Any, **kwargs: Any) -> Any:
        if self.primed is None or args:
            return self._run(*args, **kwargs)
        cond, cond_mask, uncond, uncond_mask = self.primed
        hidden = kwargs.get("hidden_states")
        timestep = kwargs.get("timestep")
        ehs = kwargs.get("encoder_hidden_states")
        mask = kwargs.get("encoder_hidden_states_mask")
        return_dict = kwargs.get("return_dict", True)
        if hidden is None or timestep is None or ehs is None:
            return self._run(*args, **kwargs)

        pending, self._pending = self._pending, None
        if pending is not None:
            p_hidden, p_timestep, out = pending
            if hidden is p_hidden and torch.equal(timestep, p_timestep) and _same(ehs, mask, uncond, uncond_mask):
                self.served_from_batch += 1
                return self._wrap(out, return_dict)

        if not _same(ehs, mask, cond, cond_mask) or kwargs.get("controlnet_block_samples") is not None:
            return self._run(*args, **kwargs)

        batch = hidden.shape[0]
        n_uncond = uncond.shape[0]
        if n_uncond != ehs.shape[0]:
            return self._run(*args, **kwargs)
        enc, enc_mask = pad_and_stack([ehs, uncond.to(ehs.device)], [mask, uncond_mask])
        batched = dict(kwargs)
        batched["hidden_states"] = torch.cat([hidden, hidden], dim=0)
        batched["timestep"] = torch.cat([timestep, timestep], dim=0)
        if kwargs.get("guidance") is not None:
            batched["guidance"] = torch.cat([kwargs["guidance"], kwargs["guidance"]], dim=0)
        batched["encoder_hidden_states"] = enc
        batched["encoder_hidden_states_mask"] = enc_mask
        if kwargs.get("img_shapes") is not None:
            batched["img_shapes"] = list(kwargs["img_shapes"]) * 2
        batched["return_dict"] = False
        self.batched_forwards += 1
        out = self._run(**batched)[0]
        cond_out, uncond_out = out[:batch], out[batch:]
        self._pending = (hidden, timestep.clone(), uncond_out)
        return self._wrap(cond_out, return_dict)

    @staticmethod
    def _wrap(sample: torch.Tensor, return_dict: bool) -> Any:
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)
