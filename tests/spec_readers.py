"""Readers of the shard formats written from the byte layouts in REFERENCES (Megatron's MMIDIDX
v1 and TinyLlama's LITPKDS), independent of pipeline/formats: the tests read our shards with these."""

from __future__ import annotations

import struct

import numpy as np

SPEC_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                        7: np.float32, 8: np.uint16}
SPEC_LITPKDS_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32,
                       7: np.float64, 8: np.uint16}


def spec_read_megatron(prefix) -> list[np.ndarray]:
    idx = open(f"{prefix}.idx", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", idx, 9)
    (code,) = struct.unpack_from("<B", idx, 17)
    seq_count, doc_count = struct.unpack_from("<QQ", idx, 18)
    assert version == 1
    off = 34
    lengths = np.frombuffer(idx, "<i4", seq_count, off)
    off += 4 * seq_count
    pointers = np.frombuffer(idx, "<i8", seq_count, off)
    off += 8 * seq_count
    doc_idx = np.frombuffer(idx, "<i8", doc_count, off)
    assert off + 8 * doc_count == len(idx)
    assert list(doc_idx) == list(range(seq_count + 1))  # one sequence per document
    dt = np.dtype(SPEC_MEGATRON_DTYPES[code])
    data = open(f"{prefix}.bin", "rb").read()
    assert len(data) == int(lengths.sum()) * dt.itemsize
    return [np.frombuffer(data, dt, int(n), int(p)) for n, p in zip(lengths, pointers)]


def spec_read_litpkds(path) -> tuple[np.dtype, int, np.ndarray]:
    raw = open(path, "rb").read()
    assert raw[:7] == b"LITPKDS"
    assert struct.unpack_from("<Q", raw, 7) == (1,)
    (code,) = struct.unpack_from("<B", raw, 15)
    (chunk,) = struct.unpack_from("<Q", raw, 16)
    dt = np.dtype(SPEC_LITPKDS_DTYPES[code])
    assert len(raw) == 24 + chunk * dt.itemsize
    return dt, chunk, np.frombuffer(raw, dt, chunk, 24)
