"""The stats document (pipeline/stats/summary.py) as one self-contained HTML page.

`render_html(summary)` returns the page: inline CSS and inline SVG charts drawn here (no script,
no font, image or style from the network), so the file can be mailed, archived or opened
offline. Sections: key numbers; mixture composition (target, realized and natural shares;
epochs per source); where every document went (the accounting per source, as bars and a
table); document length histograms per source (log-spaced bins, median and p90 marked); dedup
rate per RedPajama set beside SlimPajama's published rates, and dedup cluster sizes; tokens per
shard; the stage timeline (time and throughput per stage). A section whose data the run does not
have yet says what is missing instead of drawing an empty chart.
"""

from __future__ import annotations

import math
from datetime import datetime
from html import escape

from ..stage import STAGES
from .histogram import bin_range

PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#EECA3B", "#9D755D", "#FF9DA6",
           "#BAB0AC")
FATE_COLORS = {"kept": "#54A24B", "filtered": "#9AA5B1", "unreadable": "#D62728", "duplicate_exact": "#F58518",
               "duplicate_fuzzy": "#F2B447", "duplicate_holdout": "#B279A2"}
FATE_LABELS = {"kept": "kept", "filtered": "filtered", "unreadable": "unreadable", "duplicate_exact": "exact duplicate",
               "duplicate_fuzzy": "fuzzy duplicate", "duplicate_holdout": "duplicate of holdout"}
PUBLISHED_COLOR = "#8C8C8C"
WIDTH = 1040  # drawing width of a full-width chart

CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f5f7fa; --card:#fff; --accent:#4C78A8; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { background: linear-gradient(120deg, #243b53, #486581); color:#fff; padding:28px 40px 24px; }
header h1 { margin:0 0 4px; font-size:26px; font-weight:600; letter-spacing:.2px; }
header .sub { color:#d9e2ec; font-size:13px; word-break:break-all; }
.badges { margin-top:12px; display:flex; gap:6px; flex-wrap:wrap; }
.badge { font-size:12px; padding:2px 10px; border-radius:12px; background:rgba(255,255,255,.15); color:#fff; }
.badge.done { background:#3ebd93; } .badge.failed, .badge.incomplete { background:#e66a6a; }
.badge.missing { background:rgba(255,255,255,.25); color:#f0f4f8; }
main { max-width:1120px; margin:0 auto; padding:24px 20px 40px; }
.kpis { display:grid; grid-template-columns:repeat(auto-fit, minmax(150px, 1fr)); gap:14px; margin-bottom:22px; }
.kpi { background:var(--card); border-radius:10px; padding:14px 16px; box-shadow:0 1px 3px rgba(15,23,42,.08); }
.kpi .v { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.kpi .l { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
.kpi .d { color:var(--muted); font-size:12px; }
.card { background:var(--card); border-radius:12px; padding:20px 24px 22px; margin-bottom:22px;
  box-shadow:0 1px 3px rgba(15,23,42,.08); }
.card h2 { margin:0 0 4px; font-size:18px; font-weight:600; }
.card .lead { margin:0 0 14px; color:var(--muted); }
.card h3 { margin:16px 0 6px; font-size:14px; }
.grid2 { display:grid; grid-template-columns:repeat(auto-fit, minmax(480px, 1fr)); gap:10px 24px; }
.notes { border-left:4px solid #f0b429; background:#fffbea; padding:10px 16px; border-radius:6px; margin-bottom:22px; }
.notes.problems { border-color:#e12d39; background:#ffe3e3; }
.notes ul { margin:4px 0 0; padding-left:18px; }
.empty { padding:18px; border:1px dashed #bcccdc; border-radius:8px; color:var(--muted); background:#f8fafc; }
table { border-collapse:collapse; width:100%; font-size:13px; margin-top:10px; }
th, td { padding:5px 8px; border-bottom:1px solid var(--line); text-align:right; white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td { font-variant-numeric:tabular-nums; }
tr.src td { font-weight:600; background:#f8fafc; }
tr.sub td:first-child { padding-left:22px; color:#334e68; }
.ok { color:#199473; font-weight:600; } .bad { color:#cf1124; font-weight:600; }
.legend { display:flex; flex-wrap:wrap; gap:14px; margin:8px 0 2px; font-size:12px; color:var(--muted); }
.legend i { display:inline-block; width:11px; height:11px; border-radius:2px; margin-right:5px; vertical-align:-1px; }
svg.chart { display:block; max-width:100%; height:auto; }
svg.chart text { font-family: inherit; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:10px 0 30px; }
"""


# ---------------------------------------------------------------------------------------------
# Formatting


def _n(v) -> str:
    return "—" if v is None else f"{v:,}"


def _pct(v, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _si(v: float) -> str:
    """1234567 -> 1.23M."""
    if v is None:
        return "—"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _bytes(v) -> str:
    if v is None:
        return "—"
    for div, suffix in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if v >= div:
            return f"{v / div:.2f} {suffix}"
    return f"{v} B"


def _e(s) -> str:
    return escape(str(s), quote=True)


def _colors(summary: dict) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(summary["sources"])}


# ---------------------------------------------------------------------------------------------
# SVG primitives


def _svg(name: str, width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg class="chart" data-chart="{_e(name)}" xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(label)}">' + "".join(body) + "</svg>")


def _rect(x, y, w, h, fill, tip: str = "", extra: str = "") -> str:
    title = f"<title>{_e(tip)}</title>" if tip else ""
    return (f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(w, 0):.2f}" height="{max(h, 0):.2f}" fill="{fill}" '
            f'{extra}>{title}</rect>')


def _text(x, y, s, size=12, fill="#334e68", anchor="start", weight="normal", extra: str = "") -> str:
    return (f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" fill="{fill}" text-anchor="{anchor}" '
            f'font-weight="{weight}" {extra}>{_e(s)}</text>')


def _line(x1, y1, x2, y2, stroke="#cbd2d9", width=1, dash: str = "") -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="{stroke}" '
            f'stroke-width="{width}"{d}/>')


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(f'<span><i style="background:{c}"></i>{_e(l)}</span>'
                                            for l, c in items) + "</div>"


def _empty(what: str, why: str) -> str:
    return f'<div class="empty" data-missing="{_e(what)}">{_e(why)}</div>'


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * p:
            return m * p
    return 10 * p


def _stacked_bar(y: float, x0: float, width: float, height: float, parts: list[tuple[str, float, str, str]],
                 total: float) -> list[str]:
    """A 100% bar: parts (label, value, color, tooltip); labels inside the segments that have room."""
    out, x = [], x0
    for label, value, color, tip in parts:
        if not value or not total:
            continue
        w = width * value / total
        out.append(_rect(x, y, w, height, color, tip, 'stroke="#fff" stroke-width="1"'))
        text = f"{label} {100 * value / total:.1f}%"
        if w > 7.2 * len(text):
            out.append(_text(x + w / 2, y + height / 2 + 4, text, 12, "#fff", "middle", "600"))
        elif w > 46:
            out.append(_text(x + w / 2, y + height / 2 + 4, f"{100 * value / total:.0f}%", 12, "#fff", "middle", "600"))
        x += w
    return out


# ---------------------------------------------------------------------------------------------
# Sections


def _header(summary: dict) -> str:
    recipe = summary.get("recipe") or {}
    badges = "".join(f'<span class="badge {_e(st["status"])}">{_e(stage)}: {_e(st["status"].replace("_", " "))}</span>'
                     for stage, st in summary["stages"].items() if st["status"] != "not_in_recipe")
    return (f'<header><h1>tinyprep · {_e(recipe.get("name") or "run")}</h1>'
            f'<div class="sub">{_e(summary["run"])}</div><div class="badges">{badges}</div></header>')


def _kpis(summary: dict) -> str:
    t = summary.get("totals") or {}
    docs, nbytes, tokens = t.get("docs", {}), t.get("bytes", {}), t.get("tokens", {})
    mix = summary.get("mixture")
    epochs = [n["mixture"]["epochs"] for n in summary["sources"].values() if n.get("mixture")]
    kept_after = next((n["accounting"]["kept_after"] for n in summary["sources"].values()), None)
    tiles = [
        ("documents read", _si(docs.get("read")), f"{_bytes(nbytes.get('read'))} of text"),
        ("documents kept", _si(docs.get("kept")),
         f"{_pct(docs['kept'] / docs['read'])} of read, after {kept_after}"
         if docs.get("read") and kept_after else "—"),
        ("train tokens", _si(tokens.get("train")), f"+ {_si(tokens.get('validation'))} validation"
         if tokens.get("validation") is not None else "tokenize has not run"),
        ("removed by dedup", _pct(t.get("dedup", {}).get("bytes_rate")), "of the ingested text bytes"
         if t.get("dedup", {}).get("bytes_rate") is not None else "dedup has not run"),
        ("shards", _n(len(summary["shards"])) if summary["shards"] else "—",
         _bytes(sum(s["bin_bytes"] for s in summary["shards"])) if summary["shards"] else "no manifest.json"),
        ("training tokens planned", _si(mix["token_budget"]) if mix else "—",
         f"max {max(epochs):.2f} epochs of a source" if epochs else "mix has not run"),
    ]
    return '<section class="kpis" id="overview">' + "".join(
        f'<div class="kpi"><div class="l">{_e(l)}</div><div class="v">{_e(v)}</div><div class="d">{_e(d)}</div></div>'
        for l, v, d in tiles) + "</section>"


def _notes(summary: dict) -> str:
    out = ""
    if summary["problems"]:
        out += ('<div class="notes problems" id="problems"><b>Problems</b><ul>'
                + "".join(f"<li>{_e(p)}</li>" for p in summary["problems"]) + "</ul></div>")
    missing = list(summary["missing"])
    for stage, iss in summary["issues"].items():
        kinds = ", ".join(f"{k} {v:,}" for k, v in iss["by_kind"].items())
        missing.append(f"{stage}: {iss['count']:,} bad input(s) reported ({kinds}), "
                       f"listed in stats/{stage}.issues.jsonl")
    if summary.get("mixture"):
        missing += [f"mixture: {w}" for w in summary["mixture"]["warnings"]]
    if missing:
        out += ('<div class="notes" id="missing"><b>Missing or worth a look</b><ul>'
                + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul></div>")
    return out


def _mixture(summary: dict, colors: dict) -> str:
    body = ('<section class="card" id="mixture"><h2>Mixture composition</h2>'
            '<p class="lead">Share of the training tokens per source: the recipe\'s target weights, what the plan '
            'realizes (samples per source), and the natural share of the available train tokens.</p>')
    mix = summary.get("mixture")
    sources = {n: s["mixture"] for n, s in summary["sources"].items() if s.get("mixture")}
    if not mix or not sources:
        return body + _empty("mixture", "No mixture yet: the mix stage has not written mixture.json.") + "</section>"
    rows = [("target", "weight"), ("realized", "realized_share"), ("natural", "natural_share")]
    left, bar_w, bar_h, gap = 90, WIDTH - 110, 34, 16
    svg = []
    for i, (label, key) in enumerate(rows):
        y = 8 + i * (bar_h + gap)
        svg.append(_text(left - 10, y + bar_h / 2 + 5, label, 13, "#334e68", "end", "600"))
        parts = [(n, m[key] or 0, colors[n], f"{n}: {label} share {_pct(m[key], 2)}") for n, m in sources.items()]
        svg += _stacked_bar(y, left, bar_w, bar_h, parts, sum(p[1] for p in parts))
    chart = _svg("mixture", WIDTH, 8 + len(rows) * (bar_h + gap), svg, "mixture composition: target, realized, natural")
    # epochs per source, against one epoch and the recipe's max_epochs
    max_ep = mix.get("max_epochs")
    top = max([m["epochs"] for m in sources.values()] + [1.0, max_ep or 0]) * 1.08
    ew, eh = WIDTH - 300, 26
    esvg = []
    x0 = 150
    for i, (n, m) in enumerate(sources.items()):
        y = 6 + i * (eh + 10)
        esvg.append(_text(x0 - 10, y + eh / 2 + 5, n, 13, "#334e68", "end", "600"))
        w = ew * m["epochs"] / top
        esvg.append(_rect(x0, y, w, eh, colors[n], f"{n}: {m['epochs']:.3f} epochs ({m['samples']:,} samples of "
                                                     f"{m['samples_per_epoch']:,} per epoch)", 'rx="3"'))
        esvg.append(_text(x0 + w + 8, y + eh / 2 + 5, f"{m['epochs']:.2f} epochs", 12))
    h = 6 + len(sources) * (eh + 10)
    marks = [(1.0, "1 epoch", "#486581")] + ([(max_ep, f"max_epochs {max_ep:g}", "#e12d39")] if max_ep else [])
    for value, label, color in marks:
        if value:
            x = x0 + ew * value / top
            esvg.append(_line(x, 0, x, h, color, 1.5, "5 4"))
            esvg.append(_text(x + 4, h + 12, label, 11, color))
    epochs = _svg("epochs", WIDTH, h + 18, esvg, "epochs per source")
    table = ("<table><tr><th>source</th><th>target</th><th>realized</th><th>natural</th><th>available tokens</th>"
             "<th>samples / epoch</th><th>samples</th><th>epochs</th><th>training tokens</th></tr>"
             + "".join(f"<tr><td>{_e(n)}</td><td>{_pct(m['weight'], 2)}</td><td>{_pct(m['realized_share'], 2)}</td>"
                       f"<td>{_pct(m['natural_share'], 2)}</td><td>{_n(m['available_tokens'])}</td>"
                       f"<td>{_n(m['samples_per_epoch'])}</td><td>{_n(m['samples'])}</td><td>{m['epochs']:.3f}</td>"
                       f"<td>{_n(m['tokens'])}</td></tr>" for n, m in sources.items()) + "</table>")
    lead = (f"<p class=\"lead\">{mix['total_samples']:,} samples of {mix['seq_len']:,} tokens "
            f"({_si(mix['token_budget'])} tokens, {mix['weights']} weights, seed {mix['seed']}).</p>")
    return (body + _legend([(n, colors[n]) for n in sources]) + chart + lead + "<h3>Epochs per source</h3>"
            + epochs + table + "</section>")


def _fates(node: dict) -> list[tuple[str, str, int]]:
    d = node["docs"]
    out = [("kept", FATE_LABELS["kept"], d["kept"] or 0)]
    out += [("filtered", f"filtered: {r}", v) for r, v in d["filtered"].items()]
    out += [("unreadable", f"unreadable: {r}", v) for r, v in d["unreadable"].items()]
    out += [(k, FATE_LABELS[k], d[k] or 0) for k in ("duplicate_exact", "duplicate_fuzzy", "duplicate_holdout")]
    return [f for f in out if f[2]]


def _accounting(summary: dict, colors: dict) -> str:
    body = ('<section class="card" id="accounting"><h2>Where every document went</h2>'
            '<p class="lead">Per source: read = kept + filtered + unreadable + duplicates (exact, fuzzy, and train '
            'copies of validation documents). Subsets are counted through dedup.</p>')
    sources = {n: s for n, s in summary["sources"].items() if s["docs"]["read"] is not None}
    if not sources:
        return body + _empty("accounting", "No documents counted yet: the ingest stage has not run.") + "</section>"
    left, bar_w, bar_h = 170, WIDTH - 190, 30
    svg = []
    for i, (n, s) in enumerate(sources.items()):
        y = 6 + i * (bar_h + 14)
        svg.append(_text(left - 10, y + bar_h / 2 + 5, n, 13, "#334e68", "end", "600"))
        parts = [(label, v, FATE_COLORS[k], f"{n}: {label}: {v:,}") for k, label, v in _fates(s)]
        svg += _stacked_bar(y, left, bar_w, bar_h, parts, s["docs"]["read"])
    chart = _svg("accounting", WIDTH, 6 + len(sources) * (bar_h + 14), svg, "documents per fate, per source")
    used = {k for s in sources.values() for k, _, _ in _fates(s)}
    legend = _legend([(FATE_LABELS[k], c) for k, c in FATE_COLORS.items() if k in used])
    head = ("<table><tr><th>source / subset</th><th>read</th><th>filtered</th><th>unreadable</th><th>dup exact</th>"
            "<th>dup fuzzy</th><th>dup holdout</th><th>kept</th><th>tokens</th><th>dedup (bytes)</th>"
            "<th>SlimPajama</th><th>identity</th></tr>")
    rows = []
    for n, s in sources.items():
        for label, node, cls in [(n, s, "src")] + [(sub, sn, "sub") for sub, sn in s["subsets"].items()]:
            d, acc = node["docs"], node["accounting"]
            reasons = ", ".join(f"{k} {v:,}" for k, v in d["filtered"].items())
            tok = node["tokens"]["total"]
            rows.append(
                f'<tr class="{cls}"><td>{_e(label)}</td><td>{_n(d["read"])}</td>'
                f'<td title="{_e(reasons)}">{_n(d["filtered_total"])}</td><td>{_n(d["unreadable_total"])}</td>'
                f'<td>{_n(d["duplicate_exact"])}</td><td>{_n(d["duplicate_fuzzy"])}</td>'
                f'<td>{_n(d["duplicate_holdout"])}</td><td>{_n(d["kept"])}</td>'
                f'<td>{"≈" if node["tokens"].get("estimated") and tok is not None else ""}{_n(tok)}</td>'
                f'<td>{_pct(node["dedup"]["bytes_rate"])}</td>'
                f'<td>{_pct(node["dedup"]["slimpajama_bytes_rate"], 2)}</td>'
                f'<td class="{"ok" if acc["holds"] else "bad"}">{"holds" if acc["holds"] else "FAILS"}</td>'
                "</tr>")
    note = ('<p class="lead">≈: a subset\'s tokens are estimated from its share of the source\'s kept text '
            '(the shards are per source).</p>')
    return body + legend + chart + head + "".join(rows) + "</table>" + note + "</section>"


def _lengths(summary: dict, colors: dict) -> str:
    body = ('<section class="card" id="lengths"><h2>Document length</h2>'
            '<p class="lead">Tokens per document in the train shards (from the .idx files), on a log scale: '
            'bins of about 9% width; the dashed lines mark the median and the 90th percentile.</p>')
    hists = {n: s["lengths"]["train"] for n, s in summary["sources"].items()
             if s.get("lengths") and s["lengths"].get("train") and s["lengths"]["train"]["count"]}
    if not hists:
        return body + _empty("lengths", "No document lengths: the run has no shards yet (tokenize has not run).") + \
            "</section>"
    lo = min(max(h["min"], 1) for h in hists.values())
    hi = max(h["max"] for h in hists.values()) + 1
    lx0, lx1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if lx1 <= lx0:
        lx1 = lx0 + 1
    w, h_, ml, mr, mt, mb = 500, 230, 46, 14, 30, 34
    pw, ph = w - ml - mr, h_ - mt - mb
    charts = []
    for n, hist in hists.items():
        def xof(v: float) -> float:
            return ml + pw * (math.log10(max(v, 10 ** lx0)) - lx0) / (lx1 - lx0)

        bins = [(bin_range(k), c) for k, c in hist["histogram"].items()]
        top = max(c for _, c in bins) / hist["count"]
        ymax = _nice_max(top)
        svg = [_text(ml, 16, f"{n}: {hist['count']:,} documents, mean {hist['mean']:,.0f} tokens", 13, "#1f2933",
                     weight="600")]
        for frac in (0, 0.5, 1):
            y = mt + ph * (1 - frac)
            svg.append(_line(ml, y, ml + pw, y, "#e4e7eb"))
            svg.append(_text(ml - 6, y + 4, f"{100 * ymax * frac:g}%", 10, "#7b8794", "end"))
        for (blo, bhi), c in bins:
            x0, x1 = xof(max(blo, 1) if blo else 1), xof(bhi)
            bh = ph * (c / hist["count"]) / ymax
            svg.append(_rect(x0, mt + ph - bh, max(x1 - x0 - 0.6, 0.8), bh, colors[n],
                             f"{blo:,}–{bhi - 1:,} tokens: {c:,} documents"))
        for e in range(lx0, lx1 + 1):
            x = xof(10 ** e)
            svg.append(_line(x, mt + ph, x, mt + ph + 4, "#9aa5b1"))
            svg.append(_text(x, mt + ph + 16, _si(10 ** e), 10, "#7b8794", "middle"))
        svg.append(_line(ml, mt + ph, ml + pw, mt + ph, "#9aa5b1"))
        svg.append(_text(ml + pw / 2, h_ - 4, "tokens per document", 11, "#7b8794", "middle"))
        for q, label in (("p50", "median"), ("p90", "p90")):
            v = hist["quantiles"][q]
            if v:
                x = xof(v)
                svg.append(_line(x, mt - 4, x, mt + ph, "#1f2933", 1.2, "4 3"))
                svg.append(_text(x + 3, mt + 6 if q == "p50" else mt + 18, f"{label} {v:,.0f}", 10, "#1f2933"))
        charts.append(_svg(f"lengths-{n}", w, h_, svg, f"document length histogram of {n}"))
    rows = "".join(
        f"<tr><td>{_e(n)} / {sp}</td><td>{_n(ls['count'])}</td><td>{ls['mean']:,.1f}</td><td>{_n(ls['min'])}</td>"
        + "".join(f"<td>{ls['quantiles'][q]:,.0f}</td>" for q in ("p10", "p25", "p50", "p75", "p90", "p99"))
        + f"<td>{_n(ls['max'])}</td></tr>"
        for n, s in summary["sources"].items() for sp, ls in (s.get("lengths") or {}).items() if ls and ls["count"])
    table = ("<table><tr><th>source / split</th><th>documents</th><th>mean</th><th>min</th><th>p10</th><th>p25</th>"
             "<th>median</th><th>p75</th><th>p90</th><th>p99</th><th>max</th></tr>" + rows + "</table>")
    return body + '<div class="grid2">' + "".join(charts) + "</div>" + table + "</section>"


def _dedup(summary: dict, colors: dict) -> str:
    body = ('<section class="card" id="dedup"><h2>Dedup rate beside SlimPajama</h2>'
            '<p class="lead">Share of the text bytes removed as exact or fuzzy duplicates, per RedPajama set and '
            'per source or language, next to the rates SlimPajama published for its global dedup.</p>')
    if not summary["dedup"]["ran"]:
        ref = ", ".join(f"{k[len('RedPajama'):]} {_pct(v, 2)}"
                        for k, v in summary["reference"]["slimpajama_dedup_bytes_rate"].items())
        return body + _empty("dedup", f"The dedup stage has not run. SlimPajama's published rates: {ref}.") + \
            "</section>"
    rows = []  # (label, ours, published, color)
    for n, s in summary["sources"].items():
        if s["dedup"]["bytes_rate"] is None:
            continue
        rows.append((n, s["dedup"]["bytes_rate"], None, colors[n], True))
        for sub, sn in s["subsets"].items():
            if sn["dedup"]["bytes_rate"] is not None or sn["dedup"]["slimpajama_bytes_rate"] is not None:
                rows.append((sub, sn["dedup"]["bytes_rate"], sn["dedup"]["slimpajama_bytes_rate"], colors[n], False))
    top = _nice_max(max([r[1] or 0 for r in rows] + [r[2] or 0 for r in rows] + [0.01]))
    left, pw = 200, WIDTH - 290
    svg, y = [], 4
    for label, ours, pub, color, is_src in rows:
        bh = 12 if pub is not None else 16
        svg.append(_text(left - 10, y + 13, label, 12 if not is_src else 13, "#1f2933" if is_src else "#334e68",
                         "end", "600" if is_src else "normal"))
        if ours is not None:
            w = pw * ours / top
            svg.append(_rect(left, y, w, bh, color, f"{label}: {_pct(ours, 2)} of the bytes removed (this run)",
                             'rx="2"'))
            svg.append(_text(left + w + 6, y + bh - 2, _pct(ours, 1), 11))
        if pub is not None:
            w = pw * pub / top
            svg.append(_rect(left, y + bh + 2, w, bh, PUBLISHED_COLOR,
                             f"{label}: {_pct(pub, 2)} removed by SlimPajama (published)", 'rx="2" opacity="0.75"'))
            svg.append(_text(left + w + 6, y + 2 * bh, f"{_pct(pub, 2)} SlimPajama", 11, "#616e7c"))
        y += (2 * bh + 2 if pub is not None else bh) + 10
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x = left + pw * frac
        svg.insert(0, _line(x, 0, x, y, "#eef1f4"))
        svg.append(_text(x, y + 12, _pct(top * frac, 0), 10, "#7b8794", "middle"))
    chart = _svg("dedup", WIDTH, y + 18, svg, "dedup rate per source and subset beside SlimPajama")
    legend = _legend([(n, colors[n]) for n in summary["sources"] if summary["sources"][n]["dedup"]["bytes_rate"]
                      is not None] + [("SlimPajama (published)", PUBLISHED_COLOR)])
    # cluster sizes
    clusters = summary["dedup"]["clusters"]
    if clusters:
        cw, ch, ml, mb = 520, 190, 50, 30
        bw = min((cw - ml - 10) / len(clusters), 64)
        cmax = _nice_max(max(c["clusters"] for c in clusters))
        csvg = []
        for frac in (0, 0.5, 1):
            yy = 10 + (ch - 10 - mb) * (1 - frac)
            csvg.append(_line(ml, yy, cw - 10, yy, "#e4e7eb"))
            csvg.append(_text(ml - 6, yy + 4, _si(cmax * frac), 10, "#7b8794", "end"))
        for i, c in enumerate(clusters):
            hgt = (ch - 10 - mb) * c["clusters"] / cmax
            size = str(c["max_size"]) if c["min_size"] == c["max_size"] else f"{c['min_size']}–{c['max_size']}"
            x = ml + i * bw
            csvg.append(_rect(x + 3, ch - mb - hgt, bw - 6, hgt, "#486581",
                              f"{c['clusters']:,} clusters of {size} documents", 'rx="2"'))
            csvg.append(_text(x + bw / 2, ch - mb + 14, size, 10, "#616e7c", "middle"))
        csvg.append(_text(ml + (cw - ml) / 2, ch - 3, "documents per cluster", 11, "#7b8794", "middle"))
        cluster_chart = (f"<h3>Duplicate clusters ({summary['dedup']['clusters_total']:,})</h3>"
                         + _svg("clusters", cw, ch, csvg, "dedup cluster sizes"))
    else:
        cluster_chart = "<h3>Duplicate clusters</h3>" + _empty("clusters", "Dedup found no duplicate.")
    return body + legend + chart + cluster_chart + "</section>"


def _shards(summary: dict, colors: dict) -> str:
    body = ('<section class="card" id="shards"><h2>Tokens per shard</h2>'
            '<p class="lead">Every Megatron shard of manifest.json, in manifest order (source, split, path); '
            'validation shards are drawn lighter. A shard closes at the first document boundary past the target '
            'size, so most shards of a group are full and its last one is the rest.</p>')
    shards = summary["shards"]
    if not shards:
        return body + _empty("shards", "No shards yet: tokenize has not written manifest.json.") + "</section>"
    h, ml, mb, mt = 260, 60, 46, 12
    pw, ph = WIDTH - ml - 10, h - mb - mt
    ymax = _nice_max(max(s["tokens"] for s in shards))
    bw = pw / len(shards)
    svg = []
    for frac in (0, 0.25, 0.5, 0.75, 1):
        y = mt + ph * (1 - frac)
        svg.append(_line(ml, y, ml + pw, y, "#e4e7eb"))
        svg.append(_text(ml - 6, y + 4, _si(ymax * frac), 10, "#7b8794", "end"))
    groups: list[tuple[str, int, int]] = []
    for i, s in enumerate(shards):
        hgt = ph * s["tokens"] / ymax
        extra = 'opacity="0.45"' if s["split"] == "validation" else ""
        svg.append(_rect(ml + i * bw + min(1, bw * 0.15), mt + ph - hgt, max(bw - 2 * min(1, bw * 0.15), 0.5), hgt,
                         colors.get(s["source"], PALETTE[-1]),
                         f"{s['path']}: {s['tokens']:,} tokens, {s['docs']:,} documents, {_bytes(s['bin_bytes'])}",
                         extra))
        key = f"{s['source']} / {s['split']}"
        if groups and groups[-1][0] == key:
            groups[-1] = (key, groups[-1][1], i)
        else:
            groups.append((key, i, i))
    svg.append(_line(ml, mt + ph, ml + pw, mt + ph, "#9aa5b1"))
    for j, (key, a, b) in enumerate(groups):
        x0, x1 = ml + a * bw, ml + (b + 1) * bw
        svg.append(_line(x0 + 1, mt + ph + 6, x1 - 1, mt + ph + 6, "#9aa5b1"))
        label = key if (x1 - x0) > 6.5 * len(key) else key.split(" / ")[1][:5] if (x1 - x0) > 34 else ""
        svg.append(_text((x0 + x1) / 2, mt + ph + 20 + (j % 2) * 13, label, 11, "#616e7c", "middle"))
    chart = _svg("shards", WIDTH, h, svg, "tokens per shard")
    tokens = sorted(s["tokens"] for s in shards)
    lead = (f"<p class=\"lead\">{len(shards):,} shards; tokens per shard: min {tokens[0]:,}, median "
            f"{tokens[len(tokens) // 2]:,}, max {tokens[-1]:,}; "
            f"{_bytes(sum(s['bin_bytes'] for s in shards))} in all.</p>")
    legend = _legend([(n, colors[n]) for n in summary["sources"] if any(s["source"] == n for s in shards)])
    return body + legend + chart + lead + "</section>"


def _timeline(summary: dict) -> str:
    body = ('<section class="card" id="timeline"><h2>Stage timeline</h2>'
            '<p class="lead">Wall time of the last run of each stage and its throughput: documents and input bytes '
            'per second of wall time, and per second of task time (what one core does).</p>')
    stages = summary["timeline"]["stages"]
    if not stages:
        return body + _empty("timeline", "No stage has finished yet (no stats/timeline.json).") + "</section>"
    spans = []
    for stage, e in stages.items():
        end = datetime.strptime(e["finished_at"], "%Y-%m-%dT%H:%M:%SZ").timestamp() if e.get("finished_at") else 0.0
        spans.append((stage, end - e.get("wall_s", 0.0), end, e))
    t0 = min(s[1] for s in spans)
    t1 = max(max(s[2] for s in spans), t0 + 1e-3)
    left, pw, bh = 100, WIDTH - 330, 26
    svg = []
    stage_colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(STAGES)}
    for i, (stage, start, end, e) in enumerate(spans):
        y = 6 + i * (bh + 10)
        x0 = left + pw * (start - t0) / (t1 - t0)
        w = max(pw * (end - start) / (t1 - t0), 3)
        svg.append(_text(left - 10, y + bh / 2 + 5, stage, 13, "#1f2933", "end", "600"))
        tip = (f"{stage}: {e.get('wall_s', 0):.1f} s wall, {e.get('tasks', 0):,} tasks "
               f"({e.get('skipped', 0):,} skipped), {e.get('docs', 0):,} documents, {_bytes(e.get('bytes', 0))}")
        svg.append(_rect(x0, y, w, bh, stage_colors.get(stage, PALETTE[-1]), tip, 'rx="3"'))
        rate = []
        if e.get("mb_per_s"):
            rate.append(f"{e['mb_per_s']:,.1f} MB/s")
        if e.get("docs_per_s"):
            rate.append(f"{e['docs_per_s']:,.0f} docs/s")
        label = f"{e.get('wall_s', 0):,.1f} s" + (" · " + " · ".join(rate) if rate else "")
        svg.append(_text(x0 + w + 8, y + bh / 2 + 5, label, 12))
    h = 6 + len(spans) * (bh + 10)
    for frac in (0, 0.5, 1):
        x = left + pw * frac
        svg.insert(0, _line(x, 0, x, h, "#eef1f4"))
        svg.append(_text(x, h + 12, f"{(t1 - t0) * frac:,.1f} s", 10, "#7b8794", "middle"))
    chart = _svg("timeline", WIDTH, h + 18, svg, "stage timeline")
    def cell(v, fmt: str) -> str:
        return format(v, fmt) if v else "—"

    rows = "".join(
        f"<tr><td>{_e(stage)}</td><td>{e.get('wall_s', 0):,.1f} s</td><td>{_n(e.get('tasks'))}</td>"
        f"<td>{_n(e.get('skipped'))}</td><td>{_n(e.get('docs'))}</td><td>{_bytes(e.get('bytes'))}</td>"
        f"<td>{cell(e.get('docs_per_s'), ',.0f')}</td><td>{cell(e.get('mb_per_s'), ',.2f')}</td>"
        f"<td>{cell(e.get('mb_per_task_s'), ',.2f')}</td><td>{_n(len(e.get('nodes', [])))}</td></tr>"
        for stage, _, _, e in spans)
    table = ("<table><tr><th>stage</th><th>wall</th><th>tasks</th><th>skipped</th><th>documents</th><th>input</th>"
             "<th>docs/s</th><th>MB/s</th><th>MB/s per task-second</th><th>nodes</th></tr>" + rows + "</table>")
    return body + chart + table + "</section>"


def render_html(summary: dict) -> str:
    """The whole page for a stats document (deterministic: the same document gives the same bytes)."""
    colors = _colors(summary)
    recipe = summary.get("recipe") or {}
    sections = [_kpis(summary), _notes(summary), _mixture(summary, colors), _accounting(summary, colors),
                _lengths(summary, colors), _dedup(summary, colors), _shards(summary, colors), _timeline(summary)]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>tinyprep report: {_e(recipe.get('name') or summary['run'])}</title><style>{CSS}</style></head>"
            f"<body>{_header(summary)}<main>{''.join(sections)}</main>"
            f"<footer>tinyprep · {_e(summary['format'])} v{summary['version']} · "
            f"<code>tinyprep stats {_e(summary['run'])} --json</code> has every number of this page</footer>"
            "</body></html>\n")
