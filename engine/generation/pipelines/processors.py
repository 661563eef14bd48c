"""Qwen2.5-VL's processor (Qwen-Image-Edit) without torchvision.

`Qwen2VLProcessor.from_pretrained` also builds a video processor, which needs torchvision; the
edit pipeline never passes video. Without torchvision the processor is built from its tokenizer
and the PIL image processor, with no video processor (the argument check that would import the
video classes is skipped for that one argument).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def processor_without_video(cls: type, folder: Path) -> Any:
    """`cls` (a transformers vision-language processor) from `folder`, image + text only."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    image_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = image_cls.from_pretrained(folder)
    original = cls.check_argument_for_proper_class

    def check(self: Any, name: str, arg: Any) -> Any:
        return arg if name == "video_processor" and arg is None else original(self, name, arg)

    sub = type(cls.__name__, (cls,), {"__module__": cls.__module__, "check_argument_for_proper_class": check})
    return sub(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)


def tokenizer_as_processor(folder: Path) -> Any:
    """A text-only stand-in for a processor whose class cannot be built here (FLUX.2 [dev]'s
    PixtralProcessor needs torchvision): the folder's tokenizer, with the processor's chat
    template. Flux2Pipeline only tokenizes chat-formatted text with it (`apply_chat_template`);
    reference images go to the VAE, not through the processor (only the optional caption
    upsampling would show the text encoder images, and it then fails with transformers' message)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = folder / "chat_template.jinja"
    if tokenizer.chat_template is None and template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer
