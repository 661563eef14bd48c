"""The app's LoRAs: a `loras/` folder and Hugging Face repos, each tagged with its model family.

A LoRA is named by an id: a file's path relative to the LoRA folder without ".safetensors"
(`style`, `flux/ink`), or `hf:owner/repo` / `hf:owner/repo/file.safetensors` (downloaded into
`<lora dir>/hf/owner/repo/` once, like models, with progress). The family comes from the
file's header (layer names only, no tensor is read; each family's spec declares the names that
give its LoRAs away, `Family.lora_signatures`), so the picker can offer only the LoRAs of
the chosen model's family; a LoRA whose family cannot be told is offered for every family and
judged when it is applied (engine.lora raises a clear error that names its keys).

`parse_lora_spec("style:0.8, hf:owner/repo:1")` reads the `/generate` API's `loras` parameter:
comma-separated `id[:strength]` (strength defaults to 1), also A1111's `<lora:id:strength>`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_registry.types import UserFacingError

HF_PREFIX = "hf:"

@dataclass(frozen=True)
class LoraChoice:
    """One LoRA the picker can offer."""

    id: str
    name: str
    family: str | None  # None: could not be told from its layer names
    path: Path | None  # None: a Hugging Face repo not downloaded yet
    size_bytes: int = 0


def signatures() -> list[tuple[int, str, tuple[str, ...]]]:
    """(rank, family, layer names) of every family's LoRA signatures (model_registry/families/:
    `Family.lora_signatures`), in the order they are tried: by rank, then the family table's order."""
    from model_registry.families import FAMILIES

    found = [(sig.rank, i, name, sig.names) for i, (name, fam) in enumerate(FAMILIES.items()) for sig in fam.lora_signatures]
    return [(rank, name, names) for rank, _, name, names in sorted(found)]


def family_of_keys(keys: list[str]) -> str | None:
    """The family a LoRA file is for, from its layer names: the first signature (by rank) any of
    whose names a key contains (a name two families share goes to the lower rank: FLUX.1 and
    FLUX.2 share their block names, so an attention-only FLUX.2 LoRA in original names reads as
    FLUX.1 and is judged when applied); None when none does."""
    text = " ".join(keys).lower()
    for _, family, needles in signatures():
        if any(n in text for n in needles):
            return family
    return None


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise ValueError("header too large")
        return json.loads(f.read(n))


def factor_bytes(path: Path, dtype_bytes: int = 2) -> int:
    """Bytes the LoRA's factors take on the computation device (bf16), from the header only."""
    total = 0
    for key, entry in _header(path).items():
        if key == "__metadata__" or key.endswith(".alpha"):
            continue
        numel = 1
        for d in entry.get("shape", []):
            numel *= d
        total += numel * dtype_bytes
    return total


def shipped_loras() -> dict[str, Path]:
    """LoRAs that ship with the app (the demo model's, trained in this repository), by id."""
    from model_registry.demo.repo import shipped_loras as demo_loras

    return {lora_id: path for lora_id, path in demo_loras().items() if path.is_file()}


class LoraLibrary:
    """LoRAs in `root` (and Hugging Face repos downloaded into root/hf), plus the shipped ones."""

    def __init__(self, root: Path | str, shipped: dict[str, Path] | None = None):
        self.root = Path(root)
        self.shipped = shipped_loras() if shipped is None else dict(shipped)

    def choices(self, family: str | None = None) -> list[LoraChoice]:
        """Shipped, then local LoRAs sorted by id; with `family`, those of that family (and unknown ones)."""
        out = []
        for lora_id, path in self.shipped.items():
            fam = family_of_keys([k for k in _header(path) if k != "__metadata__"])
            out.append(LoraChoice(lora_id, path.stem, fam, path, path.stat().st_size))
        if self.root.is_dir():
            for path in sorted(self.root.rglob("*.safetensors")):
                rel = path.relative_to(self.root).with_suffix("")
                parts = rel.parts
                lora_id = f"{HF_PREFIX}{'/'.join(parts[1:])}" if parts and parts[0] == "hf" else rel.as_posix()
                try:
                    fam = family_of_keys([k for k in _header(path) if k != "__metadata__"])
                except (OSError, ValueError):
                    continue  # not a readable safetensors file: not offered
                out.append(LoraChoice(lora_id, path.stem, fam, path, path.stat().st_size))
        if family is not None:
            out = [c for c in out if c.family in (None, family)]
        return out

    def resolve(self, lora_id: str, progress: Callable[[float, str], None] | None = None) -> Path:
        """The file of `lora_id`, downloading a Hugging Face one first. UserFacingError if absent."""
        lora_id = lora_id.strip()
        if lora_id in self.shipped:
            return self.shipped[lora_id]
        if lora_id.startswith(HF_PREFIX):
            return self._download(lora_id[len(HF_PREFIX):], progress)
        candidate = (self.root / lora_id)
        for path in (candidate, candidate.with_name(candidate.name + ".safetensors")):
            if path.is_file() and self.root.resolve() in path.resolve().parents:
                return path
        for suffix in (".pt", ".ckpt", ".pth", ".bin"):
            if candidate.with_name(candidate.name + suffix).is_file():
                raise UserFacingError(f"LoRA {lora_id}{suffix} is a pickled file (it can run code): only .safetensors LoRAs are loaded.")
        raise UserFacingError(f"LoRA '{lora_id}' not found in {self.root} (put its .safetensors file there, or use hf:owner/repo).")

    def _download(self, spec: str, progress: Callable[[float, str], None] | None) -> Path:
        parts = spec.strip("/").split("/")
        if len(parts) < 2:
            raise UserFacingError(f"LoRA 'hf:{spec}': write hf:owner/repo or hf:owner/repo/file.safetensors.")
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
        target = self.root / "hf" / repo
        if filename and not filename.endswith(".safetensors"):
            filename += ".safetensors"
        if filename and (target / filename).is_file():
            return target / filename
        if filename is None and target.is_dir():  # downloaded before: no need to ask the hub again
            local = sorted(target.rglob("*.safetensors"))
            if local:
                return local[0]
        from model_registry.progress import Reporter

        reporter = Reporter(progress, f"LoRA {repo}")
        try:
            from huggingface_hub import HfApi, hf_hub_download

            from model_registry.hf_source import endpoint, offline_mode

            if offline_mode():
                raise UserFacingError(f"LoRA hf:{spec} is not downloaded and HF_HUB_OFFLINE is set.")
            url = endpoint()
            reporter.say(0.0, f"Asking {url} for the files of {repo}")
            info = HfApi(endpoint=url).model_info(repo, files_metadata=True)
            sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
            if filename is None:
                files = sorted(f for f in sizes if f.endswith(".safetensors"))
                if not files:
                    raise UserFacingError(f"The Hugging Face repo {repo} has no .safetensors LoRA (pickled files are not loaded).")
                filename = files[0]
                if (target / filename).is_file():
                    return target / filename
            elif filename not in sizes:
                raise UserFacingError(f"The Hugging Face repo {repo} has no file {filename}.")
            reporter.total_bytes, reporter.total_files = sizes.get(filename, 0), 1
            path = Path(hf_hub_download(repo, filename, local_dir=target, endpoint=url, tqdm_class=_byte_bar(reporter)))
            reporter.file_done()
            return path
        except UserFacingError:
            raise
        except Exception as exc:  # network, missing repo, auth, disk
            raise UserFacingError(f"Downloading LoRA hf:{spec} failed: {exc}") from exc


def _byte_bar(reporter: Any) -> type:
    """A huggingface_hub tqdm class for one file's download: every update is bytes (silent)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Bar(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: int | float | None = 1) -> bool | None:
            reporter.add_bytes(n)
            return super().update(n)

    return _Bar


_A1111 = re.compile(r"<lora:([^>]+)>")


def _id_and_strength(part: str) -> tuple[str, str | None]:
    """"ink:0.8" -> ("ink", "0.8"); "hf:owner/repo" -> ("hf:owner/repo", None)."""
    head, sep, tail = part.rpartition(":")
    if sep and head and head != "hf":
        try:
            float(tail)
            return head, tail
        except ValueError:
            pass
    return part, None


def parse_lora_spec(spec: str | None) -> tuple[tuple[str, float], ...]:
    """`"style:0.8, hf:owner/repo:1"` or `"<lora:style:0.8>"` -> (("style", 0.8), ("hf:owner/repo", 1.0))."""
    if not spec or not str(spec).strip():
        return ()
    spec = str(spec)
    items = [_id_and_strength(m.group(1).strip()) for m in _A1111.finditer(spec)]
    if not items:
        items = [_id_and_strength(part.strip()) for part in spec.split(",") if part.strip()]
    out = []
    for lora_id, strength in items:
        try:
            value = 1.0 if strength in (None, "") else float(strength)
        except ValueError as exc:
            raise UserFacingError(f"LoRA '{lora_id}': strength {strength!r} is not a number.") from exc
        if not -4.0 <= value <= 4.0:
            raise UserFacingError(f"LoRA '{lora_id}': strength {value:g} is outside -4..4.")
        out.append((lora_id.strip(), value))
    return tuple(out)


def check_loras(loras: object) -> tuple[tuple[str, float], ...]:
    """A request's `loras` as ((id, strength), ...); UserFacingError says what is wrong."""
    out = []
    for item in loras or ():
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str) or not item[0].strip():
            raise UserFacingError(f"LoRAs are (id, strength) pairs; got {item!r}.")
        strength = item[1]
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not -4.0 <= float(strength) <= 4.0:
            raise UserFacingError(f"LoRA '{item[0]}': strength must be a number from -4 to 4, got {strength!r}.")
        out.append((item[0].strip(), float(strength)))
    return tuple(out)
