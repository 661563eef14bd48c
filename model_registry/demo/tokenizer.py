"""The demo's tokenizer: a Qwen3 byte-level BPE vocabulary trained locally, written as Z-Image ships it.

The merges are learned on a small built-in English corpus (deterministic: ties are broken by
the pair's text), so the demo needs no download. The helpers here (corpus, BPE training, JSON
and token-entry writers) are shared with the tests' tiny repos of the other families
(tests/fixtures/tiny_repos.py), which write CLIP, T5 and Qwen2.5-VL tokenizers with them.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CORPUS",
    "QWEN_SPECIAL",
    "QwenVocab",
    "added_token",
    "bpe_vocab",
    "qwen_added_tokens_decoder",
    "qwen_vocab",
    "strip_special",
    "train_byte_bpe",
    "write_json",
    "write_merges",
    "write_qwen3_tokenizer",
]

# Small English corpus for training the tokenizers.  It contains the Qwen-Image
# prompt template words so that the template prefix tokenizes to the same 34
# tokens as with the real Qwen tokenizer (the pipeline drops exactly 34).
CORPUS: tuple[str, ...] = (
    (
        "Describe the image by detailing the color, shape, size, texture, quantity, text, "
        "spatial relationships of the objects and background:"
    ),
    "system",
    "user",
    "assistant",
    "A photo of a cat sitting on a red chair in a sunny garden.",
    "An astronaut riding a horse on the moon, digital art, highly detailed.",
    "A small cactus with a happy face in the Sahara desert.",
    "A bowl of fresh fruit on a wooden table next to a window.",
    "Portrait of an old fisherman with a grey beard, soft light, film grain.",
    "A futuristic city at night with neon lights and flying cars.",
    "A watercolor painting of mountains and a lake at sunrise.",
    "A cozy living room with a fireplace, books and a sleeping dog.",
    "A red sports car driving along the coast road in summer.",
    "Close up of a blue flower with drops of water on the petals.",
    "A cup of coffee and a croissant on a white plate, morning light.",
    "A dragon flying over a medieval castle, fantasy illustration.",
    "A robot reading a book in a quiet library.",
    "Two children playing football in the park after school.",
    "A sign that says hello world written in bold letters.",
    "The quick brown fox jumps over the lazy dog.",
    "A lighthouse on a rocky island during a storm, dramatic clouds.",
    "A bright green frog on a lily pad in a pond.",
    "An oil painting of a ship sailing on a calm sea.",
    "A snowy forest with tall pine trees and a wooden cabin.",
    "A plate of pasta with tomato sauce and basil leaves.",
    "Minimalist poster with a yellow circle on a black background.",
    "A girl with an umbrella walking in the rain, city street.",
    "A macro shot of an ant carrying a leaf.",
    "An ancient temple in the jungle covered with green moss.",
    "A hot air balloon floating above fields of purple flowers.",
    "A black and white photograph of a jazz musician playing the saxophone.",
    "A bird sitting on a branch, spring, soft pastel colors.",
    "A glass of orange juice, studio lighting, product photo.",
    "A map of a fantasy world drawn with ink on old paper.",
    "A cute panda eating bamboo in the zoo, high quality, 4k.",
    "Dance monkey, a dog is dancing, a cat is singing.",
    "A bad quality, blurry, low resolution picture.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols like # @ % & * ( ) [ ] { } ! ? ; ' \" - +",
)

# Special tokens of the Qwen2 / Qwen2.5-VL vocabulary, in the real id order
# (they follow the ordinary byte-level vocabulary).  Qwen3 appends four more.
QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_QWEN_NON_SPECIAL = ("<tool_call>", "</tool_call>")
_QWEN_FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_QWEN3_EXTRA = ("<tool_response>", "</tool_response>", "<think>", "</think>")

_QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# A ChatML template equivalent to the real one for plain-text messages.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def _bytes_to_unicode() -> list[str]:
    """The GPT-2 byte-to-character table, in the order byte-level vocabularies list it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


@functools.cache
def train_byte_bpe(pre_tokenize: str, *, lowercase: bool, word_suffix: str) -> tuple[tuple[str, str], ...]:
    """Learn byte-level BPE merges on the built-in corpus.

    Normalisation and pre-tokenisation come from the ``tokenizers`` library
    (the same steps the transformers tokenizer class applies when loading);
    the merges are learned here because the library's trainer breaks count
    ties in hash order for end-of-word suffixes, which would make the files
    differ between runs.  Ties are broken by the pair's text instead.
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    steps = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    normalizer = normalizers.Sequence(steps)
    if word_suffix:  # CLIP: keep the pattern's matches, then GPT-2-style byte-level split
        split = pre_tokenizers.Split(Regex(pre_tokenize), behavior="removed", invert=True)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Qwen: the pattern does all the splitting
        split = pre_tokenizers.Split(Regex(pre_tokenize), behavior="isolated")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])

    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            symbols = list(word)
            symbols[-1] += word_suffix
            words[tuple(symbols)] += 1
    return tuple(_learn_merges(words, min_count=1))


def _learn_merges(words: Counter[tuple[str, ...]], min_count: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            return merges
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < min_count:
            return merges
        merges.append(best)
        words = Counter({_merge_pair(word, best): n for word, n in words.items()})


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def bpe_vocab(merges: tuple[tuple[str, str], ...], word_suffix: str = "") -> dict[str, int]:
    """Byte alphabet (plus suffixed copies for CLIP), then merge results in merge order."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + ([c + word_suffix for c in alphabet] if word_suffix else [])
    vocab = {token: i for i, token in enumerate(tokens)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_merges(path: Path, merges: tuple[tuple[str, str], ...]) -> None:
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def added_token(content: str, *, special: bool = True, normalized: bool = False) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


@dataclass(frozen=True)
class QwenVocab:
    """A trained Qwen-style byte-level BPE vocabulary plus its added tokens."""

    vocab: dict[str, int]
    merges: tuple[tuple[str, str], ...]
    added: dict[str, int]

    def __len__(self) -> int:
        return len(self.vocab) + len(self.added)


def qwen_vocab(qwen3: bool) -> QwenVocab:
    merges = train_byte_bpe(_QWEN_PRETOKENIZE, lowercase=False, word_suffix="")
    vocab = bpe_vocab(merges)
    names = QWEN_SPECIAL + _QWEN_NON_SPECIAL + _QWEN_FIM + (_QWEN3_EXTRA if qwen3 else ())
    added = {name: len(vocab) + i for i, name in enumerate(names)}
    return QwenVocab(vocab, merges, added)


def qwen_added_tokens_decoder(qv: QwenVocab) -> dict[str, dict[str, Any]]:
    plain = set(_QWEN_NON_SPECIAL + _QWEN3_EXTRA)
    return {str(i): added_token(t, special=t not in plain) for t, i in qv.added.items()}


def write_qwen3_tokenizer(directory: Path, qv: QwenVocab) -> None:
    """Qwen3 tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)."""
    from transformers import Qwen2Tokenizer

    directory.mkdir(parents=True)
    write_json(directory / "vocab.json", qv.vocab)
    write_merges(directory / "merges.txt", qv.merges)
    specials = list(QWEN_SPECIAL[1:])
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": qwen_added_tokens_decoder(qv),
        "additional_special_tokens": specials,
        "bos_token": None,
        "chat_template": _QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_json(directory / "tokenizer_config.json", config)
    # tokenizer.json: let the library serialise the same vocab so it matches what it loads.
    tokenizer = Qwen2Tokenizer.from_pretrained(directory)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))


def strip_special(token: dict[str, Any]) -> dict[str, Any]:
    """special_tokens_map.json entries carry no ``special`` flag."""
    return {k: v for k, v in token.items() if k != "special"}

