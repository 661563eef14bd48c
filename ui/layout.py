"""The page: controls on the left, results and the live panel on the right.

    demo = build_demo(studio)
    demo.queue().launch()
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from engine.storage.forms import weights_choices

from . import formatting
from .formatting import image_mode, image_note_markdown, takes_images
from .handlers import GPU_QUEUE, Handlers, quantize_choices, quantize_forms
from .inputs import raw

TITLE = "lowvram-studio"
# GPU_QUEUE: one generation at a time, whoever asks (page or API)
LIVE_QUEUE = "telemetry"  # the live panel never waits behind a generation

CSS = """
.lvs-stats, .lvs-layers { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; margin-bottom: 0.5em; }
.lvs-stats th, .lvs-stats td, .lvs-layers th, .lvs-layers td { border-bottom: 1px solid var(--border-color-primary); padding: 2px 6px; text-align: left; }
.lvs-layers td { text-align: right; }
.lvs-msg { font-size: 0.9em; opacity: 0.8; margin: 0.2em 0; }
#live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.lvs-drop-msg { color: var(--error-text-color); opacity: 1; }
"""

#: The page's one script (ui/drop_results.js): a result dragged from the gallery onto the input
#: images is uploaded like a file (a browser drag from an <img> carries its URL, not a file).
HEAD = f"<script>\n{Path(__file__).with_name('drop_results.js').read_text(encoding='utf-8')}</script>"


def _limit(choice, key: str, fallback: float) -> float:
    return choice.limits.get(key, fallback) if choice else fallback


def _default(choice, key: str, fallback: Any) -> Any:
    value = choice.defaults.get(key) if choice else None
    return fallback if value is None else value


LORA_SLOTS = 3  # LoRAs the picker offers at once (the API takes any number)


def _any_files(component: Any) -> Any:
    """The API's `image`: one uploaded file or a list of them (Gradio still moves each upload
    into its cache and refuses paths outside it; ui.inputs.images reads the paths)."""
    schema = component.api_info()  # the list's schema (a single file is taken too)
    component.api_info = lambda: schema
    # Gradio copies a payload's files into its cache before any check of ours: only uploads may
    # be copied (a payload naming another file on the server is refused unread)
    copy = component.move_resource_to_block_cache

    def uploads_only(path: Any) -> Any:
        from .inputs import upload_folder

        if isinstance(path, str) and not path.startswith(("http://", "https://")):
            from pathlib import Path

            if not Path(path).resolve().is_relative_to(upload_folder()):
                raise gr.Error(
                    "image must be a file uploaded to this app (gradio_client.handle_file(path) uploads it); "
                    f"{Path(path).name!r} is not an upload.",
                    title="Cannot generate",
                    print_exception=False,
                )
        return copy(path)

    component.move_resource_to_block_cache = uploads_only
    if hasattr(component, "api_info_as_input"):
        component.api_info_as_input = lambda: schema
    component.data_model = None
    return component


def build_demo(studio: Any) -> gr.Blocks:
    """The whole app for one Studio (the engine facade)."""
    h = Handlers(studio)
    hw = h.hardware
    models = h.models()
    default_id = studio.default_model_id()
    current = next((m for m in models if m.id == default_id), models[0] if models else None)

    # delete_cache: Gradio's copies of served PNGs go after a day (the originals stay in outputs/)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            f"# {TITLE}\nRun large image models on small GPUs: layers are streamed to the GPU within the "
            "VRAM limit you set. The *demo* model works offline: it draws shapes and colours (\"a red circle on a blue background, on the left\"), trained in this repository."
        )
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------- controls
            with gr.Column(scale=5, min_width=340):
                model = gr.Dropdown(
                    choices=h.model_choices(),
                    value=current.id if current else None,
                    label="Model",
                    info="Name · size (bf16) · on disk or not · stored forms cached (a second load in that form is fast)",
                )
                # removes the chosen model's cached FP8/int8/NF4 forms (the next such load quantizes again)
                free_cache_btn = gr.Button("Free disk space", size="sm", elem_id="free-cache")
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="A lighthouse on a cliff at dawn, oil painting")
                negative_prompt = gr.Textbox(label="Negative prompt", lines=1, placeholder="blurry, low quality")
                with gr.Accordion("Input images", open=True, elem_id="input-accordion"):
                    input_images = gr.Gallery(
                        label="Input image(s)",
                        elem_id="input-images",
                        type="filepath",
                        interactive=True,
                        file_types=["image"],
                        columns=4,
                        height=170,
                        object_fit="contain",
                        # drop files on it, or paste; a result dragged onto it: ui/drop_results.js
                        sources=["upload", "clipboard"],
                        visible=takes_images(current),
                    )
                    with gr.Row(equal_height=True):
                        strength = gr.Slider(
                            label="Strength",
                            minimum=0.0,
                            maximum=1.0,
                            step=0.05,
                            value=0.6,
                            info="Image-to-image: 0 keeps the input, 1 ignores it",
                            elem_id="strength",
                            visible=image_mode(current) == "img2img",
                            scale=4,
                        )
                        use_result = gr.Button(
                            "Use result as input", scale=1, min_width=120, elem_id="use-result-btn",
                            visible=takes_images(current),
                        )
                    image_note = gr.Markdown(image_note_markdown(current), elem_id="image-note")
                with gr.Row():
                    multiple = int(_limit(current, "size_multiple", 16))
                    width = gr.Number(label="Width", value=_default(current, "width", 512), precision=0, step=multiple)
                    height = gr.Number(label="Height", value=_default(current, "height", 512), precision=0, step=multiple)
                with gr.Row():
                    steps = gr.Slider(
                        label="Steps",
                        minimum=_limit(current, "min_steps", 1),
                        maximum=_limit(current, "max_steps", 100),
                        step=1,
                        value=_default(current, "steps", 20),
                    )
                    guidance = gr.Slider(
                        label="Guidance",
                        minimum=_limit(current, "min_guidance", 0.0),
                        maximum=_limit(current, "max_guidance", 20.0),
                        step=0.1,
                        value=_default(current, "guidance", 4.0),
                    )
                with gr.Row(elem_id="seed-row", equal_height=True):
                    seed = gr.Number(label="Seed", value=-1, precision=0, info="-1 = random", scale=4)
                    random_seed = gr.Button("Random", scale=0, min_width=80)
                    reuse_seed = gr.Button("Last seed", scale=0, min_width=80)
                with gr.Accordion("LoRAs", open=False, elem_id="lora-picker"):
                    lora_ids = h.lora_choices(current.id if current else None)
                    lora_slots = []
                    for i in range(LORA_SLOTS):
                        with gr.Row(equal_height=True):
                            lora_slots.append(gr.Dropdown(
                                choices=lora_ids, value=None, label=f"LoRA {i + 1}", allow_custom_value=True, scale=3,
                                info="from the LoRA folder, for this model's family; or type hf:owner/repo" if i == 0 else None,
                                elem_id=f"lora-{i}",
                            ))
                            lora_slots.append(gr.Slider(label="Strength", minimum=-2, maximum=2, step=0.05, value=1.0, scale=2, elem_id=f"lora-strength-{i}"))
                    lora_refresh = gr.Button("Refresh LoRA list", size="sm")
                    lora_spec = gr.Textbox(visible=False, value="", elem_id="lora-spec")
                with gr.Accordion("Memory", open=True):
                    with gr.Row():
                        auto = gr.Checkbox(
                            label="Auto",
                            value=True,
                            interactive=hw.has_gpu,
                            info="Auto VRAM limit",
                            scale=1,
                        )
                        vram_slider = gr.Slider(
                            label="VRAM limit (GB)",
                            minimum=0,
                            maximum=round(hw.vram_total_gb, 1) if hw.has_gpu and hw.vram_total_gb else 1,
                            step=0.1,
                            value=round(hw.auto_vram_limit_gb or 0, 1) if hw.has_gpu else 0,
                            interactive=False,
                            info=formatting.hardware_note(hw),
                            scale=4,
                        )
                    with gr.Row():
                        fp8 = gr.Checkbox(label="FP8", value=False, info="Store weights in scaled FP8: half the memory")
                        quantize = gr.Dropdown(
                            label="Quantize", choices=list(quantize_choices()), value="off", elem_id="quantize",
                            info=formatting.quantize_info(quantize_forms()),
                        )
                        disk_offload = gr.Checkbox(
                            label="Disk offload", value=False, info="Keep offloaded weights on disk instead of RAM"
                        )
                        compile_on = gr.Checkbox(
                            label="Compile", value=False, elem_id="compile",
                            info="torch.compile the denoiser: the first run of a size compiles (cached on disk)",
                        )
                    with gr.Row(equal_height=True):
                        fit_btn = gr.Button("Fit to this machine", elem_id="fit-btn", scale=0, min_width=180)
                        fit_reason = gr.Markdown(elem_id="fit-reason", value="")
                    estimate = gr.Markdown(elem_id="estimate", value="Estimating…")
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel-btn", interactive=False, scale=1)
                with gr.Accordion("System check", open=False, elem_id="system-check"):
                    check_btn = gr.Button("System check", elem_id="system-check-btn", size="sm")
                    check_report = gr.Textbox(
                        label="Report (python app.py --doctor --json gives it as JSON)", lines=12, max_lines=40,
                        interactive=False, elem_id="system-check-report", buttons=["copy"],
                    )

            # ---------------------------------------------------------------- results + live
            with gr.Column(scale=6, min_width=380):
                gallery = gr.Gallery(
                    label="Results",
                    elem_id="gallery",
                    columns=3,
                    height=420,
                    object_fit="contain",
                    buttons=["download", "fullscreen"],
                    interactive=False,
                    type="filepath",
                )
                parameters = gr.Textbox(label="Parameters", lines=3, max_lines=8, interactive=False, elem_id="parameters")
                png_file = gr.File(label="PNG download (with its parameters inside)", interactive=False, elem_id="png-file")
                with gr.Group():
                    live = gr.HTML(formatting.live_panel_html(None, None, ""), elem_id="live-panel")
                    live_preview = gr.Image(
                        label="Preview", elem_id="live-preview", type="pil", format="png", height=256,
                        interactive=False, buttons=[],
                    )
                    preview_toggle = gr.Checkbox(
                        label="Live preview", value=True, elem_id="preview-toggle",
                        info="The image as it forms while denoising (a cheap projection of the latents, 1/8 of the size)",
                    )
                    chart = gr.LinePlot(
                        None,  # no frame yet: the first run's samples define the axes and colours
                        x="seconds",
                        y="GB",
                        color="memory",
                        color_map={"VRAM used": "#e4572e", "RAM used": "#2e86ab"},
                        title="Memory during the run",
                        x_title="seconds",
                        y_title="GB",
                        height=220,
                        elem_id="memory-chart",
                    )

        results = gr.State([])
        last_seed = gr.State(None)
        shown = gr.State(None)
        models_shown = gr.State(h.models_version)  # the model list version this tab shows
        model_shown = gr.State(current.id if current else None)  # the model whose defaults the controls hold
        preview_shown = gr.State(None)  # [run id, previews] this tab shows
        resident_limit = gr.State(None)  # no GPU: the RAM bound on what disk offload keeps resident (Fit)
        images_aside = gr.State(None)  # input images kept back while a model that takes none is chosen
        timer = gr.Timer(0.5)

        # ---------------------------------------------------------------- API-only endpoint
        with gr.Column(visible=False):
            # raw(): the payload reaches Handlers.generate as sent; ui.inputs checks every value
            api_inputs = [raw(c) for c in (
                gr.Textbox(label="prompt"),
                gr.Textbox(label="negative_prompt", value=""),
                gr.Dropdown(label="model", choices=[m.id for m in models], value=None, allow_custom_value=True),
                gr.Number(label="width", value=None, precision=0),
                gr.Number(label="height", value=None, precision=0),
                gr.Number(label="steps", value=None, precision=0),
                gr.Number(label="guidance", value=None),
                gr.Number(label="seed", value=-1, precision=0),
                gr.Number(label="vram_limit", value=None),
                gr.Checkbox(label="fp8", value=False),
                gr.Checkbox(label="disk_offload", value=False),
                gr.Textbox(label="loras", value="", info='comma-separated "id:strength", e.g. "ink:0.8, hf:owner/repo:0.5"'),
                gr.Dropdown(label="weights", choices=list(weights_choices()), value="auto"),
                _any_files(gr.File(label="image", file_count="multiple", file_types=["image"], value=None)),
                gr.Number(label="strength", value=None),
                gr.Checkbox(label="compile", value=False),
            )]
            api_outputs = [gr.Image(label="image", type="filepath", format="png"), gr.Textbox(label="parameters")]
            api_trigger = gr.Button("generate (API)")
            stream_outputs = [gr.Image(label="image", type="filepath", format="png"), gr.Textbox(label="status or parameters")]
            stream_trigger = gr.Button("generate_stream (API)")
            suggest_inputs = [raw(c) for c in (
                gr.Dropdown(label="model", choices=[m.id for m in models], value=None, allow_custom_value=True),
                gr.Number(label="width", value=None, precision=0),
                gr.Number(label="height", value=None, precision=0),
                gr.Number(label="steps", value=None, precision=0),
                gr.Number(label="guidance", value=None),
            )]
            suggest_output = gr.JSON(label="settings")
            suggest_trigger = gr.Button("suggest (API)")

        # ---------------------------------------------------------------- events
        controls = [model, width, height, steps, guidance, auto, vram_slider, fp8, disk_offload, lora_spec, quantize]
        private = {"api_visibility": "private"}

        gr.on(
            # the input images count too: their encodes and reference latents are activations
            triggers=[demo.load, resident_limit.change, input_images.change] + [c.change for c in controls],
            fn=h.estimate,
            inputs=controls + [resident_limit, input_images],
            outputs=estimate,
            show_progress="hidden",
            trigger_mode="always_last",
            concurrency_limit=None,
            concurrency_id="estimate",
            **private,
        )
        model.change(
            h.on_model_change, [model, model_shown], [width, height, steps, guidance, model_shown],
            show_progress="hidden", **private,
        )
        auto.change(h.on_auto_change, auto, vram_slider, queue=False, show_progress="hidden", **private)
        random_seed.click(h.random_seed, None, seed, queue=False, **private)
        reuse_seed.click(h.reuse_seed, last_seed, seed, queue=False, **private)
        gallery.select(h.select_result, results, [parameters, png_file], queue=False, **private)

        fit_btn.click(
            h.fit, [model, width, height, steps, guidance], [auto, vram_slider, fp8, disk_offload, fit_reason, resident_limit, quantize],
            concurrency_limit=None, concurrency_id="estimate", show_progress="hidden", **private,
        )
        # the reason line speaks of the model and size it was made for: gone when they change
        gr.on(triggers=[model.change, width.change, height.change], fn=lambda: ("", None), inputs=None,
              outputs=[fit_reason, resident_limit], queue=False, show_progress="hidden", **private)
        run_inputs = [prompt, negative_prompt, model, width, height, steps, guidance, seed,
                      auto, vram_slider, fp8, disk_offload, results, lora_spec, quantize, preview_toggle, resident_limit, input_images, strength, compile_on]
        # the picker slots make the `loras` string; the model's family filters what they offer
        gr.on(
            triggers=[c.change for c in lora_slots], fn=h.lora_spec, inputs=lora_slots, outputs=lora_spec,
            queue=False, show_progress="hidden", **private,
        )
        lora_dropdowns = lora_slots[0::2]
        gr.on(
            triggers=[model.change, lora_refresh.click], fn=h.on_lora_family, inputs=[model] + lora_dropdowns,
            outputs=lora_dropdowns, queue=False, show_progress="hidden", **private,
        )
        # a model that takes no image hides the input, its images set aside until one that does
        model.change(
            h.on_model_images, [model, input_images, images_aside],
            [strength, image_note, input_images, use_result, images_aside], show_progress="hidden", **private,
        )
        use_result.click(h.use_result_as_input, [png_file, input_images, model], input_images, queue=False, **private)
        # a new first input image sets the output size to its own, fitted to the model
        input_images.upload(h.size_from_images, [input_images, model], [width, height], queue=False, **private)
        run = generate_btn.click(h.arm, None, [generate_btn, cancel_btn], queue=False, **private).then(
            h.run_ui,
            run_inputs,
            [gallery, parameters, png_file, results, last_seed],
            concurrency_limit=1,
            concurrency_id=GPU_QUEUE,
            show_progress_on=[gallery],
            **private,
        )
        # .then() does not follow a failed event in this Gradio version: unlock on failure too
        run.then(h.disarm, None, [generate_btn, cancel_btn], queue=False, **private).then(
            h.refresh_models, model, model, queue=False, show_progress="hidden", **private
        )
        run.failure(h.disarm, None, [generate_btn, cancel_btn], queue=False, **private)
        # queued (so its message reaches the page) but in its own group: never waits for a generation
        cancel_btn.click(h.cancel, None, None, concurrency_limit=None, concurrency_id="control", **private)

        # measures the GPU too: waits its turn behind a generation
        check_btn.click(h.system_check, None, check_report, concurrency_limit=1, concurrency_id=GPU_QUEUE, **private)

        free_cache_btn.click(h.free_disk_space, model, model, queue=False, api_name="free_disk_space")
        # a fresh model list on every page load, and in every tab after any download
        demo.load(h.refresh_models, model, model, queue=False, show_progress="hidden", **private)
        demo.unload(h.tab_closed)
        timer.tick(
            h.tick,
            [shown, model, models_shown, preview_shown],
            [live, chart, shown, live_preview, preview_shown, model, models_shown],
            show_progress="hidden",
            concurrency_limit=None,
            concurrency_id=LIVE_QUEUE,
            **private,
        )

        api_trigger.click(
            h.generate,
            api_inputs,
            api_outputs,
            api_name="generate",
            concurrency_limit=1,
            concurrency_id=GPU_QUEUE,
        )
        stream_trigger.click(
            h.generate_stream,
            api_inputs,
            stream_outputs,
            api_name="generate_stream",
            concurrency_limit=1,
            concurrency_id=GPU_QUEUE,
        )
        suggest_trigger.click(
            h.suggest, suggest_inputs, suggest_output, api_name="suggest",
            concurrency_limit=None, concurrency_id="estimate",
        )
    h.blocks = demo
    return demo
