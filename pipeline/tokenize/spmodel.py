"""A SentencePiece model's pieces and settings, read from its serialized ModelProto.

The few fields of sentencepiece_model.proto the exact encoder needs (cuts.py), read from the
wire format without a protobuf dependency; defaults are the proto2 defaults of the .proto file.
Also the one-field patch that turns a model's dummy prefix off (the encoder's copy of the model).
"""

from __future__ import annotations

import os
from typing import Any

# ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}

# add_dummy_prefix = false, as a normalizer_spec (field 3) sub-message to append to a
# serialized ModelProto: a later occurrence of a singular message field is merged into the
# earlier one, so only that flag changes.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of each field of a serialized message, in order."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            val = buf[pos:pos + n]
            pos += n
        elif wire == 5:
            val = buf[pos:pos + 4]
            pos += 4
        elif wire == 1:
            val = buf[pos:pos + 8]
            pos += 8
        else:
            raise ValueError(f"not a SentencePiece model: wire type {wire}")
        if pos > end:
            raise ValueError("not a SentencePiece model: truncated")
        yield num, val


def _piece(buf: bytes) -> tuple[str, int]:
    """(piece, type) of a serialized ModelProto.SentencePiece: ``_fields`` unrolled for its
    three fields (tens of thousands of them per model)."""
    piece, typ = "", NORMAL
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = (buf[pos], pos + 1) if buf[pos] < 0x80 else _varint(buf, pos)
        wire = key & 7
        if wire == 2:
            n, pos = (buf[pos], pos + 1) if buf[pos] < 0x80 else _varint(buf, pos)
            if key >> 3 == 1:
                piece = buf[pos:pos + n].decode("utf-8")
            pos += n
        elif wire == 0:
            v, pos = (buf[pos], pos + 1) if buf[pos] < 0x80 else _varint(buf, pos)
            if key >> 3 == 3:
                typ = v
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise ValueError(f"not a SentencePiece model: wire type {wire}")
        if pos > end:
            raise ValueError("not a SentencePiece model: truncated")
    return piece, typ


_TRAINER_BOOLS = {21: "split_by_unicode_script", 22: "split_by_whitespace", 23: "split_by_number",
                  24: "treat_whitespace_as_suffix", 25: "split_digits",
                  26: "allow_whitespace_only_pieces", 35: "byte_fallback"}
_NORMALIZER_BOOLS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}


def model_info(model: Any) -> dict:
    """Pieces, piece types, trainer and normalizer settings of a SentencePiece model.

    ``model``: a path, the serialized ``ModelProto`` (bytes), a ``SentencePieceProcessor``, or a
    ``sentencepiece_model_pb2.ModelProto``.
    """
    buf = model_bytes(model)
    info = {
        "pieces": [], "types": [],
        "model_type": 1, "vocab_size": 8000, "max_sentencepiece_length": 16,
        "split_by_unicode_script": True, "split_by_whitespace": True, "split_by_number": True,
        "treat_whitespace_as_suffix": False, "split_digits": False,
        "allow_whitespace_only_pieces": False, "byte_fallback": False,
        "normalizer_name": "", "precompiled_charsmap": b"", "add_dummy_prefix": True,
        "remove_extra_whitespaces": True, "escape_whitespaces": True,
    }
    for num, val in _fields(buf):
        if num == 1:  # pieces
            piece, typ = _piece(val)
            info["pieces"].append(piece)
            info["types"].append(typ)
        elif num == 2:  # trainer_spec (repeated occurrences merge: later fields win)
            for n, v in _fields(val):
                if n == 3:
                    info["model_type"] = v
                elif n == 4:
                    info["vocab_size"] = v
                elif n == 20:
                    info["max_sentencepiece_length"] = v
                elif n in _TRAINER_BOOLS:
                    info[_TRAINER_BOOLS[n]] = bool(v)
        elif num == 3:  # normalizer_spec
            for n, v in _fields(val):
                if n == 1:
                    info["normalizer_name"] = bytes(v).decode("utf-8", "replace")
                elif n == 2:
                    info["precompiled_charsmap"] = bytes(v)
                elif n in _NORMALIZER_BOOLS:
                    info[_NORMALIZER_BOOLS[n]] = bool(v)
    return info


def model_bytes(model: Any) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            return f.read()
    if hasattr(model, "serialized_model_proto"):  # SentencePieceProcessor
        return model.serialized_model_proto()
    if hasattr(model, "SerializeToString"):  # sentencepiece_model_pb2.ModelProto
        return model.SerializeToString()
    raise TypeError(f"not a SentencePiece model: {type(model).__name__}")
