"""What the tests' loopback HTTP servers share: answering `Range: bytes=N-[M]` as real servers do."""

from __future__ import annotations

import re


def send_range_headers(handler, data: bytes, use_range: bool = True) -> tuple[int, int] | None:
    """Send the status and headers for `data` as the request's Range asks (206 with Content-Range,
    200 without a Range or when `use_range` is false, 416 past the end); return the (start, end)
    bytes to write, inclusive, or None when there is no body to write (416)."""
    start, end = 0, len(data) - 1
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", handler.headers.get("Range") or "")
    if m and use_range:
        start, end = int(m[1]), min(int(m[2]), end) if m[2] else end
        if start >= len(data):
            handler.send_response(416)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
    else:
        handler.send_response(200)
    handler.send_header("Content-Length", str(end - start + 1))
    handler.send_header("Accept-Ranges", "bytes")
    handler.end_headers()
    return start, end
