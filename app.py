"""lowvram-studio web app: parse the flags, build the engine facade, launch the Gradio UI.

    python app.py                      # http://127.0.0.1:7860, offline demo model
    python app.py --listen --port 8080 --auth me:secret
    python app.py --model-dir /data/models --source modelscope
    python app.py --doctor [--json]    # check this machine and print the settings it recommends

On Hugging Face Spaces this file is the `app_file`; Spaces sets GRADIO_SERVER_NAME/PORT, which
are used when --host/--port are not given.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MODEL_DIR = Path("models")

# Offline by default: no analytics or version check (set before gradio is imported).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`user:pass`, several separated by commas, or a file with one `user:pass` a line."""
    if not value:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        entries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
        where = f"in {path}"
    else:
        entries = [e.strip() for e in value.split(",") if e.strip()]
        where = "in --auth"
    pairs: list[tuple[str, str]] = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise argparse.ArgumentTypeError(f"{entry!r} {where} is not user:password")
        pairs.append((user, password))
    if not pairs:
        raise argparse.ArgumentTypeError(f"no user:password {where}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="lowvram-studio: run large image models on small GPUs.")
    p.add_argument("--host", default=None, help=f"address to listen on (default {DEFAULT_HOST}, or $GRADIO_SERVER_NAME)")
    p.add_argument("--listen", action="store_true", help="listen on all interfaces (same as --host 0.0.0.0)")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}, or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (needs internet)")
    p.add_argument("--auth", default=None, metavar="USER:PASS|FILE",
                   help="require a login: user:pass (comma-separated for several) or a file of user:pass lines")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where models are stored: the demo model, local model folders, and downloads (in the hubs' cache "
                        "layouts under DIR/huggingface/hub and DIR/modelscope). Default: ./models for the demo and local "
                        "folders, downloads in the standard Hugging Face / ModelScope caches")
    p.add_argument("--outputs-dir", type=Path, default=Path("outputs"), help="where PNGs are saved (default ./outputs)")
    p.add_argument("--lora-dir", type=Path, default=Path("loras"),
                   help="LoRA .safetensors files offered by the picker (default ./loras; hf:owner/repo ones are downloaded into it)")
    p.add_argument("--source", choices=("hf", "modelscope"), default="hf", help="download hub (default hf)")
    p.add_argument("--pinned-ram-gb", default=None, metavar="GB",
                   help="host RAM the engine may pin for fast GPU copies (default: half the available RAM, "
                        "or $LOWVRAM_PINNED_RAM_GB)")
    p.add_argument("--doctor", action="store_true",
                   help="check this machine (GPU, kernels, VRAM, pinnable RAM, link and disk speed, a short streamed run) "
                        "and print the settings it recommends, then exit")
    p.add_argument("--json", action="store_true", help="with --doctor: print the report as JSON (to attach to a bug report)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the stored form of quantized models (FP8/int8/NF4, bf16 of F32 checkpoints) is cached, "
                        "one folder per model (default: .lowvram-cache next to each model's folder, or $LOWVRAM_CACHE_DIR)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    # downloads go into --model-dir only when it is given; else the standard hub caches
    args.download_dir = args.model_dir
    if args.model_dir is None:
        args.model_dir = DEFAULT_MODEL_DIR
    try:
        args.auth = parse_auth(args.auth)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--auth: {exc}")
    if args.json and not args.doctor:
        parser.error("--json goes with --doctor")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    from engine.transfer.pinned import PINNED_RAM_ENV, parse_pinned_ram_gb

    try:
        if args.pinned_ram_gb is not None:
            args.pinned_ram_gb = parse_pinned_ram_gb(args.pinned_ram_gb, "--pinned-ram-gb")
        elif os.environ.get(PINNED_RAM_ENV):
            parse_pinned_ram_gb(os.environ[PINNED_RAM_ENV])  # a bad value fails here, not mid-generation
    except ValueError as exc:
        parser.error(str(exc))
    return args


def launch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` from the parsed flags."""
    if args.listen:
        host = "0.0.0.0"
    else:
        host = args.host or os.environ.get("GRADIO_SERVER_NAME") or DEFAULT_HOST
    port = args.port if args.port is not None else int(os.environ.get("GRADIO_SERVER_PORT") or DEFAULT_PORT)
    auth = None
    if args.auth:  # checked with a lockout per user after repeated failures (ui/login.py)
        from ui.login import Login

        auth = Login(args.auth).check
    return {
        "server_name": host,
        "server_port": port,
        "share": bool(args.share),
        "auth": auth,
        "allowed_paths": [str(Path(args.outputs_dir).resolve())],
    }


def run_doctor(args: argparse.Namespace) -> None:
    """`--doctor`: the system check (engine.generation.doctor), printed; no UI is built."""
    import json

    from engine.generation.doctor import render_text, run_doctor

    if args.pinned_ram_gb is not None:
        from engine.transfer.pinned import PINNED_RAM_ENV

        os.environ[PINNED_RAM_ENV] = str(args.pinned_ram_gb)
    report = run_doctor(args.model_dir)
    print(json.dumps(report, indent=2) if args.json else render_text(report))


def main(argv: Sequence[str] | None = None, studio_factory: Callable[..., Any] | None = None) -> None:
    args = parse_args(argv)
    if args.doctor:
        run_doctor(args)
        return
    try:  # Hugging Face ZeroGPU wants `spaces` imported before torch touches CUDA
        import spaces  # noqa: F401
    except ImportError:
        pass
    if studio_factory is None:
        from engine.generation.studio import Studio as studio_factory  # noqa: N813

    import ui

    if args.pinned_ram_gb is not None:  # read by engine.pinned when the first GPU component streams
        from engine.transfer.pinned import PINNED_RAM_ENV

        os.environ[PINNED_RAM_ENV] = str(args.pinned_ram_gb)
    if args.cache_dir is not None:  # read by engine.storage.form_cache at every load
        from engine.storage.form_cache import CACHE_DIR_ENV

        os.environ[CACHE_DIR_ENV] = str(args.cache_dir.expanduser().resolve())
    args.model_dir.mkdir(parents=True, exist_ok=True)
    args.outputs_dir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"source": args.source}
    if args.download_dir is not None:
        kwargs["download_dir"] = args.download_dir
    try:
        if "lora_dir" in inspect.signature(studio_factory).parameters:
            kwargs["lora_dir"] = args.lora_dir
    except (TypeError, ValueError):  # a factory without a signature
        pass
    studio = studio_factory(args.model_dir, args.outputs_dir, **kwargs)
    demo = ui.build_demo(studio)
    ui.launch(demo, **launch_kwargs(args))


if __name__ == "__main__":
    main(sys.argv[1:])
