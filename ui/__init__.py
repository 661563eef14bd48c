"""The Gradio app. Never moves tensors: it talks to the engine only through `engine.generation.studio.Studio`.

    from ui import build_demo, launch
    launch(build_demo(studio), server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

from typing import Any

from .layout import CSS, build_demo

__all__ = ["CSS", "build_demo", "launch"]


def launch(demo, **launch_kwargs: Any):
    """Queue (one generation at a time, positions shown to waiting tabs) and serve."""
    launch_kwargs.setdefault("css", CSS)
    launch_kwargs.setdefault("ssr_mode", False)
    launch_kwargs.setdefault("footer_links", ["api", "settings"])
    return demo.queue(default_concurrency_limit=1, max_size=64).launch(**launch_kwargs)
