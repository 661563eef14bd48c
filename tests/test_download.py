"""Downloads against files and servers on this machine: no model hub is reachable here or in CI.

A small HTTP server on 127.0.0.1 implements the hub endpoints huggingface_hub 2.x uses for
snapshot_download (model info, recursive tree listing, resolve with ETag / X-Repo-Commit /
Content-Length / Range; no Xet headers, so it takes the plain HTTP path) and serves a tiny
repo in the real Z-Image layout plus files a pipeline does not need.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import model_registry
from engine.generation.types import UserFacingError
from model_registry import hf_source
from tests.fixtures.tiny_repos import write_tiny_repo

REPO = "Tongyi-MAI/Z-Image-Turbo"
MODEL = "z-image-turbo"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CUT_FILE = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
# Files the real repo has (or could have) that the pipeline never reads.
EXTRAS = {
    "README.md": b"# Z-Image-Turbo\n",
    ".gitattributes": b"*.safetensors filter=lfs\n",
    "z_image_turbo_bf16.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "text_encoder/pytorch_model.bin": b"pickle" * 100,
    "assets/showcase.png": b"\x89PNG" + b"\x00" * 500,
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repo("z-image", tmp_path_factory.mktemp("tiny") / "z-image")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh caches and model dir per test; any accidental hub call goes to a closed port."""
    monkeypatch.setenv("LOWVRAM_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("LOWVRAM_HUB_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "MODELSCOPE_API_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_source, "get_token", lambda: None)  # ignore a token stored on the dev machine
    return tmp_path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- fake hub


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) answering with `handler`, until close()."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeHub(LoopbackServer):
    """Serves repos over the hub's HTTP API and records what it served."""

    def __init__(self, repos: dict[str, dict[str, bytes]], gated: frozenset[str] = frozenset()):
        self.repos = repos
        self.gated = gated
        self.cut_once: set[str] = set()  # files whose first GET stops half-way
        self.broken: set[str] = set()  # files cut half-way, then answered 500 until repaired
        self.stall_once: set[str] = set()  # files whose first GET sends half, then hangs until release
        self.release = threading.Event()
        self.gets: Counter[str] = Counter()
        self.bytes_served: Counter[str] = Counter()
        self.range_requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(QuietHandler):
            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.serve(Handler)

    def total_bytes(self) -> int:
        return sum(self.bytes_served.values())

    # -- responses

    def _send(
        self, h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False
    ) -> None:
        h.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(key, value)
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h: BaseHTTPRequestHandler, value: object) -> None:
        self._send(h, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, head: bool = False) -> None:
        body = json.dumps({"error": code}).encode()
        self._send(
            h, status, body, {"X-Error-Code": code, "X-Repo-Commit": COMMIT, "Content-Type": "application/json"}, head
        )

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._model_info(h, m.group(1))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            return self._tree(h, m.group(1))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(h, m.group(1), m.group(3), head)
        self._error(h, 404, "RepoNotFound", head)

    def _model_info(self, h: BaseHTTPRequestHandler, repo: str) -> None:
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound")
        siblings = [{"rfilename": p, "size": len(b)} for p, b in sorted(self.repos[repo].items())]
        self._json(
            h,
            {
                "id": repo,
                "sha": COMMIT,
                "private": False,
                "gated": "manual" if repo in self.gated else False,
                "siblings": siblings,
            },
        )

    def _tree(self, h: BaseHTTPRequestHandler, repo: str) -> None:
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound")
        entries = [
            {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
            for p, b in sorted(self.repos[repo].items())
        ]
        self._json(h, entries)

    def _resolve(self, h: BaseHTTPRequestHandler, repo: str, filename: str, head: bool) -> None:
        if repo not in self.repos:
            return self._error(h, 404, "RepoNotFound", head)
        if repo in self.gated and h.headers.get("Authorization") != "Bearer hf_has_access":
            return self._error(h, 401, "GatedRepo", head)
        data = self.repos[repo].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", head)
        headers = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": COMMIT,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if head:
            return self._send(h, 200, data, headers, head=True)
        with self.lock:
            self.gets[filename] += 1
            first = self.gets[filename] == 1
        if filename in self.broken and not first:
            return self._error(h, 500, "Internal")
        start = 0
        if rng := h.headers.get("Range"):
            self.range_requests.append((filename, rng))
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        body = data[start:]
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        h.send_response(206 if start else 200)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            h.send_header(key, value)
        h.end_headers()
        if first and (filename in self.cut_once or filename in self.broken):
            body = body[: len(body) // 2]  # the connection drops half-way through the file
            h.close_connection = True
        if first and filename in self.stall_once:  # half the file, then nothing (a killed client)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            with self.lock:
                self.bytes_served[filename] += len(body) // 2
            self.release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(body)
        with self.lock:
            self.bytes_served[filename] += len(body)


def repo_files(root: Path, extras: bool = True) -> dict[str, bytes]:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return files | (EXTRAS if extras else {})


@pytest.fixture
def hub(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch):
    server = FakeHub({REPO: repo_files(tiny_repo)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    yield server
    server.close()


# --------------------------------------------------------------------------- real downloads


def test_download_fetches_only_what_the_pipeline_needs(hub: FakeHub, tiny_repo: Path) -> None:
    calls: list[tuple[float, str]] = []
    path = model_registry.download(MODEL, source="hf", progress=lambda f, m: calls.append((f, m)))

    needed = set(repo_files(tiny_repo, extras=False))
    assert set(hub.gets) == needed  # every pipeline file once, none of README/.bin/root checkpoint/assets
    assert all(n == 1 for n in hub.gets.values())
    assert model_registry.is_downloaded(MODEL)
    assert model_registry.local_path(MODEL) == path
    assert path.is_relative_to(Path(os.environ["HF_HUB_CACHE"]))  # the standard cache, reusable by other tools
    assert (path / CUT_FILE).read_bytes() == (tiny_repo / CUT_FILE).read_bytes()

    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in fractions)
    assert sum("files" in m for _, m in calls) >= len(needed)  # at least one report per file
    assert model_registry.default_model_id() == MODEL

    # Present now: a second call touches neither the network nor the files.
    hub.gets.clear()
    assert model_registry.download(MODEL) == path
    assert not hub.gets


def test_dropped_connection_resumes_with_a_range_request(
    hub: FakeHub, tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # huggingface_hub resumes from the last whole read chunk (10 MB); scale it to the tiny shard.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    hub.cut_once.add(CUT_FILE)
    path = model_registry.download(MODEL)

    size = len((tiny_repo / CUT_FILE).read_bytes())
    assert [f for f, _ in hub.range_requests] == [CUT_FILE]
    assert size <= hub.bytes_served[CUT_FILE] < 1.1 * size  # the first half was not fetched again
    assert (path / CUT_FILE).read_bytes() == (tiny_repo / CUT_FILE).read_bytes()
    assert model_registry.is_downloaded(MODEL)


def test_interrupted_download_is_never_complete_and_the_next_call_finishes_it(hub: FakeHub, tiny_repo: Path) -> None:
    hub.broken.add(CUT_FILE)
    with pytest.raises(UserFacingError, match="interrupted.*again"):
        model_registry.download(MODEL)
    first_bytes = hub.total_bytes()
    assert not model_registry.is_downloaded(MODEL)
    assert model_registry.local_path(MODEL) is None
    assert model_registry.default_model_id() == "demo"
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not list(cache.rglob("*.incomplete"))  # no half file left that could pass for whole

    hub.broken.clear()
    served_before = Counter(hub.bytes_served)
    path = model_registry.download(MODEL)
    second_bytes = hub.total_bytes() - first_bytes
    assert 0 < second_bytes < first_bytes
    refetched = {f for f in hub.bytes_served if hub.bytes_served[f] != served_before[f]}
    assert CUT_FILE in refetched and len(refetched) <= 4  # finished files were kept, not fetched again
    assert model_registry.is_downloaded(MODEL)
    assert (path / CUT_FILE).read_bytes() == (tiny_repo / CUT_FILE).read_bytes()


def test_disk_full_during_download_gives_a_clear_message(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import file_download

    real_http_get = file_download.http_get

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str):
            return getattr(self.f, name)

    monkeypatch.setattr(file_download, "http_get", lambda url, f, **kw: real_http_get(url, FullDisk(f), **kw))
    with pytest.raises(UserFacingError, match="disk space") as info:
        model_registry.download(MODEL)
    assert "HF_HUB_CACHE" in str(info.value)
    assert not model_registry.is_downloaded(MODEL)


def test_not_enough_free_space_is_refused_before_downloading(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_source.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(UserFacingError, match="disk space.*needs"):
        model_registry.download(MODEL)
    assert not hub.gets


# --------------------------------------------------------------------------- quick errors that say what to do


def test_gated_repo_without_token_names_the_page_and_hf_token() -> None:
    start = time.monotonic()
    with pytest.raises(UserFacingError) as info:
        model_registry.download("flux1-dev")
    assert time.monotonic() - start < 2
    message = str(info.value)
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in message
    assert "HF_TOKEN" in message and "licence" in message


def test_gated_repo_with_a_token_that_has_no_access(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeHub(
        {"black-forest-labs/FLUX.1-dev": repo_files(tiny_repo)}, gated=frozenset({"black-forest-labs/FLUX.1-dev"})
    )
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(UserFacingError, match="no access.*FLUX.1-dev.*HF_TOKEN"):
            model_registry.download("flux1-dev", token="hf_no_access")
    finally:
        server.close()


def test_unknown_model_id() -> None:
    with pytest.raises(UserFacingError, match="Unknown model 'nope'.*z-image-turbo"):
        model_registry.download("nope")
    with pytest.raises(UserFacingError, match="Unknown download source"):
        model_registry.download(MODEL, source="ftp")


def test_unreachable_hf_endpoint_fails_fast_with_guidance() -> None:
    start = time.monotonic()
    with pytest.raises(UserFacingError) as info:
        model_registry.download(MODEL, source="hf")
    assert time.monotonic() - start < 5
    message = str(info.value)
    for hint in ("Connect to the internet", "HF_ENDPOINT", "ModelScope", "local folder"):
        assert hint in message


def test_unreachable_modelscope_endpoint_fails_fast_with_guidance() -> None:
    start = time.monotonic()
    with pytest.raises(UserFacingError) as info:
        model_registry.download(MODEL, source="modelscope")
    assert time.monotonic() - start < 5
    message = str(info.value)
    for hint in ("Connect to the internet", "MODELSCOPE_ENDPOINT", "Hugging Face", "local folder"):
        assert hint in message


def test_unknown_repo_on_the_hub(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeHub({"someone/else": repo_files(tiny_repo)})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    try:
        with pytest.raises(UserFacingError, match="no repository 'Tongyi-MAI/Z-Image-Turbo'"):
            model_registry.download(MODEL)
    finally:
        server.close()


class FakeModelScope(LoopbackServer):
    """The two ModelScope calls a snapshot download makes: list the repo, fetch one file (with
    Range requests; `stall_once` files send half their bytes on the first GET, then hang until
    `release` is set)."""

    def __init__(self, repo: str, files: dict[str, bytes], stall_once: set[str] | frozenset[str] = frozenset()):
        self.fetched: list[str] = []
        self.ranges: list[tuple[str, str]] = []
        self.bytes_served: Counter[str] = Counter()
        self.release = threading.Event()
        fake = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = dict(p.split("=", 1) for p in url.query.split("&") if "=" in p)
                body, status, headers = b'{"Code": 404, "Success": false}', 404, {}
                stall = False
                if url.path == f"/api/v1/models/{repo}/repo/files":
                    listing = [
                        {
                            "Path": p,
                            "Name": p.rsplit("/", 1)[-1],
                            "Size": len(b),
                            "Sha256": hashlib.sha256(b).hexdigest(),
                            "Type": "blob",
                        }
                        for p, b in sorted(files.items())
                    ]
                    body, status = json.dumps({"Code": 200, "Data": {"Files": listing}, "Success": True}).encode(), 200
                elif (
                    url.path == f"/api/v1/models/{repo}/repo"
                    and (path := unquote(query.get("FilePath", "").replace("+", " "))) in files
                ):
                    first = path not in fake.fetched
                    fake.fetched.append(path)
                    data, start = files[path], 0
                    if rng := self.headers.get("Range"):
                        fake.ranges.append((path, rng))
                        start = int(re.fullmatch(r"bytes=(\d+)-\d*", rng).group(1))
                    body, status = data[start:], 206 if start else 200
                    if start:
                        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    stall = first and path in stall_once
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if stall:
                    body = body[: len(body) // 2]
                self.wfile.write(body)
                if status in (200, 206) and "FilePath" in url.query:
                    fake.bytes_served[path] += len(body)
                if stall:
                    self.wfile.flush()
                    fake.release.wait(60)
                    self.close_connection = True

        self.serve(Handler)

    def close(self) -> None:
        self.release.set()
        super().close()


def test_modelscope_download_fetches_only_what_the_pipeline_needs(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = FakeModelScope(REPO, repo_files(tiny_repo))
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    calls: list[tuple[float, str]] = []
    try:
        path = model_registry.download(MODEL, source="modelscope", progress=lambda f, m: calls.append((f, m)))
    finally:
        server.close()
    assert sorted(server.fetched) == sorted(repo_files(tiny_repo, extras=False))
    assert path.is_relative_to(Path(os.environ["MODELSCOPE_CACHE"]))
    assert model_registry.local_path(MODEL) == path
    assert calls[-1][0] == 1.0 and sum("files" in m for _, m in calls) >= len(server.fetched)


# --------------------------------------------------------------------------- caches filled by other tools


def make_hf_cache(cache: Path, repo: str, source: Path) -> Path:
    """Lay `source` out as huggingface_hub does: blobs by hash, snapshot symlinks, refs/main."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_offline_mode_reuses_a_model_another_tool_cached(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = make_hf_cache(Path(os.environ["HF_HUB_CACHE"]), REPO, tiny_repo)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert model_registry.is_downloaded(MODEL)
    assert model_registry.download(MODEL, source="hf") == snapshot
    assert model_registry.local_path(MODEL) == snapshot
    assert model_registry.default_model_id() == MODEL


def test_a_cache_missing_a_shard_is_not_complete(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshot = make_hf_cache(Path(os.environ["HF_HUB_CACHE"]), REPO, tiny_repo)
    (snapshot / CUT_FILE).unlink()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert not model_registry.is_downloaded(MODEL)
    assert model_registry.local_path(MODEL) is None
    with pytest.raises(UserFacingError, match="HF_HUB_OFFLINE"):
        model_registry.download(MODEL)


def test_a_cache_with_a_truncated_shard_is_not_complete(tiny_repo: Path) -> None:
    snapshot = make_hf_cache(Path(os.environ["HF_HUB_CACHE"]), REPO, tiny_repo)
    blob = (snapshot / CUT_FILE).resolve()
    blob.write_bytes(blob.read_bytes()[:-100])
    assert not model_registry.is_downloaded(MODEL)


def test_modelscope_cache_is_reused(tiny_repo: Path) -> None:
    snapshot = Path(os.environ["MODELSCOPE_CACHE"]) / "models" / REPO.replace("/", "--") / "snapshots" / "master"
    shutil.copytree(tiny_repo, snapshot)
    assert model_registry.is_downloaded(MODEL)
    assert model_registry.download(MODEL, source="modelscope") == snapshot


# --------------------------------------------------------------------------- resume after a killed process

KILLED_DOWNLOAD = """
import sys
from huggingface_hub import constants
constants.DOWNLOAD_CHUNK_SIZE = 16 * 1024
import modelscope_hub._download as ms
ms.DOWNLOAD_CHUNK_SIZE = 16 * 1024
import model_registry
model_registry.download(sys.argv[1], source=sys.argv[2])
"""


def kill_mid_file(source: str, partial_glob: str, root: Path) -> int:
    """Run a download in a subprocess, kill -9 it once a partial file has some bytes; their size."""
    import signal
    import subprocess
    import sys

    def partials() -> dict[Path, int]:
        return {p: p.stat().st_size for p in root.rglob(partial_glob) if p.is_file()}

    proc = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD, MODEL, source], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            big = {p: n for p, n in partials().items() if n >= 64 * 1024}
            if big:
                # the stalled file stays partial at one size; a file that was only passing through
                # (it completes and is renamed) must not be taken for it
                time.sleep(0.3)
                if any(partials().get(p) == n for p, n in big.items()):
                    break
            assert proc.poll() is None, "the download ended before it could be killed"
            time.sleep(0.05)
        else:
            raise AssertionError("no partial file appeared")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return max(p.stat().st_size for p in root.rglob(partial_glob) if p.is_file())


def wanted_bytes(tiny_repo: Path) -> int:
    return sum(len(b) for b in repo_files(tiny_repo, extras=False).values())


def test_a_killed_download_resumes_its_partial_file_and_leaves_none(
    hub: FakeHub, tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    cache = Path(os.environ["HF_HUB_CACHE"])
    hub.stall_once.add(CUT_FILE)
    partial = kill_mid_file("hf", "*.incomplete", cache)
    hub.release.set()
    size = len((tiny_repo / CUT_FILE).read_bytes())
    assert 0 < partial < size

    # the bytes already there count in the space check: just enough free space for the rest
    needed = wanted_bytes(tiny_repo) - partial
    monkeypatch.setattr(hf_source.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - needed - 1000, needed + 1000))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    served_before = hub.bytes_served[CUT_FILE]
    path = model_registry.download(MODEL)

    assert (CUT_FILE, f"bytes={partial}-") in hub.range_requests  # resumed from the bytes on disk
    assert hub.bytes_served[CUT_FILE] - served_before == size - partial
    assert (path / CUT_FILE).read_bytes() == (tiny_repo / CUT_FILE).read_bytes()
    assert model_registry.is_downloaded(MODEL)
    assert not list(cache.rglob("*.incomplete")), "a partial file was left in the cache"


def test_a_failed_attempt_keeps_its_bytes_for_the_next(hub: FakeHub, tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    hub.broken.add(CUT_FILE)  # half the file, then HTTP 500
    with pytest.raises(UserFacingError, match="interrupted"):
        model_registry.download(MODEL)
    cache = Path(os.environ["HF_HUB_CACHE"])
    kept = [p for p in cache.rglob("*.incomplete")]
    assert len(kept) == 1 and kept[0].stat().st_size > 0  # one partial per file, under a stable name
    hub.broken.clear()
    hub.range_requests.clear()
    path = model_registry.download(MODEL)
    assert [f for f, _ in hub.range_requests] == [CUT_FILE]
    assert (path / CUT_FILE).read_bytes() == (tiny_repo / CUT_FILE).read_bytes()
    assert not list(cache.rglob("*.incomplete"))


def test_a_killed_modelscope_download_resumes(tiny_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = repo_files(tiny_repo)
    server = FakeModelScope(REPO, files, stall_once={CUT_FILE})
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", server.url)
    cache = Path(os.environ["MODELSCOPE_CACHE"])
    try:
        partial = kill_mid_file("modelscope", "*.incomplete", cache)
        server.release.set()
        size = len(files[CUT_FILE])
        needed = wanted_bytes(tiny_repo) - partial
        from model_registry import modelscope_source

        monkeypatch.setattr(modelscope_source, "_free_bytes", lambda p: needed + 1000)
        path = model_registry.download(MODEL, source="modelscope")
    finally:
        server.close()
    assert (CUT_FILE, f"bytes={partial}-") in server.ranges
    assert server.bytes_served[CUT_FILE] == size // 2 + size - partial or server.bytes_served[CUT_FILE] < 1.1 * size
    assert (path / CUT_FILE).read_bytes() == files[CUT_FILE]
    assert not list(cache.rglob("*.incomplete"))


# --------------------------------------------------------------------------- a hub that never answers


class SilentServer(LoopbackServer):
    """Accepts connections and reads requests, never answers (`answer_root`: except for `/`)."""

    def __init__(self, answer_root: bool = False) -> None:
        self.stop = threading.Event()
        silent = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if answer_root and self.path == "/":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                silent.stop.wait(60)

            do_HEAD = do_GET

        self.serve(Handler)

    def close(self) -> None:
        self.stop.set()
        super().close()


def test_a_hub_that_never_answers_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    server = SilentServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # LOWVRAM_HUB_TIMEOUT is 2 here
    try:
        start = time.monotonic()
        with pytest.raises(UserFacingError) as info:
            model_registry.download(MODEL)
        assert time.monotonic() - start < 10
    finally:
        server.close()
    message = str(info.value)
    assert "no answer in 2 s" in message and "Nothing was downloaded" in message, message
    assert "interrupted" not in message and "continue where it stopped" not in message


# --------------------------------------------------------------------------- where downloads go


def test_a_download_folder_receives_the_download_and_the_standard_cache_is_reused(
    hub: FakeHub, tiny_repo: Path, tmp_path: Path
) -> None:
    target = tmp_path / "persistent"
    path = model_registry.download(MODEL, download_dir=target)
    assert path.is_relative_to(target / "huggingface" / "hub")
    assert not Path(os.environ["HF_HUB_CACHE"]).exists()  # nothing went to the standard cache
    assert model_registry.is_downloaded(MODEL, target) and model_registry.local_path(MODEL, target) == path

    # a copy already in the standard cache is used as it is, whatever the download folder
    other = tmp_path / "other"
    snapshot = make_hf_cache(Path(os.environ["HF_HUB_CACHE"]), REPO, tiny_repo)
    hub.gets.clear()
    assert model_registry.download(MODEL, models_dir=other, download_dir=other) == snapshot
    assert not hub.gets


def test_a_hub_that_stops_answering_after_the_first_request_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    server = SilentServer(answer_root=True)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "3")
    try:
        with pytest.raises(UserFacingError) as info:
            model_registry.download(MODEL)
    finally:
        server.close()
    message = str(info.value)
    assert "no answer in 3 s" in message and "interrupted" not in message, message


def test_a_modelscope_hub_that_never_answers_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    server = SilentServer()
    env = {**os.environ, "MODELSCOPE_ENDPOINT": server.url}  # LOWVRAM_HUB_TIMEOUT is 2 here
    script = (
        "import model_registry\n"
        "try:\n"
        "    model_registry.download('z-image-turbo', source='modelscope')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    try:
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parents[1],
                             capture_output=True, text=True, timeout=120).stdout
        elapsed = time.monotonic() - start
    finally:
        server.close()
    assert out.startswith("UserFacingError") and "no answer in 2 s" in out and "Nothing was downloaded" in out, out
    assert elapsed < 30  # not modelscope's own read timeout (60 s) times its retries
