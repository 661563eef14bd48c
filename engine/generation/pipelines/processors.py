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
