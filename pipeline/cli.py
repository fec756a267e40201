"""The `tinyprep` command: parses arguments, calls the modules, prints results. Nothing else."""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__, storage
from .recipe import RecipeError, load_recipe

log = logging.getLogger("tinyprep")


def _setup_logging(verbose: bool) -> None:
    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks
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


def _one_line(err: BaseException) -> str:
    """An unexpected error as one line: what failed and where, without the traceback."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        return f"{where}{err.strerror}"
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _Main(click.Group):
    """Every command's failure is one line and an exit code (1), never a traceback unless --debug."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - the last resort: known errors are handled per command
            if ctx.params.get("debug") or os.environ.get("TINYPREP_DEBUG"):
                raise
            _fail(f"{_one_line(err)} (run with --debug for the traceback)")


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyprep")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
def main(verbose: bool, debug: bool) -> None:
    """tinyprep: download, ingest, dedupe, tokenize and pack pretraining corpora on Ray.

    A run is described by a recipe (YAML); every stage writes into the run directory
    (`output` in the recipe, any fsspec URL) and can be resumed by running the same command again.
    Every failure is one line and exit code 1 (2 for a usage error); --debug shows the traceback.
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
    """Run a recipe's stages on Ray (embedded local Ray unless RAY_ADDRESS is set).

    Before any stage a preflight checks, in seconds, the tokenizer, the stores' backends and
    credentials, that the output is writable and that every source lists and its first input
    reads (exit 2 for a recipe or environment to fix, 1 for storage that failed)."""
    from .faults import FaultRuleError
    from .layout import RunDirError
    from .preflight import PreflightError
    from .runner import run_recipe
    from .stage import STAGES, StageFailed

    if output is not None and not output.strip():
        _fail("--output: must not be empty", 2)
    wanted = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    unknown = [s for s in wanted or [] if s not in STAGES]
    if unknown:
        _fail(f"--stages: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}", 2)
    try:
        r = load_recipe(recipe, list(overrides), output)
    except RecipeError as e:
        _fail(str(e), 2)
    try:
        # the preflight runs first: seconds now, not after hours of download and ingest
        run_recipe(r, wanted, workers)
    except (FaultRuleError, PreflightError) as e:
        _fail(str(e), getattr(e, "code", 2))
    except StageFailed as e:
        _print_summary(r.output)
        _fail(str(e))
    except (FileNotFoundError, RunDirError) as e:
        _fail(str(e))
    _print_summary(r.output)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key.")
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate a recipe (and the tokenizer it names, when it tokenizes) and print it resolved
    (defaults filled in, paths absolute)."""
    from .tokenize.tokenizer import preflight_tokenizer

    try:
        r = load_recipe(recipe, list(overrides))
    except RecipeError as e:
        _fail(str(e), 2)
    problem = preflight_tokenizer(r)
    if problem:
        _fail(problem, 2)
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


@main.command("train-tokenizer")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "out", required=True, metavar="PATH", help="Where to write the tokenizer.model.")
@click.option("--vocab-size", default=32000, show_default=True, type=click.IntRange(min=300), help="Pieces.")
@click.option("--max-mb", default=1024, show_default=True, type=click.IntRange(min=1),
              help="MB of text sampled (by document hash) for training.")
@click.option("--seed", default=0, show_default=True, type=int)
def train_tokenizer_cmd(inputs: tuple[str, ...], out: str, vocab_size: int, max_mb: int, seed: int) -> None:
    """Train a SentencePiece BPE tokenizer with Llama-2-like settings (deterministic).

    INPUTS: run directories (their ingested documents), parquet, JSON lines (.jsonl, .jsonl.gz,
    .jsonl.zst; field text or content) or text files; globs allowed.
    """
    from .formats import FormatError
    from .tokenize.tokenizer import train_tokenizer

    try:
        info = train_tokenizer(list(inputs), out, vocab_size=vocab_size, max_bytes=max_mb << 20, seed=seed)
    except FormatError as e:
        _fail(str(e))
    click.echo(f"{out}: {info['vocab_size']} pieces from {info['documents']:,} documents "
               f"({info['sentences']:,} lines), sha256 {info['sha256']}")


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["litgpt"]), default="litgpt", show_default=True)
@click.option("-o", "--output", "out", required=True, metavar="DIR", help="Directory of the exported files.")
@click.option("--chunk-size", default=2049 * 1024, show_default=True, type=click.IntRange(min=1),
              help="Tokens per LITPKDS chunk.")
@click.option("--split", type=click.Choice(["train", "validation"]), default="train", show_default=True)
@click.option("--prefix", "prefixes", multiple=True, metavar="SOURCE=PREFIX",
              help="File prefix of a source (default <split>_<source>; starcoderdata: <split>_starcoder).")
@click.option("--force", is_flag=True, help="Replace chunk files of an earlier export with the same prefixes.")
def export(run_dir: str, fmt: str, out: str, chunk_size: int, split: str, prefixes: tuple[str, ...],
           force: bool) -> None:
    """Export a tokenized run for another trainer (litgpt: TinyLlama's LITPKDS chunks).

    The last partial chunk of each source is dropped, never padded (TinyLlama issue #83).
    """
    from .tools.export import ExportError, export_litgpt, parse_prefixes

    try:
        summary = export_litgpt(run_dir, out, chunk_size, split, parse_prefixes(list(prefixes)), force)
    except ExportError as e:
        _fail(str(e))
    for src, s in summary["sources"].items():
        click.echo(f"{src}: {s['chunks']} chunk(s) {s['prefix']}_*.bin, {s['tokens_written']:,} tokens "
                   f"({s['tokens_dropped']:,} of the last partial chunk dropped)")


@main.command("export-model")
@click.argument("run_dir", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: a Hugging Face LlamaForCausalLM directory (safetensors, config, tokenizer).")
@click.option("--step", type=click.IntRange(min=0), help="The checkpoint of this step (default: the newest usable).")
@click.option("--out", metavar="DIR", help="Output directory (default: RUN/<train-dir>/export/hf-step-N).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="Precision of the exported weights.")
@click.option("--train-dir", default="train", show_default=True, metavar="DIR",
              help="The run's train.dir (where `tinyprep train` put its checkpoints).")
@click.option("--tokenizer", metavar="PATH", help="The run's tokenizer.model, checked by hash (default: the one "
              "manifest.json names, else RUN/assets/tokenizer.model).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out, replacing the files an export writes.")
def export_model(run_dir: str, fmt: str, step: int | None, out: str | None, dtype: str, train_dir: str,
                 tokenizer: str | None, force: bool) -> None:
    """Export a training checkpoint as a model another framework loads (hf: Hugging Face Llama).

    Reads the DCP checkpoint in this process on CPU, whatever number of ranks saved it.
    """
    from .train.export import ModelExportError, export_hf

    try:
        s = export_hf(run_dir, out, step, dtype, train_dir, tokenizer, force)
    except ModelExportError as e:
        _fail(str(e), e.code)
    click.echo(f"{s['out']}: {fmt} export of step {s['step']} ({s['parameters'] / 1e6:,.1f}M parameters, "
               f"{s['dtype']}, tokenizer sha256 {s['tokenizer']['sha256'][:12]})")


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--tokenizer", metavar="PATH", help="Check against this model (default: the run's recipe's).")
@click.option("--no-checksums", is_flag=True, help="Skip the sha256 of every shard (sizes and headers only).")
def verify(run_dir: str, tokenizer: str | None, no_checksums: bool) -> None:
    """Check a run's shards against manifest.json: files, sizes, headers, counts, checksums, tokenizer."""
    from .tools.verify import VerifyError, verify_run

    try:
        r = verify_run(run_dir, tokenizer, checksums=not no_checksums)
    except VerifyError as e:
        _fail(f"{run_dir}: {len(e.problems)} problem(s):\n" + "\n".join(f"  {p}" for p in e.problems))
    click.echo(f"{run_dir}: OK: {r.shards} shards, {r.docs:,} documents, {r.tokens:,} tokens, tokenizer "
               f"{r.tokenizer}" + (", mixture.json" if r.mixture else ""))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--output", "-o", metavar="URL", help="Run directory (overrides the recipe's `output`).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (train.*).")
@click.option("--nproc", type=click.IntRange(min=1), help="Processes on this machine (default: train.nproc, "
              "else one per GPU, or 1 on CPU). Ignored inside torchrun.")
@click.option("--fresh", is_flag=True, help="Delete this run's checkpoints and metrics and start from step 0.")
def train(recipe: str, output: str | None, overrides: tuple[str, ...], nproc: int | None, fresh: bool) -> None:
    """Train the recipe's model on its mixture (RUN/mixture.json), resuming from the latest checkpoint.

    Starts one process per rank itself (gloo on CPU, NCCL on GPU), or runs as one rank inside
    torchrun: `torchrun --nproc-per-node 8 -m pipeline.cli train RECIPE`.
    """
    from .train.trainer import TrainError
    from .train.trainer import train as run_training

    try:
        r = load_recipe(recipe, list(overrides), output)
    except RecipeError as e:
        _fail(str(e), 2)
    try:
        run_training(r, nproc, fresh)
    except TrainError as e:
        _fail(str(e))


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the stats document (format tinyprep-stats, version 1).")
@click.option("-o", "--output", "out", metavar="URL", help="Also write the JSON document here.")
@click.option("--no-lengths", is_flag=True, help="Do not read the shards' indexes (document lengths, shard checks).")
@click.option("--check", is_flag=True, help="Exit 1 when something is missing or the accounting does not hold.")
def stats(run_dir: str, as_json: bool, out: str | None, no_lengths: bool, check: bool) -> None:
    """Per source and subset: documents read, filtered, duplicates, kept, tokens, mixture shares and
    epochs, unreadable inputs, document lengths, dedup clusters and stage timings of a run.

    RUN is any fsspec URL; a partial run shows what exists and lists what is missing.
    """
    from .stats.summary import SummaryError, collect, dumps
    from .stats.tables import print_tables

    try:
        summary = collect(run_dir, lengths=not no_lengths)
    except SummaryError as e:
        _fail(str(e))
    if out:
        storage.write_bytes(out, dumps(summary))
    if as_json:
        click.echo(dumps(summary).decode(), nl=False)
    else:
        print_tables(summary)
    if check and (summary["missing"] or summary["problems"]):
        _fail(f"{run_dir}: {len(summary['missing'])} missing, {len(summary['problems'])} problem(s)")


@main.command()
@click.argument("run_dir", metavar="RUN")
@click.option("-o", "--output", "out", default="report.html", show_default=True, metavar="URL",
              help="Where to write the HTML page.")
def report(run_dir: str, out: str) -> None:
    """One self-contained HTML page of a run: mixture, document lengths, dedup against SlimPajama's
    published rates, tokens per shard and the stage timeline."""
    from .stats.report import render_html
    from .stats.summary import SummaryError, collect

    try:
        summary = collect(run_dir)
    except SummaryError as e:
        _fail(str(e))
    storage.write_bytes(out, render_html(summary).encode())
    click.echo(f"{out}: report of {run_dir}" + (f" ({len(summary['missing'])} part(s) missing)"
                                                if summary["missing"] else ""))


@main.command("inspect")
@click.argument("target", metavar="RUN|FILE.bin")
@click.option("--source", help="Only this source (a run directory).")
@click.option("--split", type=click.Choice(["train", "validation"]), default="train", show_default=True)
@click.option("--n", "count", default=5, show_default=True, type=click.IntRange(min=1),
              help="Documents per source (per file).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--tokenizer", metavar="PATH", help="tokenizer.model (default: the run's, checked by hash).")
@click.option("--pieces", default=8, show_default=True, type=click.IntRange(min=0),
              help="Token pieces shown at each end of a document.")
@click.option("--max-chars", default=2000, show_default=True, type=click.IntRange(min=0),
              help="Characters of text shown per document (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per document.")
def inspect_cmd(target: str, source: str | None, split: str, count: int, seed: int, tokenizer: str | None,
                pieces: int, max_chars: int, as_json: bool) -> None:
    """Random documents decoded from a run's shards (or from one Megatron .bin or LITPKDS chunk),
    with token counts and boundaries."""
    import orjson

    from .tools.inspect import InspectError, inspect_file, inspect_run, render

    try:
        if target.endswith((".bin", ".idx")):
            samples = inspect_file(target, count, seed, tokenizer, pieces)
        else:
            samples = inspect_run(target, source, split, count, seed, tokenizer, pieces)
    except InspectError as e:
        _fail(str(e))
    if as_json:
        for s in samples:
            click.echo(orjson.dumps(s.to_json()).decode())
    else:
        click.echo(render(samples, max_chars))


@main.command("plan")
@click.argument("recipe", type=click.Path())
@click.option("--nodes", default=1, show_default=True, type=click.IntRange(min=1), help="Nodes of the cluster.")
@click.option("--cpus", type=click.IntRange(min=1), help="CPUs per node (default: this machine's).")
@click.option("--sample-mb", default=8.0, show_default=True, type=click.FloatRange(min=0.1),
              help="MB of each source's inputs read to measure rates and ratios.")
@click.option("--json", "as_json", is_flag=True, help="The estimate as one JSON object.")
def plan_cmd(recipe: str, nodes: int, cpus: int | None, sample_mb: float, as_json: bool) -> None:
    """Estimate sizes, tokens, CPU and wall time and disk per stage, from a sample of the inputs."""
    import orjson

    from .tools.plan import PlanError, make_plan, render

    try:
        r = load_recipe(recipe)
        p = make_plan(r, nodes=nodes, cpus=cpus, sample_mb=sample_mb)
    except (RecipeError, PlanError) as e:
        _fail(str(e))
    click.echo(orjson.dumps(p, option=orjson.OPT_INDENT_2).decode() if as_json else render(p))


def _print_summary(run_url: str) -> None:
    """What the run produced: documents per source and subset, then the mixture (when planned)."""
    from .stats.summary import SummaryError, collect
    from .stats.tables import print_tables

    try:
        summary = collect(run_url, lengths=False)
    except SummaryError:
        return
    print_tables(summary, ("documents", "mixture"))

if __name__ == "__main__":
    main()
