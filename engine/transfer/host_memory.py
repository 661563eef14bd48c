"""How much host RAM this process can really use, and how much of it may be pinned.

`psutil.virtual_memory().available` is the machine's view. In a container the cgroup's
`memory.max` is the real ceiling: pinning half of the machine's free RAM there gets the process
killed, or makes one large cudaHostRegister fail. Under WSL2, Windows backs the VM's RAM and
page-locks it through its own driver; how much it allows is not published (NVIDIA forum thread
255472: "depends on internal details of the operating system"), and large pins fail well below
the VM's total in reports. So the default pinned budget is a share of what is available to this
process, smaller under WSL2; registering in ~1 GiB pieces (engine.transfer.pinned) keeps what
the OS grants either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import psutil

DEFAULT_PINNED_SHARE = 0.5  # of the RAM available to this process when the first arena is built
WSL_PINNED_SHARE = 0.25  # under WSL2 (see the module docstring): pinning there is granted sparingly
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class HostMemory:
    """What the host gives this process: `available_bytes` is the smaller of the machine's
    available RAM and the room left under the cgroup's limit."""

    total_bytes: int
    machine_available_bytes: int
    cgroup_limit_bytes: int | None  # None: no limit found
    cgroup_used_bytes: int | None
    wsl: bool

    @property
    def available_bytes(self) -> int:
        if self.cgroup_limit_bytes is None or self.cgroup_used_bytes is None:
            return self.machine_available_bytes
        return max(0, min(self.machine_available_bytes, self.cgroup_limit_bytes - self.cgroup_used_bytes))

    @property
    def pinned_share(self) -> float:
        return WSL_PINNED_SHARE if self.wsl else DEFAULT_PINNED_SHARE

    @property
    def default_pinned_bytes(self) -> int:
        return int(self.available_bytes * self.pinned_share)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _inactive_file(stat_path: Path, key: str) -> int:
    """Page cache the kernel can drop before it kills anyone: not counted as used."""
    try:
        for line in stat_path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_memory(root: Path = Path("/")) -> tuple[int | None, int | None]:
    """(limit, used) bytes of this process's memory cgroup, the tightest limit on its path
    (v2: memory.max of each ancestor; v1: memory.limit_in_bytes); (None, None) without one."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, None
    fs = root / "sys/fs/cgroup"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":  # cgroup v2 (unified)
            best: tuple[int, Path] | None = None
            here = Path(path.lstrip("/"))
            for ancestor in [here, *here.parents]:
                limit = _read_int(fs / ancestor / "memory.max")
                if limit is not None and (best is None or limit < best[0]):
                    best = (limit, fs / ancestor)
            if best is None:
                continue  # a hybrid host: the memory controller may be on a v1 line
            used = _read_int(best[1] / "memory.current")
            if used is not None:
                used -= _inactive_file(best[1] / "memory.stat", "inactive_file")
            return best[0], used
        if "memory" in controllers.split(","):  # cgroup v1
            base = fs / "memory"
            for where in (base / path.lstrip("/"), base):
                limit = _read_int(where / "memory.limit_in_bytes")
                if limit is not None:
                    used = _read_int(where / "memory.usage_in_bytes")
                    if used is not None:
                        used -= _inactive_file(where / "memory.stat", "total_inactive_file")
                    return limit, used
    return None, None


def is_wsl(root: Path = Path("/")) -> bool:
    """Running inside WSL2 (its kernel names Microsoft in /proc/version)."""
    if os.environ.get("WSL_DISTRO_NAME") and root == Path("/"):
        return True
    try:
        return "microsoft" in (root / "proc/version").read_text().lower()
    except OSError:
        return False


def host_memory(root: Path = Path("/")) -> HostMemory:
    vm = psutil.virtual_memory()
    limit, used = cgroup_memory(root)
    return HostMemory(int(vm.total), int(vm.available), limit, used, is_wsl(root))
