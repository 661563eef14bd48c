"""Issue 25, point 10: the self-check (`python app.py --doctor`, the page's "System check").

On this CPU host it runs for real: it says there is no GPU and still reports RAM, the disk and
the CPU settings, within seconds. Its GPU branch runs with torch.cuda's queries patched (a T4, an
RTX 5090 with a torch that lacks sm_120 kernels), the link probe faked and the streamed run done
for real on the CPU through the scheduler (engine.transfer.devices.CpuBackend).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import engine.generation.doctor as doctor
from engine.transfer.devices import CpuBackend

ROOT = Path(__file__).resolve().parent.parent
GiB = 1024**3


def model_dir_with_a_file(tmp_path: Path, mib: int = 24) -> Path:
    d = tmp_path / "models" / "some-model"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * (mib * 1024**2))
    return tmp_path / "models"


def test_on_a_cpu_host_it_says_so_and_reports_ram_disk_and_cpu(tmp_path):
    models = model_dir_with_a_file(tmp_path)
    t0 = time.perf_counter()
    report = doctor.run_doctor(models)
    took = time.perf_counter() - t0
    json.dumps(report)  # attachable as it is
    assert report["gpu"]["available"] is False and "CUDA" in report["gpu"]["why"]
    assert report["system"]["torch_threads"] >= 1 and report["system"]["cpus"] >= 1
    assert 0 < report["ram"]["available_bytes"] <= report["ram"]["total_bytes"]
    disk = report["disk"]
    assert disk["file"].endswith("model.safetensors") and disk["bytes"] == 24 * 1024**2 and disk["mb_s"] > 0
    assert "skipped" in report["transfer"] and "no GPU" in report["streamed_run"]["skipped"]
    assert report["problems"] == []
    text = doctor.render_text(report)
    for line in ("GPU: none", "RAM:", "CPU:", "Model folder disk:", "Streamed run: skipped", "Recommended:", "No GPU"):
        assert line in text, line
    assert took < 20, took


def test_an_empty_model_folder_is_measured_with_a_temporary_file_it_removes(tmp_path):
    out = doctor.disk_section(tmp_path)
    assert out["bytes"] == doctor.DISK_BYTES and out["mb_s"] > 0 and "temporary" in out["file"]
    assert list(tmp_path.iterdir()) == []
    assert "skipped" in doctor.disk_section(tmp_path / "missing")


def test_app_doctor_json_prints_the_report_without_building_the_ui(tmp_path):
    code = ("import sys, app; app.main(['--doctor', '--json', '--model-dir', sys.argv[1]]); "
            "print('GRADIO' if 'gradio' in sys.modules else 'NO-GRADIO', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["gpu"]["available"] is False and report["recommended"]
    assert "NO-GRADIO" in proc.stderr
    bad = subprocess.run([sys.executable, "app.py", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--json goes with --doctor" in bad.stderr


@pytest.mark.parametrize(
    "capability, arches, ok, says",
    [
        ((8, 9), ["sm_80", "sm_86", "sm_89", "sm_90"], True, "sm_89 kernels"),
        ((8, 6), ["sm_75", "sm_80", "sm_90"], True, "sm_80 kernels run on sm_86"),
        ((12, 0), ["sm_80", "sm_86", "sm_90", "compute_90"], True, "compute_90 PTX"),
        ((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], False, "install a build that lists sm_120"),
    ],
)
def test_kernels_are_judged_from_the_arch_list(capability, arches, ok, says):
    got, text = doctor._kernels_for(capability, arches)
    assert got is ok and says in text


def patch_gpu(monkeypatch, name: str, capability: tuple[int, int], arches: list[str], free: int, total: int, reserved: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(name=name, total_memory=total))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved)


def run_on_cpu(calls: list):
    """The streamed run for real, on the CPU through the scheduler, small enough for a test."""
    real = doctor.streamed_section

    def fake(device, h2d_gib_s):
        calls.append((device, h2d_gib_s))
        return real(torch.device("cpu"), h2d_gib_s, backend=CpuBackend(), dim=128, depth=4, tokens=32, steps=2)

    return fake


def test_gpu_branch_on_a_t4_with_other_programs_holding_vram(tmp_path, monkeypatch):
    patch_gpu(monkeypatch, "Tesla T4", (7, 5), ["sm_75", "sm_80", "sm_86", "sm_90"], free=10 * GiB, total=15 * GiB, reserved=1 * GiB)
    monkeypatch.setattr(doctor, "transfer_section", lambda device: {"bytes": doctor.COPY_BYTES, "pin_ok": True, "pinned_gib_s": 11.5, "pageable_gib_s": 4.2})
    calls: list = []
    monkeypatch.setattr(doctor, "streamed_section", run_on_cpu(calls))
    report = doctor.run_doctor(tmp_path)
    g = report["gpu"]
    assert g["available"] and g["name"] == "Tesla T4" and g["capability"] == "7.5" and g["kernels_ok"]
    assert g["vram_others_bytes"] == 4 * GiB  # 15 total - 10 free - 1 this process
    assert g["bf16_fast"] is False
    assert calls == [(torch.device("cuda", 0), 11.5)]  # the run's bound uses the measured pinned rate
    run = report["streamed_run"]
    assert "error" not in run, run
    assert run["s_per_step"] > 0 and run["streamed_bytes_per_step"] >= 0.9 * run["weights_bytes"]  # every block, every step
    assert run["transfer_bound_s"] == pytest.approx(run["streamed_bytes_per_step"] / (11.5 * GiB))
    assert run["sync_fallbacks"] == 0
    assert run["overlap"] is None or 0.0 <= run["overlap"] <= 1.0
    text = doctor.render_text(report)
    for words in ("GPU: Tesla T4", "compute capability 7.5", "10.0 GB free of 15.0 GB; other programs hold 4.0 GB",
                  "11.5 GiB/s pinned, 4.2 GiB/s pageable", "Pinnable RAM:", "transfer bound", "overlap",
                  "fp16 is the fast path", "Other programs hold 4.0 GB", "VRAM limit: Auto (about 9.5 GB"):
        assert words in text, words
    json.dumps(report)


def test_gpu_branch_names_the_torch_to_install_and_a_failed_pin(tmp_path, monkeypatch):
    patch_gpu(monkeypatch, "NVIDIA GeForce RTX 5090", (12, 0), ["sm_75", "sm_80", "sm_86", "sm_90"], free=30 * GiB, total=32 * GiB, reserved=0)
    monkeypatch.setattr(doctor, "transfer_section", lambda device: {"bytes": doctor.COPY_BYTES, "pin_ok": False, "pageable_gib_s": 5.0})

    def broken_run(device, h2d):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(doctor, "streamed_section", broken_run)
    report = doctor.run_doctor(tmp_path)
    assert report["gpu"]["kernels_ok"] is False
    text = doctor.render_text(report)
    assert "Fix first:" in text and "sm_120" in text and "download.pytorch.org/whl/cu128" in text
    assert "Pinning host memory failed" in text and "test pin FAILED" in text
    assert "Streamed run: failed (RuntimeError: CUDA error: no kernel image" in text  # reported, the check went on
    assert report["problems"] and "Recommended:" in text


def test_the_page_button_shows_the_report(tmp_path):
    from tests.browser.fake_studio import FakeStudio
    from ui.handlers import Handlers

    studio = FakeStudio(tmp_path / "m", tmp_path / "o")
    studio.requests = SimpleNamespace(models_dir=model_dir_with_a_file(tmp_path, mib=17))
    text = Handlers(studio).system_check()
    assert text.startswith("lowvram-studio system check") and "model.safetensors" in text and "GPU: none" in text
