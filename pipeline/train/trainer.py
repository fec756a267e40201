"""`tinyprep train`: the training loop, composed from the modules beside it (torchtitan's layout).

    prepare (parent)  load and check the plan against the recipe, the world size, the shards on disk
                      (preflight.py), the checkpoint to resume from (the newest usable one)
    launch            one process per rank (or this one, or torchrun's)
    Trainer           model (parallelize.py) + AdamW + schedule.py + loader.py + checkpoint.py
                      + metrics.py; fit() runs steps until max_steps

A step: the rank's slice of the global batch in micro-batches (gradient accumulation), each
micro-batch's mean token loss scaled by 1 / micro-batches, FSDP2 averaging over ranks, so the
gradient is the mean over the global batch whatever the world size; clip, AdamW, next lr.
Gradients are reduce-scattered once per step, after the last micro-batch's backward: the earlier
ones accumulate unsharded (fp32) gradients locally, trading a full gradient's memory for
(micro-batches - 1) fewer collectives per FSDP group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import storage
from ..formats import FormatError
from ..formats.manifest import Manifest, Mixture, load_plan
from ..layout import as_run
from ..recipe import Recipe, TrainConfig
from . import checkpoint, preflight
from .distributed import (
    DeviceError,
    DistEnv,
    RankFailed,
    default_nproc,
    launch,
    pick_device,
    under_launcher,
)
from .loader import HoldoutSet, MixtureLoader, check_world, plan_record
from .metrics import MetricsLog, peak_flops, truncate_after
from .model import LlamaConfig, attention_kind, model_config
from .parallelize import build_model
from .schedule import learning_rate

log = logging.getLogger("tinyprep")
FAULT_ENV = "TINYPREP_TRAIN_FAULT"  # "exit-after-step:N": every rank dies after step N (tests)


class TrainError(Exception):
    """Training cannot start or stopped; the message says why."""


@dataclass(frozen=True)
class TrainPlan:
    """What every rank needs, checked once before any process starts."""

    run_url: str
    cfg: TrainConfig
    manifest: Manifest
    mixture: Mixture
    model: LlamaConfig
    device: str
    nproc: int
    world: int
    max_steps: int
    out_dir: str
    resume: str | None  # checkpoint directory
    done: bool = False  # the latest checkpoint is already at max_steps: nothing to do


def prepare(recipe: Recipe, nproc: int | None = None, fresh: bool = False) -> TrainPlan:
    """Load and check everything a run depends on; TrainError says what is wrong."""
    cfg, run_url = recipe.train, recipe.output
    try:
        manifest, mixture = load_plan(run_url)
        preflight.check_recipe(recipe, manifest, mixture)
    except FormatError as e:
        raise TrainError(str(e)) from None
    try:
        device = pick_device(cfg.device)
    except DeviceError as e:
        raise TrainError(str(e)) from None
    try:
        attention_kind(cfg.attention, device, cfg.doc_mask)
    except ValueError as e:
        raise TrainError(f"train.attention: {e}") from None
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        nproc = nproc or cfg.nproc or default_nproc(device)
        world = nproc
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise TrainError(f"{nproc} processes asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    try:
        check_world(cfg.global_batch, world, cfg.micro_batch)
        model = model_config(cfg.model, vocab_size=manifest.tokenizer.vocab_size, max_seq_len=mixture.seq_len,
                             **cfg.model_args)
    except (ValueError, TypeError) as e:
        raise TrainError(str(e)) from None
    if cfg.doc_mask and not (manifest.bos or manifest.eos):
        raise TrainError("train.doc_mask needs document separators: the shards were tokenized with neither "
                         "tokenize.bos nor tokenize.eos")
    max_steps = cfg.max_steps or mixture.total_samples // cfg.global_batch
    if max_steps < 1:
        raise TrainError(f"the plan's {mixture.total_samples:,} samples make no global batch of "
                         f"{cfg.global_batch}; set train.max_steps or a larger mix.token_budget")
    try:
        preflight.check_shards(run_url, preflight.shards_to_read(manifest, mixture,
                                                                 bool(cfg.eval_every and cfg.eval_samples)))
    except FormatError as e:
        raise TrainError(str(e)) from None
    out_dir = as_run(run_url).train(cfg.dir)
    fs, out_path = storage.url_to_fs(out_dir)
    if not storage.is_local(fs):
        raise TrainError(f"{out_dir}: checkpoints and metrics need a local (or mounted) run directory")
    ckpt_root = Path(out_path) / "checkpoints"
    if fresh:
        import shutil

        if under_launcher() and world > 1:
            raise TrainError("--fresh cannot be used inside torchrun (every rank would delete the checkpoints); "
                             f"remove {ckpt_root} first")

        shutil.rmtree(ckpt_root, ignore_errors=True)
        Path(out_path, "metrics.jsonl").unlink(missing_ok=True)
    found, damaged = checkpoint.resumable(ckpt_root)
    if damaged and found is None:
        (path, why), more = damaged[0], len(damaged) - 1
        raise TrainError(f"{path}: damaged checkpoint ({why})" + (f", and {more} more" if more else "") +
                         "; no usable checkpoint to resume from: move the damaged ones away, or start over "
                         "with --fresh")
    for path, why in damaged:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank prepares; one says it
            log.warning(f"train: checkpoint {path} is damaged ({why}); resuming from {found.path} instead")
    if found is not None:
        try:
            checkpoint.check_compatible(found, plan_record(manifest, mixture, cfg.global_batch),
                                        mixture.fingerprint, asdict(model))
        except checkpoint.CheckpointError as e:
            raise TrainError(str(e)) from None
    if os.environ.get("RANK", "0") == "0":  # the steps after the checkpoint are replayed: logged once
        start = found.step if found else 0
        dropped = truncate_after(str(Path(out_path, "metrics.jsonl")), start)
        if dropped:
            log.info(f"train: metrics.jsonl: {dropped} record(s) after step {start} removed (replayed from there)")
    return TrainPlan(run_url=run_url, cfg=cfg, manifest=manifest, mixture=mixture, model=model, device=device,
                     nproc=nproc, world=world, max_steps=max_steps, out_dir=out_path,
                     resume=str(found.path) if found else None, done=found is not None and found.step >= max_steps)


def train(recipe: Recipe, nproc: int | None = None, fresh: bool = False) -> TrainPlan:
    """Check the run, start the ranks, train to max_steps (resuming from the latest checkpoint)."""
    plan = prepare(recipe, nproc, fresh)
    say = log.info if os.environ.get("RANK", "0") == "0" else log.debug  # under torchrun: rank 0 speaks
    if plan.done:
        say(f"train: {plan.resume} is at step {plan.max_steps} of {plan.max_steps}: nothing to do "
                 "(raise train.max_steps to go on, or --fresh to start over)")
        return plan
    say(f"train: {plan.cfg.model} ({plan.model.num_params() / 1e6:,.1f}M parameters) on {plan.world} "
             f"{plan.device} rank(s), {plan.max_steps} steps of {plan.cfg.global_batch} x {plan.mixture.seq_len} "
             f"tokens" + (f", resuming from {plan.resume}" if plan.resume else ""))
    try:
        launch(_rank_main, (plan,), plan.nproc, plan.device)
    except RankFailed as e:
        first = str(e).strip().splitlines()[0]
        log.debug(str(e))
        known = _KNOWN_RANK_ERROR.match(first)  # a data or checkpoint problem: its own message says it all
        raise TrainError(f"rank {known[1]}: {known[2]}" if known else f"a training process failed: {first}") from None
    except (FormatError, checkpoint.CheckpointError) as e:  # raised in this process (one rank, torchrun)
        raise TrainError(str(e)) from None
    return plan


_KNOWN_RANK_ERROR = re.compile(r"^rank (\d+): (?:FormatError|ManifestError|CheckpointError|TrainError): (.+)$")


def _rank_main(env: DistEnv, plan: TrainPlan) -> None:
    if env.is_main:
        _log_to_console()
    trainer = Trainer(env, plan)
    try:
        trainer.fit()
    finally:
        trainer.close()


def _log_to_console() -> None:
    logger = logging.getLogger("tinyprep")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logger.handlers:
        import sys

        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(h)


def document_ids(inputs: torch.Tensor, bos_id: int | None, eos_id: int | None) -> torch.Tensor:
    """Document number of every input position: a new document starts at each BOS, or right after
    each EOS (the shards keep the tokenizer's separators)."""
    if bos_id is not None:
        return torch.cumsum(inputs == bos_id, dim=1)
    ends = inputs == eos_id
    return torch.cumsum(ends, dim=1) - ends.long()


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor, doc_ids=None) -> torch.Tensor:
    """Mean next-token cross-entropy over a (rows, seq_len + 1) token block."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs, doc_ids(inputs) if doc_ids is not None else None)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def row_digests(tokens: torch.Tensor) -> list[bytes]:
    """An 8-byte hash of every row (which sample it is, whatever rank read it)."""
    arr = tokens.cpu().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in arr]


class Trainer:
    def __init__(self, env: DistEnv, plan: TrainPlan):
        self.env, self.plan, self.cfg = env, plan, plan.cfg
        cfg = plan.cfg
        self.accum = check_world(cfg.global_batch, env.world, cfg.micro_batch)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and env.device.type == "cuda")
        self.model = build_model(plan.model, env.device, env.world, cfg.seed, bf16=self.bf16,
                                 activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.step = 0
        samples = 0
        if plan.resume:
            info = checkpoint.read_info(Path(plan.resume))
            state = checkpoint.load(info, self.model, self.optimizer, env.rank, env.device)
            self.step, samples = int(state["step"]), int(state["samples"])
        self.loader = MixtureLoader(plan.run_url, plan.manifest, plan.mixture, cfg.global_batch, env.rank,
                                    env.world, samples)
        self.holdout = None
        if cfg.eval_every and cfg.eval_samples:
            self.holdout = HoldoutSet(plan.run_url, plan.manifest, plan.mixture, cfg.eval_samples)
            if not len(self.holdout):
                if env.is_main:
                    log.warning("train: no validation shards hold a sample (tokenize.holdout_fraction 0?): "
                                "no validation loss")
                self.holdout = None
        tok = plan.manifest.tokenizer
        self.doc_ids = None
        try:
            self.model.attention = attention_kind(cfg.attention, env.device, cfg.doc_mask)
        except ValueError as e:
            raise TrainError(f"train.attention: {e}") from None
        if cfg.doc_mask:
            bos = tok.bos_id if plan.manifest.bos else None
            eos = tok.eos_id if plan.manifest.eos else None
            self.doc_ids = lambda x: document_ids(x, bos, eos)
        self.metrics = MetricsLog(str(Path(plan.out_dir) / "metrics.jsonl") if env.is_main else None)
        self.ckpt_root = Path(plan.out_dir) / "checkpoints"
        self.flops_per_token = plan.model.flops_per_token(plan.mixture.seq_len)
        self.peak = peak_flops(env.device, cfg.peak_flops)
        self.fault_step = _fault_step()

    # -- one step ----------------------------------------------------------------------------------
    def forward_backward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Gradients of the mean loss over this rank's rows (accumulated over micro-batches);
        returns that mean loss (a detached scalar tensor). Only the last micro-batch's backward
        reduce-scatters (FSDP2 keeps the earlier ones' gradients unsharded until then)."""
        mb = self.cfg.micro_batch
        total = torch.zeros((), device=self.env.device)
        for i in range(self.accum):
            self.model.set_requires_gradient_sync(i == self.accum - 1)
            part = tokens[i * mb:(i + 1) * mb].to(self.env.device, non_blocking=True)
            loss = lm_loss(self.model, part, self.doc_ids) / self.accum
            loss.backward()
            total += loss.detach()
        return total

    def clip_gradients(self) -> torch.Tensor:
        """Global gradient norm before clipping, a scalar on the device (read on logging steps only,
        so a step needs no host-device sync); clips to train.grad_clip on the device."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        return norm.detach()

    def train_step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's rows: (mean loss, gradient norm before clipping), both
        still on the device."""
        loss = self.forward_backward(tokens)
        grad_norm = self.clip_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _lr(self, step: int) -> float:
        cfg = self.cfg
        return learning_rate(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.decay_steps or self.plan.max_steps)

    def fit(self) -> None:
        plan, cfg, env = self.plan, self.cfg, self.env
        gb, seq_len = cfg.global_batch, plan.mixture.seq_len
        batches = self.loader.prefetch(cfg.prefetch, device=env.device)
        first = self.step + 1
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        pending: dict[int, bytes] = {}  # this rank's row digests of each step since the last record
        self.model.train()
        while self.step < plan.max_steps:
            lr = self._lr(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            window_wait += batch.wait_s
            local_loss, grad_norm = self.train_step(batch.tokens)
            self.step += 1
            window_steps += 1
            done = self.step
            last = done == plan.max_steps
            # this rank's rows of the batch, hashed from the host's copy (no device sync); gathered on
            # logging steps: rank r holds rows [r B / W, (r + 1) B / W) of every global batch, so the
            # rank-ordered digests are the batch's rows in order, whatever the world size
            pending[done] = b"".join(row_digests(batch.tokens))
            saved = bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or last
            # a checkpoint's step is logged too, so that the records up to it hash every step up to it
            if done % cfg.log_every == 0 or last or done == first or saved:
                loss = local_loss.clone()
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)
                # the loss and the gradient norm reach the host here only: one copy per logged step
                loss_sum, norm = torch.stack([loss, grad_norm.to(loss.dtype)]).tolist()
                gathered: list = [None] * env.world
                dist.all_gather_object(gathered, pending)
                hashes = {str(s): hashlib.sha256(b"".join(part[s] for part in gathered)).hexdigest()[:16]
                          for s in sorted(pending)}
                elapsed = time.perf_counter() - window_start  # after the copy: the device has caught up
                tok_s = window_steps * gb * seq_len / elapsed
                per_device = tok_s / env.world
                self.metrics.write({
                    "kind": "train", "step": done, "max_steps": plan.max_steps, "samples": self.loader.samples,
                    "loss": loss_sum / env.world, "lr": lr, "grad_norm": norm,
                    "tokens_per_s": tok_s, "tokens_per_s_per_device": per_device,
                    "data_wait": window_wait / elapsed,  # share of the window rank 0 waited for batches
                    "mfu": self.flops_per_token * per_device / self.peak if self.peak else None,
                    "batch": hashes[str(done)], "batches": hashes,  # this step's; every step's since the last
                    "world": env.world,
                    "sources": self.loader.index.consumed(self.loader.samples),
                })
                pending = {}
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
            evaluated = self.holdout is not None and (done % cfg.eval_every == 0 or last)
            if evaluated:
                self.evaluate()
            if saved:
                self.save()
            if evaluated or saved:  # tokens/s counts training steps only
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
            if self.fault_step is not None and done == self.fault_step:
                os._exit(17)  # fault injection: die like a killed job (no cleanup, no checkpoint)

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean token loss on the holdout, overall and per source (all ranks take part)."""
        env, mb, holdout = self.env, self.cfg.micro_batch, self.holdout
        n = len(holdout)
        per_rank = -(-n // env.world)
        mine = [i * env.world + env.rank for i in range(per_rank)]  # strided; padded past the end
        sums = torch.zeros(2 * len(holdout.names), dtype=torch.float64, device=env.device)
        self.model.eval()
        for lo in range(0, per_rank, mb):
            idx = mine[lo:lo + mb]
            items = [holdout.items[i] if i < n else holdout.items[0] for i in idx]
            tokens = holdout.read(items).to(env.device)
            inputs, targets = tokens[:, :-1], tokens[:, 1:]
            logits = self.model(inputs, self.doc_ids(inputs) if self.doc_ids else None)
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="none").view(len(items), -1).sum(1).double()
            for row, i in enumerate(idx):
                if i < n:
                    s = holdout.items[i][0]
                    sums[2 * s] += losses[row]
                    sums[2 * s + 1] += targets.shape[1]
        self.model.train()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        per = {name: float(sums[2 * s] / sums[2 * s + 1]) for s, name in enumerate(holdout.names)}
        record = {"kind": "eval", "step": self.step, "val_loss": float(sums[0::2].sum() / sums[1::2].sum()),
                  "per_source": per, "samples": n}
        self.metrics.write(record)
        return record

    # -- checkpoints -----------------------------------------------------------------------------
    def save(self) -> None:
        plan = self.plan
        train_state = {"step": self.step, "samples": self.loader.samples, "fingerprint": plan.mixture.fingerprint,
                       "global_batch": self.cfg.global_batch}
        meta = {"world": self.env.world, "model": asdict(plan.model), "model_name": self.cfg.model,
                "sources": self.loader.index.consumed(self.loader.samples),
                "plan": plan_record(plan.manifest, plan.mixture, self.cfg.global_batch)}
        path = checkpoint.save(self.ckpt_root, self.step, self.model, self.optimizer, train_state, meta,
                               self.env.rank, self.env.device, self.cfg.keep_checkpoints)
        if self.env.is_main:
            log.info(f"checkpoint {path}")

    def close(self) -> None:
        self.metrics.close()
        self.loader.close()


def _fault_step() -> int | None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("exit-after-step:"):
        return int(spec.split(":", 1)[1])
    return None


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl (tests and reports)."""
    import orjson

    path = Path(out_dir) / "metrics.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()] if path.exists() else []

