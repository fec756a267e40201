"""The `tinyprep` command: parses arguments, calls the modules, prints results. Nothing else."""

from __future__ import annotations

import logging
import sys

import click
from rich.console import Console
from rich.table import Table

from . import __version__, storage
from .recipe import RecipeError, load_recipe

log = logging.getLogger("tinyprep")


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("tinyprep")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_tinyprep_console", False) for h in logger.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        h._tinyprep_console = True  # type: ignore[attr-defined]
        logger.addHandler(h)
    logger.propagate = False


def _fail(msg: str, code: int = 1) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyprep")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """tinyprep: download, ingest, dedupe, tokenize and pack pretraining corpora on Ray.

    A run is described by a recipe (YAML); every stage writes into the run directory
    (`output` in the recipe, any fsspec URL) and can be resumed by running the same command again.
    """
    _setup_logging(verbose)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", metavar="URL", help="Run directory (overrides the recipe's `output`).")
@click.option("--stages", metavar="a,b", help="Run only these stages (in flow order).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set ingest.max_errors=10 --set 'sources[0].weight=2'.")
@click.option("--workers", type=click.IntRange(min=1), help="CPUs of the embedded local Ray (default: all).")
def run(recipe: str, output: str | None, stages: str | None, overrides: tuple[str, ...], workers: int | None) -> None:
    """Run a recipe's stages on Ray (embedded local Ray unless RAY_ADDRESS is set)."""
    from .runner import StageFailed, run_recipe

    try:
        r = load_recipe(recipe, list(overrides), output)
    except RecipeError as e:
        _fail(str(e), 2)
    wanted = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    try:
        run_recipe(r, wanted, workers)
    except StageFailed as e:
        _print_summary(r.output)
        _fail(str(e))
    except FileNotFoundError as e:
        _fail(str(e))
    _print_summary(r.output)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate a recipe and print it resolved (defaults filled in, paths absolute)."""
    try:
        r = load_recipe(recipe, list(overrides))
    except RecipeError as e:
        _fail(str(e), 2)
    click.echo(r.to_yaml(), nl=False)


@main.command()
@click.argument("out_dir", default="data/sample", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Regenerate even if the sample exists.")
def sample(out_dir: str, force: bool) -> None:
    """Generate the bundled sample corpus (from this Python's standard library) into OUT_DIR."""
    from .sample import generate_sample

    info = generate_sample(out_dir, force=force)
    counts = info.get("counts", {})
    click.echo(f"sample corpus in {out_dir} (version {info.get('version')}): "
               + ", ".join(f"{k}: {v}" for k, v in sorted(counts.get("rows", {}).items())))


def _print_summary(run_url: str) -> None:
    """Per-source document accounting of the ingest stage, if it ran."""
    data = storage.read_json(storage.join(run_url, "stats", "ingest.json"))
    if not data:
        return
    table = Table(title=f"ingest: documents per source ({run_url})", show_lines=False)
    for col in ("source / subset", "files", "read", "kept", "filtered", "unreadable", "kept MB"):
        table.add_column(col, justify="left" if col.startswith("source") else "right")

    def row(name: str, c: dict, files: str = "", style: str | None = None) -> None:
        filtered = c.get("filtered", {})
        unread = c.get("unreadable", {})
        ftxt = f"{sum(filtered.values()):,}" + (
            " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(filtered.items())) + ")" if filtered else "")
        utxt = f"{sum(unread.values()):,}" + (
            " (" + ", ".join(f"{k} {v:,}" for k, v in sorted(unread.items())) + ")" if unread else "")
        table.add_row(name, files, f"{c.get('read', 0):,}", f"{c.get('kept', 0):,}", ftxt, utxt,
                      f"{c.get('bytes_kept', 0) / 1e6:,.2f}", style=style)

    for src, c in sorted(data["stats"].get("sources", {}).items()):
        files = f"{c.get('files', 0):,}" + (f" ({c['files_unreadable']} bad)" if c.get("files_unreadable") else "")
        row(src, c, files, style="bold")
        for sub, sc in sorted(c.get("subsets", {}).items()):
            row(f"  {sub}", sc)
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":
    main()
