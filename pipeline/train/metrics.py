"""Training metrics: a JSON line per logged step in RUN/<train.dir>/metrics.jsonl, and the console.

MFU as torchtitan computes it: flops_per_token = 6 (N - N_embedding) + 12 layers heads head_dim
seq_len; MFU = flops_per_token x tokens/s of one device / that device's peak (bf16 dense, without
2:4 sparsity: the datasheets' "with sparsity" figures are twice it).

A resumed run replays the steps after its checkpoint, so before it appends, metrics.jsonl is cut
back to the records of the checkpoint's step and earlier (`truncate_after`, an atomic rewrite):
every step is in the file once, whatever crashed where.
"""

from __future__ import annotations

import logging
import re
import time

import orjson
import torch

from .. import storage

log = logging.getLogger("tinyprep")

# Peak dense bf16 tensor FLOP/s of one device, by the name torch.cuda.get_device_name reports
# ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", "NVIDIA GH200 480GB").
# The first pattern that matches wins, so a variant comes before its family ("H100 ... PCIe"
# before "H100", "GB200" before "B200", "L40S" before "L40"), and short names are whole words
# ("A10" is not "A100", "L4" is not "L40"). Figures: the vendors' datasheets, whose "with sparsity"
# figures are halved:
#   A100 312 (SXM and PCIe)            https://www.nvidia.com/en-us/data-center/a100/
#   H100 SXM 989, PCIe 756, NVL 835    https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM 989, NVL 835              https://www.nvidia.com/en-us/data-center/h200/
#   GH200 989                          https://www.nvidia.com/en-us/data-center/grace-hopper-superchip/
#   H800 SXM 989, PCIe 756             the H100's tensor cores (H800 product briefs)
#   B200 2,250, GB200 2,500            https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200: 36 PF
#                                      sparse / 8 GPUs), https://www.nvidia.com/en-us/data-center/gb200-nvl72/
#                                      (360 PF sparse / 72 GPUs)
#   L40S 362, L40 181                  https://www.nvidia.com/en-us/data-center/l40s/, .../l40/
#   L4 121                             https://www.nvidia.com/en-us/data-center/l4/
#   A10 125                            https://www.nvidia.com/en-us/data-center/products/a10-gpu/
#   A10G (AWS G5) 70                   https://www.baseten.co/blog/nvidia-a10-vs-a10g-for-ml-model-inference/
#   A40 150, RTX A6000 155             A40 and RTX A6000 datasheets (299.4 / 309.7 sparse)
#   RTX 6000 Ada 364, RTX 4090 165     NVIDIA Ada Lovelace architecture whitepaper, appendix
#   RTX 3090 71                        NVIDIA Ampere GA102 whitepaper, appendix (fp32 accumulate)
#   MI300X / MI325X 1,307, MI250X 383  https://www.amd.com/en/products/accelerators/instinct/
PEAK_BF16: list[tuple[str, float]] = [
    (r"GH200", 989e12),
    (r"H100.*\bNVL\b", 835e12),
    (r"H100.*\bPCIe\b", 756e12),
    (r"H100", 989e12),
    (r"H200.*\bNVL\b", 835e12),
    (r"H200", 989e12),
    (r"H800.*\bPCIe\b", 756e12),
    (r"H800", 989e12),
    (r"GB200", 2.5e15),
    (r"B200", 2.25e15),
    (r"A100", 312e12),
    (r"A800", 312e12),
    (r"L40S", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10G\b", 70e12),
    (r"\bA10\b", 125e12),
    (r"\bA40\b", 150e12),
    (r"RTX 6000 Ada", 364e12),
    (r"RTX A6000", 155e12),
    (r"RTX 4090", 165e12),
    (r"RTX 3090", 71e12),
    (r"MI3(00|25)X", 1307e12),
    (r"MI250X", 383e12),
]
_PEAK_PATTERNS = [(re.compile(p, re.IGNORECASE), v) for p, v in PEAK_BF16]
_warned: set[str] = set()


def peak_by_name(name: str) -> float | None:
    """The table's peak for a device name (the first pattern that matches), else None."""
    for pattern, value in _PEAK_PATTERNS:
        if pattern.search(name):
            return value
    return None


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s: configured, else by GPU name; None on CPU and on a GPU the table
    does not know (no MFU; said once per name)."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    value = peak_by_name(name)
    if value is None and name not in _warned:
        _warned.add(name)
        log.warning(f"train: no peak bf16 FLOP/s known for GPU {name!r}: no MFU is reported; set "
                    "train.peak_flops (FLOP/s of one device, dense) to have it")
    return value


def truncate_after(path: str, step: int) -> int:
    """Cut the local metrics.jsonl at `path` back to its records of `step` and earlier (and drop
    any line that does not parse, such as one cut short by a crash): written to a temporary file
    beside it and renamed over it. Returns how many lines were dropped (0: the file is untouched)."""
    try:
        with open(path, "rb") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return 0
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        with storage.atomic_open(str(path)) as fh:
            fh.write(b"".join(line + b"\n" for line in kept))
    return dropped


class MetricsLog:
    """Appends records to metrics.jsonl and prints a line per record; a no-op without a url (the
    ranks other than 0)."""

    def __init__(self, url: str | None):
        self.url = url
        self._fh = None
        if url is not None:
            fs, path = storage.url_to_fs(url)
            fs.makedirs(fs._parent(path), exist_ok=True)
            self._fh = fs.open(path, "ab")

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        record = {"time": round(time.time(), 3), **record}
        self._fh.write(orjson.dumps(record) + b"\n")
        self._fh.flush()
        log.info(format_line(record))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def format_line(r: dict) -> str:
    if r.get("kind") == "eval":
        per = " ".join(f"{k} {v:.4f}" for k, v in r.get("per_source", {}).items())
        return f"step {r['step']:>6} | val loss {r['val_loss']:.4f} ({per})"
    parts = [f"step {r['step']:>6}/{r['max_steps']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"grad {r['grad_norm']:.3f}", f"{r['tokens_per_s']:,.0f} tok/s"]
    if r.get("data_wait"):
        parts.append(f"data wait {100 * r['data_wait']:.1f}%")
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(" ".join(f"{k} {v['epochs']:.3f}ep" for k, v in r.get("sources", {}).items()))
    return " | ".join(parts)
