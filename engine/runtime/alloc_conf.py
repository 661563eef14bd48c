"""PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before CUDA starts, unless the user set one.

Streaming allocates and frees slots and activations of changing sizes every step. With fixed-size
segments the caching allocator strands the gaps between them (fragmentation: reserved but not
usable); expandable segments grow one mapping instead. The allocator reads its config once, when
CUDA starts, so the engine sets it on import (engine/__init__.py), torch-free. Linux only: other
platforms warn that they do not support it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch 2.9's new name
VALUE = "expandable_segments:True"


def configure_allocator(environ: MutableMapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Set PYTORCH_CUDA_ALLOC_CONF unless the user set an allocator config (either name), CUDA
    already started (too late to matter) or the platform is not Linux. True when it was set."""
    env = os.environ if environ is None else environ
    if (platform or sys.platform) != "linux" or any(env.get(name) for name in NAMES):
        return False
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is not None and getattr(cuda, "is_initialized", lambda: False)():
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = VALUE
    return True
