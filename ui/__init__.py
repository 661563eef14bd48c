"""The Gradio app. Never moves tensors: it talks to the engine only through `engine.generation.studio.Studio`.

    from ui import build_demo, launch
    launch(build_demo(studio), server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

from typing import Any

from .layout import CSS, HEAD, build_demo

__all__ = ["CSS", "HEAD", "MAX_UPLOAD", "build_demo", "launch"]

#: Gradio's upload limit (every upload route): input images up to the engine's own limit
#: (engine.generation.input_images.MAX_IMAGE_BYTES, 20 MB) get through, with 4 MB of slack so a file
#: just over it gets the engine's readable message; anything larger Gradio refuses itself.
MAX_UPLOAD = 24 * 1024 * 1024


def launch(demo, **launch_kwargs: Any):
    """Queue (one generation at a time, positions shown to waiting tabs) and serve."""
    launch_kwargs.setdefault("css", CSS)
    launch_kwargs.setdefault("head", HEAD)  # the page's own script: results dragged into the input
    launch_kwargs.setdefault("ssr_mode", False)
    launch_kwargs.setdefault("footer_links", ["api", "settings"])
    launch_kwargs.setdefault("max_file_size", MAX_UPLOAD)
    return demo.queue(default_concurrency_limit=1, max_size=64).launch(**launch_kwargs)
