"""Training metrics: a JSON line per logged step in RUN/<train.dir>/metrics.jsonl, and the console.

MFU as torchtitan computes it: flops_per_token = 6 (N - N_embedding) + 12 layers heads head_dim
seq_len; MFU = flops_per_token x tokens/s of one device / that device's peak (bf16 dense).
"""

from __future__ import annotations

import logging
import time

import orjson
import torch

from .. import storage

log = logging.getLogger("tinyprep")

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
             "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak FLOP/s: configured, else by GPU name; None on CPU (no MFU)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_BF16.items():
            if key in name:
                return value
    return None


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
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(" ".join(f"{k} {v['epochs']:.3f}ep" for k, v in r.get("sources", {}).items()))
    return " | ".join(parts)
