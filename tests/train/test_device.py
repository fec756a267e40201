"""Choosing the training device (distributed.pick_device): GPUs that torch cannot use are an error,
not a quiet fall-back to CPU.

A fake `nvidia-smi` on PATH plays the driver (GPUs listed, a banner with the driver's CUDA version,
a failure, a hang, or none at all); torch's own view (`torch.cuda.is_available`, the CUDA version it
was built for) is monkeypatched, so the cases run the same on a machine with or without GPUs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import synthetic
import torch
import yaml
from conftest import tinyprep

from pipeline.train import distributed
from pipeline.train.distributed import DeviceError, default_nproc, pick_device

ROOT = Path(__file__).resolve().parents[2]
H100 = "NVIDIA H100 80GB HBM3"


def _banner(driver: str, cuda: str) -> str:
    return ("+-----------------------------------------------------------------------------------------+\n"
            f"| NVIDIA-SMI {driver}              Driver Version: {driver}      CUDA Version: {cuda}     |\n"
            "|-----------------------------------------+------------------------+----------------------+\n")


def fake_nvidia_smi(bin_dir: Path, gpus: int = 8, driver: str = "550.54.15", cuda: str | None = "12.4",
                    body: str | None = None) -> Path:
    """An `nvidia-smi` script in bin_dir: `-L` lists `gpus` H100s, no argument prints the banner of
    `driver` / `cuda` (fails when cuda is None); `body` replaces the whole script. Every call
    appends its arguments to bin_dir/calls."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    listing = "".join(f"GPU {i}: {H100} (UUID: GPU-{i:08x}-1111-2222-3333-444455556666)\\n" for i in range(gpus))
    banner = f"printf '%s' '{_banner(driver, cuda)}'" if cuda else "exit 9"
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" f'echo "$*" >> "{bin_dir}/calls"\n' + (body or (
        f'if [ "$1" = "-L" ]; then printf "{listing}"; exit 0; fi\n{banner}\n')))
    script.chmod(0o755)
    return script


@pytest.fixture
def smi_dir(tmp_path, monkeypatch) -> Path:
    """PATH is this (empty) directory plus the shell's own: no real nvidia-smi is found."""
    d = tmp_path / "bin"
    d.mkdir()
    monkeypatch.setenv("PATH", f"{d}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return d


@pytest.fixture
def torch_sees(monkeypatch):
    """torch's view of the GPUs: torch_sees(n, build) with build "cpu" (CPU-only wheel) or a
    CUDA version ("13.0")."""
    def set_view(n: int, build: str = "cpu") -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.version, "cuda", None if build == "cpu" else build)
        monkeypatch.setattr(torch, "__version__", f"2.13.0+{'cpu' if build == 'cpu' else 'cu' + build.replace('.', '')}")
    return set_view


def _error(preference: str) -> str:
    with pytest.raises(DeviceError) as e:
        pick_device(preference)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_auto_without_nvidia_smi_is_cpu(smi_dir, torch_sees):
    torch_sees(0)
    assert pick_device("auto") == "cpu"
    assert default_nproc("cpu") == 1


def test_gpus_torch_can_use_are_chosen(smi_dir, torch_sees):
    torch_sees(4, "13.0")
    fake_nvidia_smi(smi_dir, gpus=4)
    assert pick_device("auto") == "cuda" and pick_device("cuda") == "cuda"
    assert default_nproc("cuda") == 4
    assert not (smi_dir / "calls").exists()  # nvidia-smi is asked only when torch sees nothing


def test_cpu_asked_for_never_runs_nvidia_smi(smi_dir, torch_sees):
    torch_sees(0)
    fake_nvidia_smi(smi_dir)
    assert pick_device("cpu") == "cpu"
    assert not (smi_dir / "calls").exists()


def test_auto_with_gpus_and_a_cpu_only_torch_is_an_error(smi_dir, torch_sees):
    torch_sees(0)
    fake_nvidia_smi(smi_dir, gpus=8, driver="550.54.15", cuda="12.4")
    msg = _error("auto")
    assert msg.startswith(f"nvidia-smi lists 8 GPUs ({H100}) but torch 2.13.0+cpu (CPU-only build) cannot use them")
    assert "driver 550.54.15, runs CUDA <= 12.4" in msg
    # a CUDA 12 driver: the cu126 build, from PyTorch's index (PyPI's wheel is CUDA 13)
    assert "pip install 'torch==2.13.0+cu126' --extra-index-url https://download.pytorch.org/whl/cu126" in msg
    assert "cu130" not in msg
    assert msg.endswith("or set train.device: cpu to train on CPU anyway")


def test_a_cuda13_torch_on_a_cuda12_driver_is_told_to_take_cu126(smi_dir, torch_sees):
    torch_sees(0, "13.0")  # PyPI's torch 2.13.0 on a driver older than 580
    fake_nvidia_smi(smi_dir, gpus=1, driver="535.183.01", cuda="12.2")
    msg = _error("auto")
    assert msg.startswith(f"nvidia-smi lists 1 GPU ({H100}) but torch 2.13.0+cu130 (CUDA 13.0 build) cannot")
    assert "driver 535.183.01, runs CUDA <= 12.2" in msg and "'torch==2.13.0+cu126'" in msg


def test_a_cuda13_driver_is_told_to_take_cu130(smi_dir, torch_sees):
    torch_sees(0)
    fake_nvidia_smi(smi_dir, driver="580.82.07", cuda="13.0")
    assert "'torch==2.13.0+cu130' --extra-index-url https://download.pytorch.org/whl/cu130" in _error("auto")


def test_a_driver_older_than_cuda12_needs_an_upgrade(smi_dir, torch_sees):
    torch_sees(0, "13.0")
    fake_nvidia_smi(smi_dir, driver="470.256.02", cuda="11.4")
    msg = _error("auto")
    assert "the NVIDIA driver (driver 470.256.02, runs CUDA <= 11.4) is too old for torch 2.13.0" in msg
    assert "upgrade it to 525 or newer" in msg and "pip install" not in msg


def test_a_build_the_driver_runs_points_at_the_gpus_not_the_wheel(smi_dir, torch_sees, monkeypatch):
    torch_sees(0, "12.6")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    fake_nvidia_smi(smi_dir, driver="550.54.15", cuda="12.4")
    msg = _error("auto")
    assert "runs this build" in msg and "CUDA_VISIBLE_DEVICES='7'" in msg and "pip install" not in msg


def test_without_the_banner_both_builds_are_named(smi_dir, torch_sees):
    torch_sees(0)
    fake_nvidia_smi(smi_dir, cuda=None)  # `nvidia-smi -L` works, plain `nvidia-smi` fails
    msg = _error("auto")
    assert "'torch==2.13.0+cu130'" in msg and "drivers >= 580" in msg
    assert "'torch==2.13.0+cu126'" in msg and "drivers >= 525" in msg


def test_gpus_hidden_on_purpose_mean_cpu(smi_dir, torch_sees, monkeypatch):
    torch_sees(0, "13.0")
    fake_nvidia_smi(smi_dir)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert pick_device("auto") == "cpu"


def test_cuda_asked_for_without_a_gpu(smi_dir, torch_sees):
    torch_sees(0)
    msg = _error("cuda")
    assert msg.startswith("train.device is cuda but torch 2.13.0+cpu (CPU-only build) sees no GPU: "
                          "nvidia-smi lists none")
    assert "install a CUDA build (pip install 'torch==2.13.0+cu130'" in msg
    assert msg.endswith("or set train.device: cpu to train on CPU")
    torch_sees(0, "13.0")
    assert "CUDA 13.0 build) sees no GPU: nvidia-smi lists none (no NVIDIA GPU or driver" in _error("cuda")


def test_cuda_asked_for_with_gpus_torch_cannot_use(smi_dir, torch_sees):
    torch_sees(0)
    fake_nvidia_smi(smi_dir, driver="580.82.07", cuda="13.0")
    msg = _error("cuda")
    assert msg.startswith("train.device is cuda but torch 2.13.0+cpu (CPU-only build) sees no GPU")
    assert "'torch==2.13.0+cu130'" in msg


@pytest.mark.parametrize("kind", ["hangs", "fails", "prints nonsense"])
def test_a_broken_nvidia_smi_counts_as_no_gpu(kind, smi_dir, torch_sees, monkeypatch):
    torch_sees(0)
    monkeypatch.setattr(distributed, "NVIDIA_SMI_TIMEOUT", 0.5)
    body = {
        # the shell and its child are killed together (their own process group)
        "hangs": "sleep 30\n",
        "fails": "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver\"\nexit 9\n",
        "prints nonsense": "echo 'No devices were found'\n",
    }[kind]
    fake_nvidia_smi(smi_dir, body=body)
    start = time.monotonic()
    assert pick_device("auto") == "cpu"
    assert "nvidia-smi lists none" in _error("cuda")
    assert time.monotonic() - start < 5
    assert (smi_dir / "calls").read_text().splitlines() == ["-L", "-L"]


def test_nvidia_smi_that_cannot_run_counts_as_no_gpu(smi_dir, torch_sees):
    torch_sees(0)
    (smi_dir / "nvidia-smi").write_text("#!/nonexistent/interpreter\n")
    (smi_dir / "nvidia-smi").chmod(0o755)
    assert pick_device("auto") == "cpu"


def test_tinyprep_train_says_it_in_one_line(tmp_path):
    """Through the CLI: the GPUs nvidia-smi lists but torch cannot use stop `tinyprep train` with one
    line and exit 1, before any process starts."""
    run = tmp_path / "run"
    rng = np.random.default_rng(3)
    synthetic.write_run(str(run), {"web": {"train": [synthetic.documents(rng, 40, 256, 50)]}}, {"web": 1.0},
                        seq_len=32, vocab=256)
    recipe = tmp_path / "train.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "device", "output": str(run), "sources": [{"name": "web", "urls": ["unused"], "weight": 1.0}],
        "mix": {"seq_len": 32, "seed": 42, "token_budget": None},
        "train": {"model": "tiny", "global_batch": 4, "micro_batch": 4, "max_steps": 2, "eval_every": 0}}))
    fake_nvidia_smi(tmp_path / "bin", gpus=2)
    # a device list that names no GPU: torch sees none here even where the machine has some
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "CUDA_VISIBLE_DEVICES": "GPU-00000000-0000-0000-0000-000000000000"}
    proc = tinyprep("train", str(recipe), cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: nvidia-smi lists 2 GPUs ({H100}) but torch "), lines
    assert "or set train.device: cpu to train on CPU anyway" in lines[0]
    assert not (run / "train").exists()
