"""One training loop for every method, on the DeepSpeed engine.

The trainer adds what DeepSpeed lacks: EMAs, exact resume, per-step seeding, non-finite handling,
FLOP / throughput accounting and logging. It never mentions a method by name.
"""
from __future__ import annotations

import collections
import logging
import signal
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

import methods
from harness.train import checkpoint, engine as eng
from harness.train.malloc import keep_freed_memory
from harness.data import load_dataset
from harness.train.ema import make_emas
from harness.eval.grid import save_grid
from harness.eval.metrics import build_metric
from harness.eval.score import generate, score
from harness.nets import build_net, count_params, uses_forced_weight_norm
from harness.nets.layers import DropoutTape
from harness.train.rundir import RunDir, read_status
from harness.train.seeding import EpochSampler, seed_step
from harness.train.watch import Console, build_loggers, numeric, score_tag
from methods.base import StepContext

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class LossDiverged(RuntimeError):
    """The loss stayed far above its running median (trainer.divergence_factor / divergence_steps)."""


DIVERGENCE_WINDOW = 200          # steps of |loss| whose median the divergence guard compares with
DIVERGENCE_MIN_HISTORY = 50      # ... and how many it needs before it judges


class Interrupted(RuntimeError):
    """SIGTERM or SIGINT stopped the run; its newest checkpoint holds the work done."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclass
class Counters:
    """Progress that a checkpoint must carry besides the weights."""
    step: int = 0                 # completed optimizer steps (also the data position: batches consumed)
    nonfinite_total: int = 0      # steps skipped for a non-finite loss
    nonfinite_run: int = 0        # ... in a row, right now
    flops_total: float = 0.0      # counted training FLOPs, all ranks
    flops_per_step: float = 0.0
    train_sec: float = 0.0        # wall time spent in training steps
    evals: list = field(default_factory=list)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20      # Linux: kilobytes


def method_config(cfg: DictConfig):
    """The method's typed config object (its dataclass), from the resolved config."""
    return OmegaConf.to_object(cfg.method)


def check_source_run(run_dir: str, data: DictConfig, student: str = "") -> DictConfig:
    """The config of a run another one starts from (init_from / teacher): it must be complete, trained on
    the same data (name, so image size and channels, and conditioning) and, as the teacher of method
    `student`, with one of the methods in that method's `teacher_methods` (empty: any)."""
    src = RunDir(run_dir)
    if not src.config_path.exists():
        raise ValueError(f"{run_dir} is not a run directory (no config.yaml)")
    other = src.load_config()
    status = read_status(run_dir) or "unknown"
    if status != "completed":
        raise ValueError(f"{run_dir} has not completed (status: {status}); finish it first")
    if other.data.name != data.name:
        raise ValueError(f"{run_dir} was trained on {other.data.name}, this run uses {data.name}")
    if other.data.class_conditional != data.class_conditional:
        raise ValueError(f"{run_dir} has data.class_conditional={other.data.class_conditional}, "
                         f"this run {data.class_conditional}")
    allowed = methods.get(student).teacher_methods if student else ()
    if allowed and other.method.name not in allowed:
        raise ValueError(f"{run_dir} is a {other.method.name} run; {student} needs a teacher trained with "
                         f"method={' or method='.join(allowed)}")
    return other


def load_run_net(run_dir: str, ema_name: str, data: DictConfig,
                 student: str = "") -> tuple[dict[str, torch.Tensor], DictConfig]:
    """EMA weights and model config of another, completed run (init_from / teacher, see check_source_run)."""
    src, other = RunDir(run_dir), check_source_run(run_dir, data, student)
    for ckpt in checkpoint.list_checkpoints(src.path):
        try:
            emas = checkpoint.safe_load(ckpt / "harness.pt")["emas"]
            break
        except checkpoint.UnsafeCheckpointError:
            raise
        except Exception as exc:
            log.warning("%s is unreadable (%s); trying the previous checkpoint", ckpt, type(exc).__name__)
    else:
        raise ValueError(f"{run_dir} has no readable checkpoint")
    if not emas:
        raise ValueError(f"{run_dir} kept no EMA (trainer.ema_betas and trainer.ema_stds were empty)")
    name = ema_name or next(iter(emas))
    if name not in emas:
        raise ValueError(f"{run_dir} has no EMA '{name}'; it has {', '.join(emas)}")
    return emas[name], other.model


def _fresh_head(mine_state: dict[str, torch.Tensor], their_state: dict[str, torch.Tensor], source: str) -> set[str]:
    """Check that the weights `their_state` fit a network whose state dict is `mine_state` (ValueError, one
    line); the keys of a log-variance head only `mine_state` has (a source without one, e.g. a teacher for
    sCT, leaves this run's new head at its init)."""
    mine = {k: tuple(v.shape) for k, v in mine_state.items()}
    theirs = {k: tuple(v.shape) for k, v in their_state.items()}
    fresh_head = {k for k in set(mine) - set(theirs) if k.startswith("logvar_head.")}
    if {k: s for k, s in mine.items() if k not in fresh_head} != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))[0]
        raise ValueError(f"{source}'s network does not match this model (first difference: {diff[0]} {diff[1]})")
    return fresh_head


def check_init_fits(cfg: DictConfig, source_model: DictConfig) -> None:
    """Before any work: would init_from's weights (a network of `source_model`) load into this run's?
    Both are built on the meta device from their configs, allocating nothing."""
    from harness.data import data_shape
    shape, classes = data_shape(cfg.data)
    with torch.device("meta"):
        mine, theirs = (build_net(m, shape, classes).state_dict() for m in (cfg.model, source_model))
    _fresh_head(mine, theirs, cfg.init_from)


def load_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load another run's weights, refusing (in one line) a network of another shape."""
    fresh_head = _fresh_head(net.state_dict(), weights, source)
    if fresh_head:
        log.info("%s has no log-variance head: this run's starts at its initialization", source)
    net.load_state_dict(weights, strict=not fresh_head)


class Trainer:
    def __init__(self, cfg: DictConfig, run: RunDir, dist: eng.DistInfo):
        self.cfg, self.run, self.dist = cfg, run, dist
        keep_freed_memory()                                           # CPU steps reuse freed memory (malloc.py)
        self.stop_signal = 0                                          # set by request_stop (SIGTERM/SIGINT)
        t = cfg.trainer
        self.device = dist.device
        self.precision = eng.resolve_precision(t.precision, self.device)
        torch.manual_seed(cfg.seed)                                   # network initialization
        self.data = load_dataset(cfg.data)            # kept on the host; batches move to the device
        # the metric is built (weights, statistics, held-out set checked) before any training
        self.metric = (build_metric(cfg.eval, self.data, self.device, cfg.data)
                       if cfg.eval.at_end or cfg.eval.every_steps else None)
        self.sampler = EpochSampler(len(self.data.x), cfg.seed)
        net = build_net(cfg.model, self.data.shape, self.data.num_classes).to(self.device)
        if cfg.init_from:
            weights, _ = load_run_net(cfg.init_from, cfg.init_ema, cfg.data)
            load_weights(net, weights, cfg.init_from)
        if uses_forced_weight_norm(net) and (self.precision != "fp32" or t.zero_stage > 0):
            log.warning("forced weight normalization (EDM2) acts on the module weights only in fp32 with "
                        "ZeRO 0; with %s / ZeRO %d DeepSpeed's master weights are not renormalized",
                        self.precision, t.zero_stage)
        self.method = methods.get(cfg.method.name)(method_config(cfg), self.data.shape, self.data.num_classes)
        self.method.attach(net)
        self.method.attach_data(self.data.x, self.data.y)
        self.teacher = self._load_teacher() if cfg.teacher else None
        self.emas = make_emas(net, t.ema_betas, t.ema_stds)
        self.engine = eng.build_engine(net, t, self.precision, dist.world_size)
        self.counters = Counters()
        self.num_params = count_params(net)
        self.restarted = ""
        self.console = Console(cfg.log.console, t.steps, 0) if dist.rank == 0 else None
        self.loggers = build_loggers(cfg.log, run.path, OmegaConf.to_container(cfg, resolve=True),
                                     OmegaConf.to_yaml(cfg, resolve=True)) if dist.rank == 0 and run else []
        self._abs_losses: collections.deque[float] = collections.deque(maxlen=DIVERGENCE_WINDOW)
        self._diverged_for = 0
        self.diverged = ""

    def _load_teacher(self) -> torch.nn.Module:
        cfg = self.cfg
        weights, model_cfg = load_run_net(cfg.teacher, "", cfg.data, student=cfg.method.name)
        net = build_net(model_cfg, self.data.shape, self.data.num_classes)
        load_weights(net, weights, cfg.teacher)
        return net.to(self.device).eval().requires_grad_(False)

    # -- state ---------------------------------------------------------------------------------
    def harness_state(self) -> dict[str, Any]:
        return {"counters": vars(self.counters).copy(), "method": self.method.state_dict(),
                "emas": {e.name: e.state_dict() for e in self.emas}}

    def apply_state(self, state: dict[str, Any]) -> None:
        self.counters = Counters(**state["counters"])
        self.method.load_state_dict(state["method"])
        for e in self.emas:
            e.load_state_dict(state["emas"][e.name])

    def resume(self) -> bool:
        """Load the newest readable checkpoint; False when starting from step 0. When checkpoints exist
        but none is readable, `restarted` says so (the run then starts again, and records it)."""
        found = checkpoint.list_checkpoints(self.run.path)
        state = checkpoint.load_latest(self.engine, self.run.path, self.dist.rank, self.apply_state)
        if state is None:
            if found:
                self.restarted = (f"none of its {len(found)} checkpoints ({found[0].name} newest) was readable: "
                                  f"started again from step 0")
                log.warning("%s: %s", self.run.path, self.restarted)
            return False
        log.info("resumed from step %d", self.counters.step)
        if self.console is not None:
            self.console.start = self.counters.step
            self.console.step(self.counters.step)
        return True

    def close(self) -> None:
        """Stop the console's bar and flush the trackers (also after a failure)."""
        if self.console is not None:
            self.console.close()
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def save(self) -> None:
        newest = checkpoint.list_checkpoints(self.run.path)
        if newest and newest[0].name == checkpoint.step_name(self.counters.step):
            return                                         # already saved (a resumed, finished run)
        for p in self.engine.module.parameters():        # never write NaN weights
            if not torch.isfinite(p).all():
                raise NonFiniteLoss("non-finite weights")
        checkpoint.save(self.engine, self.run.path, self.counters.step, self.harness_state(),
                        self.dist.rank, self.cfg.trainer.keep_checkpoints)

    # -- one step ------------------------------------------------------------------------------
    def batch(self, step: int) -> dict[str, torch.Tensor | None]:
        idx = self.sampler.batch(step, self.cfg.trainer.batch_size, self.dist.rank, self.dist.world_size)
        y = self.data.y[idx].to(self.device) if self.data.y is not None else None
        return {"x": self.data.x[idx].to(self.device, non_blocking=True), "y": y}

    def step(self, step: int) -> dict[str, float] | None:
        """One optimizer step; returns the logged scalars, or None when skipped (non-finite loss)."""
        gen = seed_step(self.cfg.seed, step, self.dist.rank, self.device)
        ctx = StepContext(net=self.engine, net_nograd=self.engine.module, teacher=self.teacher,
                          step=step, total_steps=self.cfg.trainer.steps, generator=gen, shared_dropout=DropoutTape)
        counting = self.counters.flops_per_step == 0.0
        with FlopCounterMode(display=False) if counting else nullcontext() as fc:
            out = self.method.loss(ctx, self.batch(step))
            loss = out["loss"]
            if not eng.all_finite(loss):
                return self._skip_nonfinite()
            self.engine.backward(loss)
        if counting:
            self.counters.flops_per_step = float(fc.get_total_flops()) * self.dist.world_size
        if not self._grads_finite():
            return self._skip_nonfinite()
        eng.set_lr(self.engine, step, self.cfg.trainer)
        skipped = getattr(self.engine, "skipped_steps", 0)
        self.engine.step()
        if getattr(self.engine, "skipped_steps", 0) == skipped:     # fp16 overflow: weights unchanged
            self.method.after_step(self.engine.module, step, self.cfg.trainer.steps)
            for e in self.emas:
                e.update(self.engine.module, step)
        self.counters.nonfinite_run = 0
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}

    def _grads_finite(self) -> bool:
        """Non-finite gradients from a finite loss (fp32/bf16, ZeRO 0); fp16 overflow is DeepSpeed's,
        and under ZeRO 1-2 the partitioned gradients are not inspected."""
        if self.precision == "fp16" or self.cfg.trainer.zero_stage > 0:
            return True
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())) if grads else True
        return eng.all_true(finite)

    def _skip_nonfinite(self) -> None:
        c = self.counters
        c.nonfinite_total += 1
        c.nonfinite_run += 1
        self.engine.zero_grad()
        if c.nonfinite_run >= self.cfg.trainer.max_nonfinite_steps:
            raise NonFiniteLoss(f"non-finite loss ({c.nonfinite_run} steps in a row)")
        return None

    # -- the loop ------------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """From a signal handler: finish the current step, checkpoint, raise Interrupted."""
        self.stop_signal = signum

    def train(self) -> None:
        t, c = self.cfg.trainer, self.counters
        acc: dict[str, float] = {}
        n_acc, step_secs = 0, []
        if self.cfg.eval.every_steps and c.step == 0:
            self.evaluate(final=False)                     # the starting point, for the curve
        while c.step < t.steps:
            tic = time.perf_counter()
            scalars = self.step(c.step)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - tic
            c.train_sec += dt
            step_secs.append(dt)
            c.step += 1
            if self.console is not None:
                self.console.step(c.step)
            if scalars is not None:
                self._watch_divergence(scalars["loss"], c.step)
                c.flops_total += c.flops_per_step
                n_acc += 1
                for k, v in scalars.items():
                    acc[k] = acc.get(k, 0.0) + v
            if c.step % t.log_every_steps == 0 or c.step == t.steps:
                self._log(acc, n_acc, step_secs)
                acc, n_acc, step_secs = {}, 0, []
            if self.cfg.eval.every_steps and c.step % self.cfg.eval.every_steps == 0 and c.step < t.steps:
                self.evaluate(final=False)
            if t.grid_every_steps and c.step % t.grid_every_steps == 0 and self.dist.rank == 0:
                self.grid(f"grid_step{c.step:07d}.png")
            if c.step % t.checkpoint_every_steps == 0 and c.step < t.steps:
                self.save()
            if not eng.all_true(not (self.stop_signal or self.diverged)) and c.step < t.steps:
                if not eng.all_true(not self.diverged):          # any rank: fail, keeping the checkpoints
                    raise LossDiverged(self.diverged or "the loss diverged on another rank")
                if c.step % t.checkpoint_every_steps:          # SIGTERM / SIGINT on any rank
                    self.save()
                signum = self.stop_signal or signal.SIGTERM                # another rank's signal: SIGTERM
                raise Interrupted(f"{signal.Signals(signum).name} at step {c.step} (checkpoint saved; run the "
                                  f"same command to resume)", signum)

    def _watch_divergence(self, loss: float, step: int) -> None:
        """Count steps whose |loss| exceeds divergence_factor x the running median; such losses stay out of
        the median, so a blow-up cannot raise its own bar."""
        t = self.cfg.trainer
        if not t.divergence_factor:
            return
        if len(self._abs_losses) >= DIVERGENCE_MIN_HISTORY:
            median = statistics.median(self._abs_losses)
            if abs(loss) > t.divergence_factor * median:
                self._diverged_for += 1
                if self._diverged_for >= t.divergence_steps:
                    self.diverged = (f"loss diverged: {loss:.3g} at step {step}, above {t.divergence_factor:g}x "
                                     f"its running median {median:.3g} for {self._diverged_for} steps in a row "
                                     f"(trainer.divergence_factor / divergence_steps; 0 = off)")
                return
        self._diverged_for = 0
        self._abs_losses.append(abs(loss))

    def _log(self, acc: dict[str, float], n: int, step_secs: list[float]) -> None:
        means = eng.mean_over_ranks({k: v / n for k, v in acc.items()}) if n else {}
        if self.dist.rank != 0:
            return
        c, t = self.counters, self.cfg.trainer
        sec = sum(step_secs) / max(len(step_secs), 1)
        record = {"step": c.step, "nimg": c.step * t.batch_size, **means,
                  "time/step_sec": sec, "time/images_per_sec": t.batch_size / sec if sec else 0.0,
                  "time/train_sec": c.train_sec, "flops/train_total": c.flops_total,
                  "lr": self.engine.get_lr()[0], "nonfinite/skipped_total": c.nonfinite_total,
                  "mem/peak_gb": peak_memory_gb(self.device)}
        if self.precision == "fp16":      # DeepSpeed's dynamic loss scaling: steps skipped on overflow
            record["fp16/overflow_skipped_total"] = int(getattr(self.engine, "skipped_steps", 0))
        self.run.log(record)
        for logger in self.loggers:
            logger.scalars(c.step, numeric(record))
        self.console.logged(c.step, record, next((k for k in means if k != "loss"), None))

    # -- sampling and scores -------------------------------------------------------------------
    def ema_nets(self) -> dict[str, torch.nn.Module]:
        return {e.name: e.module for e in self.emas} or {"net": self.engine.module}

    def grid(self, name: str, steps: int = 2) -> None:
        name_ema, net = next(iter(self.ema_nets().items()))
        x = generate(self.method, net, 100, steps, self.data.shape, self.data.num_classes,
                     self.cfg.eval.seed, 100, self.device)
        save_grid(x.clamp(-1, 1), self.run.path / name)
        for logger in self.loggers:
            logger.image(f"grid/{name_ema}", self.run.path / name, self.counters.step)

    def evaluate(self, final: bool) -> list[dict]:
        records, error = [], None
        if self.dist.rank == 0:
            try:
                records = score(self.method, self.ema_nets(), self.data, self.cfg.eval, self.device,
                                self.counters.step, grid_dir=self.run.path if final else None,
                                metric=self.metric)
            except Exception as exc:     # every rank learns of it, so none waits forever
                error = f"evaluation failed: {type(exc).__name__}: {exc}"
            for r in records:
                self.run.log({"step": self.counters.step, **{f"eval/{k}": v for k, v in r.items()}})
            grids = sorted(self.run.path.glob("samples_*.png")) if final and self.loggers else []
            for logger in self.loggers:
                logger.scalars(self.counters.step, {score_tag(r): r["value"] for r in records})
                for png in grids:
                    logger.image(f"samples/{png.stem}", png, self.counters.step)
            self.console.scored(records)
            if not final:
                self.counters.evals.extend(records)
        error = eng.broadcast_object(error)
        if error:
            raise RuntimeError(error)
        return records
