"""pipeline/stats/report.py: `tinyprep report` opened in headless Chromium (Debian's `chromium`).

The page of the reference run must be self-contained, hold every chart as SVG in the DOM, and
paint them: the screenshot is decoded here (PNG: zlib + the five row filters) and must show the
sources' colours over large areas, not a blank page.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import tinyprep

from pipeline.stats.report import PALETTE, render_html
from pipeline.stats.summary import collect

CHROMIUM = "/usr/bin/chromium"
CHARTS = ("mixture", "epochs", "accounting", "lengths-slimpajama", "lengths-starcoderdata", "dedup", "clusters",
          "shards", "timeline")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: the report test needs Debian's chromium "
                    f"(apt-get install chromium; .ci/run installs it)")
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)


def read_png(path: Path) -> np.ndarray:
    """Pixels (height, width, channels) of an 8-bit RGB/RGBA PNG, no interlace (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + n
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    ch = 3 if color == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, w * ch + 1)
    ftype = raw[:, 0].astype(np.int32)
    filtered = raw[:, 1:].astype(np.int32).reshape(h, w, ch)
    # Undo the row filters. Pixel (r, x) depends on (r, x-1), (r-1, x) and (r-1, x-1), so all pixels
    # of an anti-diagonal r + x = d are independent: decode one diagonal per step.
    out = np.zeros((h + 1, w + 1, ch), np.int32)  # a zero row and column in front
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h, d + 1))
        x = d - r
        a, b, c = out[r + 1, x], out[r, x + 1], out[r, x]  # left, up, up-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        t = ftype[r][:, None]
        pred = np.select([t == 0, t == 1, t == 2, t == 3], [0, a, b, (a + b) >> 1], paeth)
        out[r + 1, x + 1] = (filtered[r, x] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


def test_png_reader_undoes_every_row_filter():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (6, 5, 3)).astype(np.int32)
    rows = []
    for r in range(6):  # encode row r with filter r % 5, as a PNG encoder would
        t, cur = r % 5, img[r]
        up = img[r - 1] if r else np.zeros_like(cur)
        left = np.vstack([np.zeros((1, 3), np.int32), cur[:-1]])
        ul = np.vstack([np.zeros((1, 3), np.int32), up[:-1]])
        p = left + up - ul
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - ul)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        pred = [np.zeros_like(cur), left, up, (left + up) >> 1, paeth][t]
        rows.append(bytes([t]) + ((cur - pred) & 255).astype(np.uint8).tobytes())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"tinyprep-filters-{os.getpid()}.png"
    path.write_bytes(png)
    try:
        assert np.array_equal(read_png(path), img.astype(np.uint8))
    finally:
        path.unlink()


def test_report_opens_in_chromium_and_shows_its_plots(reference, workdir, tmp_path):
    run = reference[0]
    page = tmp_path / "report.html"
    r = tinyprep("report", str(run), "-o", str(page), cwd=workdir)
    assert r.returncode == 0 and page.exists(), r.stderr
    html = page.read_text()
    # self-contained: nothing is fetched (the SVG namespace is a name, not a request)
    assert re.findall(r"https?://[^\s\"'<>]+", html.replace('xmlns="http://www.w3.org/2000/svg"', "")) == []
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    # the DOM Chromium builds holds every section and chart, with their marks
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    for section in ("overview", "mixture", "accounting", "lengths", "dedup", "shards", "timeline"):
        assert f'id="{section}"' in dom.stdout, section
    assert "data-missing" not in dom.stdout  # the sample run has every part
    charts = dict(re.findall(r'<svg class="chart" data-chart="([^"]+)"(.*?)</svg>', dom.stdout, re.S))
    assert set(CHARTS) <= set(charts)
    for name in CHARTS:
        assert charts[name].count("<rect") >= 2, name
    shards = len(collect(str(run))["shards"])
    assert charts["shards"].count("<rect") == shards
    # the screenshot shows them: large areas in the sources' colours, many colours, little blank page
    shot = tmp_path / "report.png"
    r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2400", "--hide-scrollbars", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr
    img = read_png(shot)[..., :3]
    assert img.shape[:2] == (2400, 1400)
    rgb = img.astype(np.int32)
    pixels = ((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).ravel()
    colors, counts = np.unique(pixels, return_counts=True)
    painted = dict(zip(colors.tolist(), counts.tolist()))
    for color in PALETTE[:2]:  # slimpajama, starcoderdata: bars of the mixture, accounting and lengths charts
        assert painted.get(int(color[1:], 16), 0) > 20_000, (color, painted.get(int(color[1:], 16), 0))
    assert len(colors) > 500
    background = painted.get(0xF5F7FA, 0) + painted.get(0xFFFFFF, 0)
    assert 0.05 < 1 - background / len(pixels) < 0.9


def test_report_of_a_partial_run_says_what_is_missing(reference, tmp_path):
    run = tmp_path / "partial"
    (run / "stats").mkdir(parents=True)
    shutil.copy(reference[0] / "recipe.yaml", run / "recipe.yaml")
    for stage in ("download", "ingest"):
        shutil.copy(reference[0] / "stats" / f"{stage}.json", run / "stats" / f"{stage}.json")
    html = render_html(collect(str(run)))
    for what in ("mixture", "lengths", "dedup", "shards"):
        assert f'data-missing="{what}"' in html, what
    assert 'data-chart="accounting"' in html and "stage dedup: not run" in html
    assert render_html(collect(str(run))) == html  # the same document gives the same page
