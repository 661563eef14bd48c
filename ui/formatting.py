"""Turning engine data into text for the page. Pure functions: no Gradio, no torch."""

from __future__ import annotations

import html
from typing import Any, Iterable, Mapping, Sequence

from engine.generation.types import (
    LAYER_STATES,
    GenerationEvent,
    HardwareInfo,
    MemoryEstimate,
    ModelChoice,
    TelemetrySnapshot,
)

PHASE_LABELS = {
    "queued": "Starting",
    "downloading": "Downloading the model",
    "loading": "Loading the model",
    "encoding": "Encoding the prompt",
    "compiling": "Compiling (first run of a size)",
    "denoising": "Denoising",
    "decoding": "Decoding the image",
    "done": "Done",
    "cancelled": "Cancelled",
    "error": "Failed",
}


def gb(value: float | None, digits: int = 2) -> str:
    """`1.234` -> `"1.23 GB"`; None -> `"n/a"`."""
    return "n/a" if value is None else f"{value:.{digits}f} GB"


def mib(nbytes: int) -> str:
    """`3 * 2**20` -> `"3.0 MiB"` (LoRA factors are small)."""
    return f"{nbytes / 2**20:.1f} MiB"


def lora_choices(choices) -> list[tuple[str, str]]:
    """Dropdown (label, id) pairs for LoRA picker slots: name, family, size."""
    return [(f"{c.id} · {c.family or 'family unknown'} · {mib(c.size_bytes)}", c.id) for c in choices]


def model_label(choice: ModelChoice, cached: Sequence[Any] = ()) -> str:
    """Dropdown label: name, size, whether the weights are on disk, and the stored forms kept
    in the cache (engine.storage.form_cache.CachedForm: form and bytes) with their size."""
    if choice.is_demo:
        where = "built in"
    elif choice.downloaded:
        where = "downloaded"
    else:
        where = "not downloaded: downloads on first use"
    size = f"{choice.size_gb:.1f} GB" if choice.size_gb >= 0.1 else f"{choice.size_gb * 1000:.1f} MB"
    group = f"{choice.family} › " if choice.family and not choice.is_demo else ""  # the picker's family groups
    return f"{group}{choice.name} · {size} · {where}" + cached_label(cached)


def cached_label(cached: Sequence[Any]) -> str:
    """" · cached: FP8 6.2 GB, NF4 3.4 GB" (decimal GB, every component of a form together)."""
    sizes: dict[str, int] = {}
    for c in cached:
        sizes[c.form] = sizes.get(c.form, 0) + c.nbytes
    if not sizes:
        return ""
    return " · cached: " + ", ".join(f"{form.upper() if form != 'bf16' else form} {n / 1e9:.1f} GB" for form, n in sizes.items())


def model_choices(models: Sequence[ModelChoice], cached: Mapping[str, Sequence[Any]] | None = None) -> list[tuple[str, str]]:
    """(label, id) pairs for gr.Dropdown (`cached`: each model's cached stored forms)."""
    return [(model_label(m, (cached or {}).get(m.id, ())), m.id) for m in models]


def quantize_info(forms: Iterable[Any]) -> str:
    """The "Quantize" dropdown's note: each form's size against bf16 (engine.storage.forms)."""
    sizes = ", ".join(f"{f.name} ~{f.size_factor:.2g}x" for f in forms)
    return f"On the fly: {sizes} the memory; wins over FP8"


def hardware_note(hw: HardwareInfo) -> str:
    """One line under the VRAM controls."""
    if not hw.has_gpu:
        return (
            f"No GPU detected: generation runs on the CPU ({gb(hw.ram_total_gb, 1)} RAM), "
            "so the VRAM limit does not apply."
        )
    auto = gb(hw.auto_vram_limit_gb, 1)
    free = f", {gb(hw.vram_free_gb, 1)} free" if getattr(hw, "vram_free_gb", None) is not None else ""
    note = f"{hw.gpu_name or 'GPU'} with {gb(hw.vram_total_gb, 1)} VRAM{free}. Auto uses {auto} (the free VRAM minus a margin)."
    return " ".join([note, *getattr(hw, "warnings", ())])


def estimate_markdown(est: MemoryEstimate, hw: HardwareInfo | None = None) -> str:
    """The estimate box shown before a run. On a host without a GPU the columns say what they
    mean there: the computation runs in RAM, and nothing is streamed to a GPU (with disk offload,
    what is read from the files per step)."""
    verdict = "Fits" if est.fits else "Does not fit"
    if hw is not None and not hw.has_gpu:
        head = ["RAM (weights + computation, CPU)", "Disk"]
        cells = [gb(est.ram_gb), gb(est.disk_gb)]
        if est.streamed_gb_per_step:
            head.append("Read per step")
            cells.append(gb(est.streamed_gb_per_step))
    else:
        head = ["VRAM", "RAM", "Disk", "Streamed per step"]
        cells = [gb(est.vram_gb), gb(est.ram_gb), gb(est.disk_gb), gb(est.streamed_gb_per_step)]
    lines = [
        f"**{verdict}** with these settings.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(head),
        "| " + " | ".join(cells) + " |",
    ]
    if getattr(est, "lora_bytes", 0):
        lines.append("")
        lines.append(f"LoRAs: {mib(est.lora_bytes)} of factors on the computation device (included in VRAM).")
    if est.storage:
        computes = f" Computes in {est.compute_dtype}." if getattr(est, "compute_dtype", "") else ""
        lines += ["", f"Weights stored as {est.storage}.{computes}"]
    for warning in est.warnings:
        lines.append("")
        lines.append(f"**Warning:** {warning}")
    if not est.fits and est.smallest_feasible_vram_limit_gb is not None and (hw is None or hw.has_gpu):
        lines.append("")
        lines.append(f"Smallest VRAM limit that works: {gb(est.smallest_feasible_vram_limit_gb)}.")
    return "\n".join(lines)


def suggestion_markdown(suggestion: Any) -> str:
    """The line under "Fit to this machine": what it chose and why (or why nothing fits)."""
    if suggestion is None:
        return ""
    mark = "Applied" if suggestion.fits else "No fit"
    return f"**{mark}:** {html.escape(suggestion.reason)}"


def cpu_limit_note(limit_gb: float | None) -> str:
    """Under the estimate on a host without a GPU, while Fit's RAM bound applies."""
    return "" if limit_gb is None else f"Disk offload keeps at most {limit_gb:g} GB resident in RAM (from Fit to this machine)."


def eta_text(seconds: float | None) -> str:
    """"1 min 05 s left" / "12 s left"; "–" when not known."""
    if seconds is None:
        return "–"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min left"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s left"
    return f"{s} s left"


def estimate_error_markdown(message: str) -> str:
    """The estimate box when the settings themselves are invalid."""
    return f"**Cannot run these settings.**\n\n{message}"


def _used_total(used: float | None, total: float | None) -> str:
    if used is None and total is None:
        return "n/a (no GPU)"
    return f"{gb(used)} / {gb(total)}"


def live_panel_html(snapshot: TelemetrySnapshot | None, event: GenerationEvent | None, owner: str) -> str:
    """The live panel: memory, phase, step, speed and layer states per component.

    `owner` says whose run the panel shows ("this tab", "another tab", or "" when idle).
    Every number sits in an element with a `data-k` attribute so tests can read it.
    """

    def cell(key: str, text: str) -> str:
        return f'<span data-k="{key}">{html.escape(text)}</span>'

    phase = PHASE_LABELS.get(event.phase, event.phase) if event else "Idle"
    if event and owner and event.phase not in ("done", "cancelled", "error"):
        phase = f"{phase} ({owner})"
    step = f"{event.step}/{event.total_steps}" if event and event.total_steps else "–"
    eta = eta_text(event.eta_seconds) if event and event.phase == "denoising" and event.eta_seconds is not None else "–"
    sps = f"{event.seconds_per_step:.2f} s" if event and event.seconds_per_step else "–"
    vram = _used_total(snapshot.vram_used_gb, snapshot.vram_total_gb) if snapshot else "n/a"
    ram = _used_total(snapshot.ram_used_gb, snapshot.ram_total_gb) if snapshot else "n/a"
    streamed = "–"
    if snapshot and snapshot.streamed_bytes_last_step:
        streamed = gb(snapshot.streamed_bytes_last_step / 1e9)
    msg = event.message if event and event.message else ""

    rows = [
        ("Phase", cell("phase", phase)),
        ("Step", f'{cell("step", step)} · {cell("eta", eta)}'),
        ("Seconds per step", cell("sps", sps)),
        ("VRAM used / total", cell("vram", vram)),
        ("RAM used / total", cell("ram", ram)),
        ("Streamed last step", cell("streamed", streamed)),
        ("Weights", cell("storage", (snapshot.storage if snapshot else "") or "–")),
    ]
    if snapshot and getattr(snapshot, "pinned_limit_bytes", None) is not None:
        pinned = f"{gb(snapshot.pinned_bytes / 1024**3)} of {gb(snapshot.pinned_limit_bytes / 1024**3)} allowed"
        rows.append(("Pinned RAM", cell("pinned", pinned)))
    if snapshot and getattr(snapshot, "lora_bytes", 0):
        rows.append(("LoRA factors", cell("lora", mib(snapshot.lora_bytes))))
    if snapshot and getattr(snapshot, "vram_other_gb", None) is not None:  # what Auto leaves to them
        rows.append(("VRAM held by other programs", cell("vram_other", gb(snapshot.vram_other_gb))))
    if snapshot and getattr(snapshot, "compute_dtype", ""):
        rows.append(("Computes in", cell("compute_dtype", snapshot.compute_dtype)))
    head = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    out = [f'<table class="lvs-stats">{head}</table>']
    if msg:
        out.append(f'<p class="lvs-msg" data-k="message">{html.escape(msg)}</p>')
    out.append(layer_states_html(snapshot.layer_states if snapshot else {}))
    return "\n".join(out)


def layer_states_html(layer_states: dict[str, dict[str, int]]) -> str:
    """Table: one row per component, one column per state (number of layers)."""
    header = "".join(f"<th>{s}</th>" for s in LAYER_STATES)
    if not layer_states:
        body = f'<tr><td colspan="{len(LAYER_STATES) + 1}"><i>No model loaded yet</i></td></tr>'
    else:
        body = ""
        for component, counts in layer_states.items():
            name = html.escape(component)
            cells = "".join(
                f'<td data-k="layers:{name}:{s}">{int(counts.get(s, 0))}</td>' for s in LAYER_STATES
            )
            body += f"<tr><th>{name}</th>{cells}</tr>"
    return f'<table class="lvs-layers"><tr><th>Layers per state</th>{header}</tr>{body}</table>'


def history_rows(samples: Iterable[tuple[float, float | None, float]]) -> list[dict[str, Any]]:
    """(seconds, vram_gb, ram_gb) samples -> long-form rows for gr.LinePlot."""
    rows: list[dict[str, Any]] = []
    for t, vram, ram in samples:
        if vram is not None:
            rows.append({"seconds": round(t, 2), "GB": round(vram, 3), "memory": "VRAM used"})
        rows.append({"seconds": round(t, 2), "GB": round(ram, 3), "memory": "RAM used"})
    return rows


def caption(settings: dict[str, Any]) -> str:
    """Short gallery caption of a result."""
    parts = []
    for key, fmt in (("model", "{}"), ("width", "{}"), ("height", "×{}"), ("steps", " · {} steps"), ("seed", " · seed {}")):
        if settings.get(key) is not None:
            parts.append(fmt.format(settings[key]))
    if not parts:
        return ""
    first, rest = parts[0], "".join(parts[1:])
    return f"{first} · {rest}" if rest else first


# --- input images ----------------------------------------------------------------------------
def image_mode(choice) -> str:
    return getattr(choice, "image_mode", "none") if choice else "none"


def takes_images(choice) -> bool:
    """Does the model take any input image (else the page hides the input)?"""
    return image_mode(choice) != "none"


def image_note_markdown(choice, set_aside: int = 0) -> str:
    """What the selected model does with input images (its own limit on their number);
    `set_aside`: input images kept back while this model (which takes none) is chosen."""
    mode, n = image_mode(choice), getattr(choice, "max_images", 0) if choice else 0
    if mode == "img2img":
        text = "Image-to-image: <b>1</b> input image (upload, paste, or drag a result in; it is resized to the output size), with a strength."
    elif mode == "reference":
        text = f"Edit: up to <b>{n}</b> reference image{'s' if n != 1 else ''} (upload, paste, or drag results in); no strength."
    else:
        text = "This model takes no input image: it generates from the prompt alone."
        if set_aside:
            one = set_aside == 1
            text += (f" The <b>{set_aside}</b> input image{'' if one else 's'} {'is' if one else 'are'} set aside, not used:"
                     f" {'it comes' if one else 'they come'} back when you choose a model that takes images.")
        return f'<p class="lvs-msg">{text}</p>'
    return f'<p class="lvs-msg">{text} Files up to 20 MB.</p>'
