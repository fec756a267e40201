"""The stats document (pipeline/stats/summary.py) as terminal tables (`tinyprep stats`, `tinyprep run`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

SECTIONS = ("documents", "bytes", "mixture", "lengths", "clusters", "stages", "notes")


def _n(v) -> str:
    return "—" if v is None else f"{v:,}"


def _pct(v, digits: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _mb(v) -> str:
    return "—" if v is None else f"{v / 1e6:,.2f}"


def _reasons(total, parts: dict) -> str:
    if total is None:
        return "—"
    return f"{total:,}" + (" (" + ", ".join(f"{k} {v:,}" for k, v in parts.items()) + ")" if parts else "")


def _rows(summary: dict):
    """(label, node, is_source) for every source and its subsets."""
    for name, node in summary["sources"].items():
        yield name, node, True
        for sub, sn in node["subsets"].items():
            yield f"  {sub}", sn, False


def _table(title: str, columns: list[str]) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    for i, c in enumerate(columns):
        wraps = c in ("filtered", "unreadable")  # the reasons may wrap; names and numbers never do
        t.add_column(c, justify="left" if i == 0 else "right", no_wrap=not wraps)
    return t


def documents_table(summary: dict) -> Table:
    t = _table(f"documents per source and subset ({summary['run']})",
               ["source / subset", "read", "filtered", "unreadable", "dup exact", "dup fuzzy", "dup holdout",
                "kept", "train", "valid.", "identity"])
    for label, node, top in _rows(summary):
        d = node["docs"]
        acc = node["accounting"]
        ok = "—" if acc["read"] is None else ("ok" if acc["holds"] else "[red]FAILS[/red]")
        if top and node.get("files_unreadable"):
            ok += f" ({node['files_unreadable']} bad file(s))"
        t.add_row(label, _n(d["read"]), _reasons(d["filtered_total"], d["filtered"]),
                  _reasons(d["unreadable_total"], d["unreadable"]), _n(d["duplicate_exact"]),
                  _n(d["duplicate_fuzzy"]), _n(d["duplicate_holdout"]), _n(d["kept"]), _n(d["train"]),
                  _n(d["validation"]), ok, style="bold" if top else None)
    t.caption = ("kept: documents in the shards once tokenize ran; subsets are counted through dedup, so their "
                 "kept still holds the source's holdout duplicates")
    return t


def bytes_table(summary: dict) -> Table:
    t = _table("text bytes, dedup and tokens (≈: subset tokens estimated from its share of the text)",
               ["source / subset", "MB read", "MB ingested", "MB dup", "dedup (bytes)", "SlimPajama",
                "MB kept", "tokens train", "tokens valid."])
    for label, node, top in _rows(summary):
        b, tok = node["bytes"], node["tokens"]
        approx = "≈" if tok.get("estimated") else ""
        dup = None if b["duplicate_exact"] is None else b["duplicate_exact"] + b["duplicate_fuzzy"]
        t.add_row(label, _mb(b["read"]), _mb(b["ingested"]), _mb(dup), _pct(node["dedup"]["bytes_rate"]),
                  _pct(node["dedup"]["slimpajama_bytes_rate"], 2), _mb(b["kept"]),
                  approx + _n(tok["train"]), approx + _n(tok["validation"]), style="bold" if top else None)
    return t


def mixture_table(summary: dict) -> Table | None:
    mix = summary.get("mixture")
    if mix is None:
        return None
    t = _table(f"mixture: {mix['total_samples']:,} samples of {mix['seq_len']:,} tokens "
               f"= {mix['token_budget']:,} tokens ({mix['weights']} weights)",
               ["source", "target share", "realized share", "natural share", "available tokens", "samples",
                "epochs", "tokens"])
    for name, node in summary["sources"].items():
        m = node.get("mixture")
        if m is None:
            continue
        t.add_row(name, _pct(m["weight"], 2), _pct(m["realized_share"], 2), _pct(m["natural_share"], 2),
                  _n(m["available_tokens"]), _n(m["samples"]), f"{m['epochs']:.3f}", _n(m["tokens"]))
    return t


def lengths_table(summary: dict) -> Table | None:
    rows = [(name, sp, ls) for name, node in summary["sources"].items()
            for sp, ls in (node.get("lengths") or {}).items() if ls]
    if not rows:
        return None
    t = _table("document length in tokens (from the shards' .idx)",
               ["source / split", "docs", "mean", "min", "p10", "p50", "p90", "p99", "max"])
    for name, sp, ls in rows:
        q = ls["quantiles"]
        t.add_row(f"{name} / {sp}", _n(ls["count"]), f"{ls['mean']:,.1f}", _n(ls["min"]),
                  *(f"{q[k]:,.0f}" for k in ("p10", "p50", "p90", "p99")), _n(ls["max"]))
    return t


def clusters_table(summary: dict) -> Table | None:
    dd = summary["dedup"]
    if not dd["ran"]:
        return None
    t = _table("dedup clusters", ["documents", "clusters"])
    t.caption = f"{dd['clusters_total']:,} clusters"
    for r in dd["clusters"]:
        size = str(r["max_size"]) if r["min_size"] == r["max_size"] else f"{r['min_size']}-{r['max_size']}"
        t.add_row(size, _n(r["clusters"]))
    return t


def stages_table(summary: dict) -> Table:
    t = _table("stages", ["stage", "status", "tasks", "wall", "docs/s", "MB/s", "MB/s per task-second"])
    timeline = summary["timeline"]["stages"]
    for stage, st in summary["stages"].items():
        if st["status"] == "not_in_recipe":
            continue
        e = timeline.get(stage, {})
        status = st["status"] if st["status"] == "done" else f"[red]{st['status']}[/red]"
        tasks = _n(st.get("tasks", st.get("records")))
        if e.get("skipped"):
            tasks += f" ({e['skipped']:,} skipped)"
        t.add_row(stage, status, tasks, f"{e['wall_s']:.1f}s" if e else "—",
                  "—" if not e.get("docs_per_s") else f"{e['docs_per_s']:,.0f}",
                  "—" if not e.get("mb_per_s") else f"{e['mb_per_s']:,.2f}",
                  "—" if not e.get("mb_per_task_s") else f"{e['mb_per_task_s']:,.2f}")
    return t


def notes(summary: dict) -> list[str]:
    out = [f"missing: {m}" for m in summary["missing"]]
    out += [f"[red]problem[/red]: {p}" for p in summary["problems"]]
    for stage, iss in summary["issues"].items():
        kinds = ", ".join(f"{k} {v:,}" for k, v in iss["by_kind"].items())
        out.append(f"{stage}: {iss['count']:,} bad input(s) reported ({kinds}); see stats/{stage}.issues.jsonl")
    if summary.get("mixture"):
        out += [f"mixture warning: {w}" for w in summary["mixture"]["warnings"]]
    return out


def print_tables(summary: dict, sections: tuple[str, ...] = SECTIONS, console: Console | None = None) -> None:
    console = console or Console(width=max(160, Console().width))
    makers = {"documents": documents_table, "bytes": bytes_table, "mixture": mixture_table,
              "lengths": lengths_table, "clusters": clusters_table, "stages": stages_table}
    for section in sections:
        if section == "notes":
            for line in notes(summary):
                console.print(line, highlight=False)
            continue
        table = makers[section](summary)
        if table is not None:
            console.print(table)
