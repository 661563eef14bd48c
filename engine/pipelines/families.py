"""What the engine needs to know about each pipeline family.

Keyed by the diffusers pipeline class that a repo's model_index.json names, so a local repo
path is enough to build a pipeline. `stage` of each weighted component decides the stage
switching (DiffSynth style): text encoders for "encode", the denoiser for "denoise", the VAE
for "decode"; only the components of the running stage are onloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"
STAGES: tuple[str, ...] = (ENCODE, DENOISE, DECODE)


@dataclass(frozen=True)
class PipelineFamily:
    name: str
    pipeline_class: str
    denoiser: str  # component name of the transformer / UNet
    text_encoders: tuple[str, ...]
    guidance_arg: str = "guidance_scale"  # the __call__ argument the UI's "guidance" goes to
    # The pipeline itself runs cond + uncond as one batched forward (SDXL, Z-Image) ...
    native_batched_cfg: bool = False
    # ... or we batch its two passes per step (see engine.pipelines.cfg).
    pair_batched_cfg: bool = False
    # Does the family use the negative prompt at all (with the guidance given)?
    uses_negative_prompt: bool = True
    # Guidance at or below this does no classifier-free guidance (one pass per step).
    cfg_threshold: float = 1.0
    sampler: str = "Euler (flow matching)"

    def stage_of(self, component: str) -> str:
        if component == self.denoiser:
            return DENOISE
        if component in self.text_encoders:
            return ENCODE
        if component == "vae":
            return DECODE
        return ENCODE

    def does_cfg(self, guidance: float, negative_prompt: str = "") -> bool:
        """Classifier-free guidance at this guidance? (Qwen-Image: with an empty negative prompt
        we pass " ", as its pipeline documents, so CFG does not depend on the negative prompt.)"""
        return self.uses_negative_prompt and guidance > self.cfg_threshold


FAMILIES: dict[str, PipelineFamily] = {
    f.pipeline_class: f
    for f in (
        PipelineFamily(
            "qwen-image", "QwenImagePipeline", "transformer", ("text_encoder",), guidance_arg="true_cfg_scale", pair_batched_cfg=True
        ),
        PipelineFamily("z-image", "ZImagePipeline", "transformer", ("text_encoder",), native_batched_cfg=True, cfg_threshold=0.0),
        # FLUX.1 [schnell/dev] is guidance-distilled: one pass per step, no negative prompt.
        PipelineFamily("flux1", "FluxPipeline", "transformer", ("text_encoder", "text_encoder_2"), uses_negative_prompt=False),
        # FLUX.2 [klein] distilled: one pass per step, no negative prompt.
        PipelineFamily("flux2-klein", "Flux2KleinPipeline", "transformer", ("text_encoder",), uses_negative_prompt=False),
        PipelineFamily(
            "sdxl",
            "StableDiffusionXLPipeline",
            "unet",
            ("text_encoder", "text_encoder_2"),
            native_batched_cfg=True,
            sampler="Euler",
        ),
    )
}

FAMILIES_BY_NAME: dict[str, PipelineFamily] = {f.name: f for f in FAMILIES.values()}


def family_for(pipeline_class: str) -> PipelineFamily:
    try:
        return FAMILIES[pipeline_class]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ValueError(f"pipeline class {pipeline_class!r} is not supported; supported: {known}") from None
