"""Tiny, offline stand-ins for the real Hugging Face pipeline repositories.

The app ships an offline demo model and the test-suite needs realistic repos
without network access, so this module writes complete diffusers pipeline
repositories that mirror the real ones file for file (model_index.json,
scheduler/, text encoders, tokenizers, denoiser, VAE) but with tiny configs
and seeded random weights.  Everything is produced locally:

* the real model classes are instantiated with the tiny configs of
  ``model_registry.tiny_components`` and saved with their own
  ``save_pretrained`` (so shard names, index files and checkpoint key names
  are exactly what the libraries write for the real models);
* tokenizers are trained on a small built-in English corpus with the
  ``tokenizers`` / ``sentencepiece`` libraries and written in the file set the
  real repo ships for that tokenizer class.

A repo is deterministic for a given ``seed`` (byte-identical files), a few
hundred kB to a few MB in size, and loads with
``DiffusionPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
import json
import math
import shutil
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import tiny_components as tc
from .families import FAMILIES

__all__ = ["TINY_DEFAULTS", "TINY_FAMILIES", "TINY_SOURCE_REPOS", "TinyDefaults", "write_tiny_repo"]


@dataclass(frozen=True)
class TinyDefaults:
    """Generation settings that work for a family's tiny repo.

    ``guidance`` is passed to the pipeline argument named ``guidance_arg``, the
    family's own (Qwen-Image takes its classifier-free guidance as ``true_cfg_scale``).
    """

    width: int
    height: int
    steps: int
    guidance: float
    guidance_arg: str = "guidance_scale"

    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pipeline(prompt, **kwargs)``."""
        return {
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            self.guidance_arg: self.guidance,
        }


TINY_FAMILIES: tuple[str, ...] = tuple(FAMILIES)  # every family has a tiny stand-in

#: The real repository each tiny family mirrors.
TINY_SOURCE_REPOS: dict[str, str] = {
    "qwen-image": "Qwen/Qwen-Image",
    "z-image": "Tongyi-MAI/Z-Image-Turbo",
    "flux1": "black-forest-labs/FLUX.1-schnell",
    "flux2-klein": "black-forest-labs/FLUX.2-klein-4B",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}

# 64x64 is the smallest size that keeps every family's latent grid at least
# 4x4 patches (VAE factor 8, times patch size 2 for the DiT families).
_TINY_GUIDANCE: dict[str, float] = {"qwen-image": 1.0, "z-image": 0.0, "flux1": 0.0, "flux2-klein": 1.0, "sdxl": 5.0}
TINY_DEFAULTS: dict[str, TinyDefaults] = {
    family: TinyDefaults(64, 64, 2, guidance, guidance_arg=FAMILIES[family].guidance_arg)
    for family, guidance in _TINY_GUIDANCE.items()
}


def write_tiny_repo(family: str, target_dir: str | Path, seed: int = 0) -> Path:
    """Write a complete tiny pipeline repo for ``family`` into ``target_dir``.

    An existing pipeline repo there is replaced, so a second call with the
    same seed leaves byte-identical files; any other non-empty directory is
    refused rather than wiped.  Returns the repo path.
    """
    if family not in _WRITERS:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {TINY_FAMILIES}")
    root = Path(target_dir)
    if root.exists():
        if any(root.iterdir()) and not (root / "model_index.json").is_file():
            raise FileExistsError(f"{root} is not empty and holds no pipeline repo; refusing to overwrite it")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with _quiet_libraries():
        _WRITERS[family](root, seed)
    return root


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

# Small English corpus for training the tokenizers.  It contains the Qwen-Image
# prompt template words so that the template prefix tokenizes to the same 34
# tokens as with the real Qwen tokenizer (the pipeline drops exactly 34).
_CORPUS: tuple[str, ...] = (
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
_QWEN_SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip
_QWEN_NON_SPECIAL = ("<tool_call>", "</tool_call>")
_QWEN_FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_QWEN3_EXTRA = ("<tool_response>", "</tool_response>", "<think>", "</think>")

_QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_CLIP_PRETOKENIZE = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# ChatML templates equivalent to the real ones for plain-text messages.
_QWEN25_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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
def _train_byte_bpe(pre_tokenize: str, *, lowercase: bool, word_suffix: str) -> tuple[tuple[str, str], ...]:
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
    for line in _CORPUS:
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


def _bpe_vocab(merges: tuple[tuple[str, str], ...], word_suffix: str = "") -> dict[str, int]:
    """Byte alphabet (plus suffixed copies for CLIP), then merge results in merge order."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + ([c + word_suffix for c in alphabet] if word_suffix else [])
    vocab = {token: i for i, token in enumerate(tokens)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def _write_merges(path: Path, merges: tuple[tuple[str, str], ...]) -> None:
    path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def _added_token(content: str, *, special: bool = True, normalized: bool = False) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


@dataclass(frozen=True)
class _QwenVocab:
    """A trained Qwen-style byte-level BPE vocabulary plus its added tokens."""

    vocab: dict[str, int]
    merges: tuple[tuple[str, str], ...]
    added: dict[str, int]

    def __len__(self) -> int:
        return len(self.vocab) + len(self.added)


def _qwen_vocab(qwen3: bool) -> _QwenVocab:
    merges = _train_byte_bpe(_QWEN_PRETOKENIZE, lowercase=False, word_suffix="")
    vocab = _bpe_vocab(merges)
    names = _QWEN_SPECIAL + _QWEN_NON_SPECIAL + _QWEN_FIM + (_QWEN3_EXTRA if qwen3 else ())
    added = {name: len(vocab) + i for i, name in enumerate(names)}
    return _QwenVocab(vocab, merges, added)


def _qwen_added_tokens_decoder(qv: _QwenVocab) -> dict[str, dict[str, Any]]:
    plain = set(_QWEN_NON_SPECIAL + _QWEN3_EXTRA)
    return {str(i): _added_token(t, special=t not in plain) for t, i in qv.added.items()}


def _write_qwen25vl_tokenizer(directory: Path, qv: _QwenVocab) -> None:
    """Qwen2Tokenizer files as shipped in Qwen/Qwen-Image/tokenizer (no tokenizer.json)."""
    directory.mkdir(parents=True)
    _write_json(directory / "vocab.json", qv.vocab)
    _write_merges(directory / "merges.txt", qv.merges)
    _write_json(directory / "added_tokens.json", qv.added)
    (directory / "chat_template.jinja").write_text(_QWEN25_VL_CHAT_TEMPLATE, encoding="utf-8")
    specials = list(_QWEN_SPECIAL[1:])
    _write_json(
        directory / "special_tokens_map.json",
        {
            "additional_special_tokens": specials,
            "eos_token": _strip_special(_added_token("<|im_end|>")),
            "pad_token": _strip_special(_added_token("<|endoftext|>")),
        },
    )
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": _qwen_added_tokens_decoder(qv),
            "additional_special_tokens": specials,
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "extra_special_tokens": {},
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )


def _write_qwen3_tokenizer(directory: Path, qv: _QwenVocab) -> None:
    """Qwen3 tokenizer files (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json)."""
    from transformers import Qwen2Tokenizer

    directory.mkdir(parents=True)
    _write_json(directory / "vocab.json", qv.vocab)
    _write_merges(directory / "merges.txt", qv.merges)
    specials = list(_QWEN_SPECIAL[1:])
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _qwen_added_tokens_decoder(qv),
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
    _write_json(directory / "tokenizer_config.json", config)
    # tokenizer.json: let the library serialise the same vocab so it matches what it loads.
    tokenizer = Qwen2Tokenizer.from_pretrained(directory)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))


def _strip_special(token: dict[str, Any]) -> dict[str, Any]:
    """special_tokens_map.json entries carry no ``special`` flag."""
    return {k: v for k, v in token.items() if k != "special"}


def _write_clip_tokenizer(directory: Path, pad_token: str) -> int:
    """CLIPTokenizer files as in the SDXL / FLUX.1 repos; returns the vocab size."""
    merges = _train_byte_bpe(_CLIP_PRETOKENIZE, lowercase=True, word_suffix="</w>")
    vocab = _bpe_vocab(merges, word_suffix="</w>")
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    vocab[bos], vocab[eos] = len(vocab), len(vocab) + 1
    directory.mkdir(parents=True)
    _write_json(directory / "vocab.json", vocab)
    _write_merges(directory / "merges.txt", merges)
    token = _strip_special(_added_token(eos, normalized=True))
    _write_json(
        directory / "special_tokens_map.json",
        {
            "bos_token": _strip_special(_added_token(bos, normalized=True)),
            "eos_token": token,
            "pad_token": token if pad_token == eos else pad_token,
            "unk_token": token,
        },
    )
    decoder = {str(vocab[t]): _added_token(t, normalized=True) for t in (bos, eos)}
    if pad_token != eos:
        decoder[str(vocab[pad_token])] = _added_token(pad_token, normalized=False)
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder,
            "bos_token": bos,
            "clean_up_tokenization_spaces": True,
            "do_lower_case": True,
            "eos_token": eos,
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": eos,
        },
    )
    return len(vocab)


_T5_EXTRA_IDS = 100


def _train_sentencepiece() -> bytes:
    """A tiny unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(_CORPUS) * 4),
        model_writer=model,
        model_type="unigram",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _write_t5_tokenizer(directory: Path) -> int:
    """T5TokenizerFast files as in FLUX.1 tokenizer_2; returns the vocab size."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import T5Tokenizer

    proto_bytes = _train_sentencepiece()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    extra = [f"<extra_id_{i}>" for i in range(_T5_EXTRA_IDS)]
    # Like the real T5 vocab, the sentinels follow the pieces in reverse order.
    pieces = [(p.piece, p.score) for p in proto.pieces] + [(t, 0.0) for t in reversed(extra)]
    directory.mkdir(parents=True)
    (directory / "spiece.model").write_bytes(proto_bytes)
    tokenizer = T5Tokenizer(
        vocab=pieces,
        extra_ids=_T5_EXTRA_IDS,
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
    )
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(
        directory / "special_tokens_map.json",
        {"additional_special_tokens": extra} | {k: _strip_special(_added_token(v)) for k, v in specials.items()},
    )
    decoder = {str(i): _added_token(p) for i, (p, _) in enumerate(pieces) if i < 3 or p in extra}
    _write_json(
        directory / "tokenizer_config.json",
        {
            "add_prefix_space": True,
            "added_tokens_decoder": decoder,
            "additional_special_tokens": extra,
            "clean_up_tokenization_spaces": True,
            "extra_ids": _T5_EXTRA_IDS,
            "legacy": True,
            "model_max_length": 512,
            "sp_model_kwargs": {},
            "tokenizer_class": "T5Tokenizer",
        }
        | specials,
    )
    return len(pieces)


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch for one component without disturbing the caller's RNG state.

    Each component gets its own seed so that resizing one component does not
    change the weights of the others.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(component.encode())) % 2**63)
        yield


def _build(seed: int, component: str, factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Instantiate a model with its library's seeded random init, in bf16 (as the real repos store it).

    The weights are initialised in float32 and rounded, so a bf16 repo holds
    the same values an fp32 build with the same seed would, to bf16 precision.
    """
    with _seeded(seed, component):
        model = factory()
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules even when there are none.
    return torch.nn.Module.to(model, torch.bfloat16).eval()


def _save(model: Any, directory: Path, *, sharded: bool = False, fp16_variant: bool = False) -> None:
    """save_pretrained; ``sharded`` components get a max_shard_size of half their weights.

    Half the total always yields at least two shards (more when tensor sizes do
    not split evenly), named and indexed exactly as for the real multi-GB models.
    ``fp16_variant`` also writes the ``*.fp16.safetensors`` copy that repos like
    SDXL ship next to the main weights.
    """
    kwargs: dict[str, Any] = {}
    if sharded:
        total = sum(t.nbytes for t in model.state_dict().values())
        kwargs["max_shard_size"] = math.ceil(total / 2)
    if fp16_variant:
        fp16 = torch.nn.Module.to(copy.deepcopy(model), torch.float16)
        fp16.save_pretrained(directory, variant="fp16", **kwargs)
    model.save_pretrained(directory, **kwargs)  # last: config.json records the main weights' dtype


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence save/load progress bars and warnings while writing, then restore them."""
    import diffusers.utils.logging as d_logging
    import transformers.utils.logging as t_logging

    t_bars, d_bars = t_logging.is_progress_bar_enabled(), d_logging.is_progress_bar_enabled()
    t_level, d_level = t_logging.get_verbosity(), d_logging.get_verbosity()
    t_logging.disable_progress_bar()
    d_logging.disable_progress_bar()
    t_logging.set_verbosity_error()
    d_logging.set_verbosity_error()
    try:
        yield
    finally:
        t_logging.set_verbosity(t_level)
        d_logging.set_verbosity(d_level)
        if t_bars:
            t_logging.enable_progress_bar()
        if d_bars:
            d_logging.enable_progress_bar()


# ---------------------------------------------------------------------------
# model_index.json and schedulers, as in each real repo
# ---------------------------------------------------------------------------

# Pipeline config entries of model_index.json besides the class name (which the family gives).
_PIPELINE_CONFIG: dict[str, dict[str, Any]] = {
    "flux2-klein": {"is_distilled": True},
    "sdxl": {"force_zeros_for_empty_prompt": True},
}

_COMPONENTS: dict[str, dict[str, tuple[str, str]]] = {
    "qwen-image": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "transformer": ("diffusers", "QwenImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage"),
    },
    "z-image": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen3Model"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "transformer": ("diffusers", "ZImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    },
    "flux1": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "transformer": ("diffusers", "FluxTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    },
    "flux2-klein": {
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen3ForCausalLM"),
        "tokenizer": ("transformers", "Qwen2TokenizerFast"),
        "transformer": ("diffusers", "Flux2Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLFlux2"),
    },
    "sdxl": {
        "scheduler": ("diffusers", "EulerDiscreteScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    },
}

_SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen-image": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "invert_sigmas": False,
        "max_image_seq_len": 8192,
        "max_shift": 0.9,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "stochastic_sampling": False,
        "time_shift_type": "exponential",
        "use_beta_sigmas": False,
        "use_dynamic_shifting": True,
        "use_exponential_sigmas": False,
        "use_karras_sigmas": False,
    },
    "z-image": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "flux1": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
    "flux2-klein": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "time_shift_type": "exponential",
        "use_dynamic_shifting": True,
    },
    "sdxl": {
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
}


def _write_index_and_scheduler(root: Path, family: str) -> None:
    """model_index.json and scheduler/ (configs only; no weights)."""
    import diffusers

    components = _COMPONENTS[family]
    index: dict[str, Any] = {
        "_class_name": FAMILIES[family].pipeline_class,
        "_diffusers_version": diffusers.__version__,
        **_PIPELINE_CONFIG.get(family, {}),
    }
    index |= {name: list(library_and_class) for name, library_and_class in components.items()}
    _write_json(root / "model_index.json", index)
    scheduler_class = getattr(diffusers, components["scheduler"][1])
    scheduler_class(**_SCHEDULER_CONFIGS[family]).save_pretrained(root / "scheduler")


# ---------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------


def _write_qwen_image(root: Path, seed: int) -> None:
    """Qwen/Qwen-Image: Qwen2.5-VL text encoder, MMDiT transformer, Wan-style 3D VAE."""
    _write_index_and_scheduler(root, "qwen-image")
    qv = _qwen_vocab(qwen3=False)
    _write_qwen25vl_tokenizer(root / "tokenizer", qv)
    _save(_build(seed, "text_encoder", lambda: tc.qwen25_vl(len(qv), qv.added)), root / "text_encoder", sharded=True)
    _save(_build(seed, "transformer", tc.qwen_image_transformer), root / "transformer", sharded=True)
    _save(_build(seed, "vae", tc.qwen_image_vae), root / "vae")


def _write_z_image(root: Path, seed: int) -> None:
    """Tongyi-MAI/Z-Image-Turbo: Qwen3 text encoder, single-stream DiT, FLUX.1's VAE."""
    _write_index_and_scheduler(root, "z-image")
    qv = _qwen_vocab(qwen3=True)
    _write_qwen3_tokenizer(root / "tokenizer", qv)
    # The pipeline reads hidden_states[-2], so two layers are the minimum.
    text_encoder = _build(seed, "text_encoder", lambda: tc.qwen3_text_encoder(len(qv), qv.added, layers=2))
    _save(text_encoder, root / "text_encoder", sharded=True)
    _save(_build(seed, "transformer", tc.z_image_transformer), root / "transformer", sharded=True)
    _save(_build(seed, "vae", tc.flux_vae), root / "vae")


def _write_flux1(root: Path, seed: int) -> None:
    """black-forest-labs/FLUX.1-schnell: CLIP-L + T5 text encoders, MMDiT, 16-channel VAE.

    The CLIP text encoder is a single file, as in the real repo; T5 is sharded.
    """
    _write_index_and_scheduler(root, "flux1")
    clip_vocab = _write_clip_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    t5_vocab = _write_t5_tokenizer(root / "tokenizer_2")
    _save(_build(seed, "text_encoder", lambda: tc.clip_text(clip_vocab)), root / "text_encoder")
    _save(_build(seed, "text_encoder_2", lambda: tc.t5_encoder(t5_vocab)), root / "text_encoder_2", sharded=True)
    _save(_build(seed, "transformer", tc.flux_transformer), root / "transformer", sharded=True)
    _save(_build(seed, "vae", tc.flux_vae), root / "vae")


def _write_flux2_klein(root: Path, seed: int) -> None:
    """black-forest-labs/FLUX.2-klein-4B: Qwen3 text encoder, Flux2 DiT, 32-channel VAE."""
    _write_index_and_scheduler(root, "flux2-klein")
    qv = _qwen_vocab(qwen3=True)
    _write_qwen3_tokenizer(root / "tokenizer", qv)
    # The pipeline stacks hidden states 9, 18 and 27 by default, so it needs >= 27 layers.
    text_encoder = _build(seed, "text_encoder", lambda: tc.qwen3_text_encoder(len(qv), qv.added, layers=28))
    _save(text_encoder, root / "text_encoder", sharded=True)
    _save(_build(seed, "transformer", tc.flux2_transformer), root / "transformer", sharded=True)
    _save(_build(seed, "vae", tc.flux2_vae), root / "vae")


def _write_sdxl(root: Path, seed: int) -> None:
    """stabilityai/stable-diffusion-xl-base-1.0: two CLIP encoders, UNet, 4-channel VAE.

    As in the real repo every component is a single file (nothing is sharded),
    with an ``fp16`` variant next to the main weights.
    """
    _write_index_and_scheduler(root, "sdxl")
    vocab = _write_clip_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    _write_clip_tokenizer(root / "tokenizer_2", pad_token="!")  # OpenCLIP pads with "!"
    _save(_build(seed, "text_encoder", lambda: tc.clip_text(vocab)), root / "text_encoder", fp16_variant=True)
    clip_g = _build(seed, "text_encoder_2", lambda: tc.clip_text(vocab, "gelu", with_projection=True))
    _save(clip_g, root / "text_encoder_2", fp16_variant=True)
    _save(_build(seed, "unet", tc.sdxl_unet), root / "unet", fp16_variant=True)
    _save(_build(seed, "vae", tc.sdxl_vae), root / "vae", fp16_variant=True)


_WRITERS: dict[str, Callable[[Path, int], None]] = {
    "qwen-image": _write_qwen_image,
    "z-image": _write_z_image,
    "flux1": _write_flux1,
    "flux2-klein": _write_flux2_klein,
    "sdxl": _write_sdxl,
}
