"""A real-size replica's tokenizers agree with its real configs (issue #17).

The replica's vocabulary is small, but the real text-encoder config names token ids: Qwen2.5-VL
finds the vision tower's features by `image_token_id` (151655). With the special tokens where a
small vocabulary puts them, the edit model's prompt held no image token and the real-size run
of Qwen-Image-Edit-2509 failed with "Image features and image tokens do not match".
"""

from __future__ import annotations

from transformers import AutoTokenizer

from model_registry import get_model
from model_registry.sizes import load_component_configs
from tools import replica


def test_qwen_image_edit_replica_writes_the_image_token_at_the_configs_id(tmp_path):
    root = tmp_path / "qwen-image-edit-2509"
    root.mkdir()
    replica._write_pipeline_files(root, "qwen-image-edit")
    te = get_model("qwen-image-edit-2509").components["text_encoder"]
    te_config = load_component_configs()[te.config_id]  # the real config the replica writes
    for folder in ("processor", "tokenizer"):
        tok = AutoTokenizer.from_pretrained(root / folder)
        assert tok.convert_tokens_to_ids("<|image_pad|>") == te_config["image_token_id"]
        assert tok.convert_tokens_to_ids("<|vision_start|>") == te_config["vision_start_token_id"]
        ids = tok("a <|vision_start|><|image_pad|><|vision_end|> b").input_ids
        assert te_config["image_token_id"] in ids
