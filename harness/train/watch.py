"""What a person sees of a run while it trains: console progress and experiment trackers.

Console (`log.console`): at every log interval one line with step / total, loss, the method's main
scalar (the first one its loss returns after `loss`), images/s, elapsed time, ETA and the latest score;
on a terminal (`auto`) a rich progress bar carries the same line; `quiet` prints nothing but errors.

Trackers (`log.tensorboard`, `log.wandb`): every scalar of metrics.jsonl by its key, each score as
`score/<metric>/<ema>/nfe<N>`, sample grids as images and the resolved config as text. TensorBoard
event files go to `<run>/tensorboard/` (on by default; `tensorboard --logdir` on a sweep directory
shows every run); Weights & Biases is off unless `log.wandb=offline|online` (offline writes under
`<run>/wandb/`, to sync later). A tracker is a `RunLogger`; add one by writing the four methods and a
case in `build_loggers`.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("harness.train.progress")

# metrics.jsonl keys that are not scalars of the run's curves
_NOT_SCALARS = {"step", "time"}


class RunLogger(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, tag: str, path: Path, step: int) -> None: ...
    def text(self, tag: str, text: str) -> None: ...
    def close(self) -> None: ...


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a metrics.jsonl record, as a tracker logs them."""
    return {k: float(v) for k, v in record.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def score_tag(rec: dict[str, Any]) -> str:
    return f"score/{rec['metric']}/{rec['ema']}/nfe{rec['nfe']}"


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        from torchvision.io import ImageReadMode, read_image
        self.writer.add_image(tag, read_image(str(path), ImageReadMode.RGB), step)
        self.writer.flush()

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, "    " + text.replace("\n", "\n    "))   # markdown: a code block

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, mode: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise RuntimeError("log.wandb needs the wandb package (pip install wandb); "
                               "set log.wandb='' to train without it") from None
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), mode=mode, project="cmbench", name=run_dir.name,
                              id=run_dir.name, resume="allow", config=config)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def close(self) -> None:
        self.run.finish()


def build_loggers(log_cfg, run_dir: Path, config: dict, config_text: str) -> list[RunLogger]:
    loggers: list[RunLogger] = []
    if log_cfg.tensorboard:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    if log_cfg.wandb:
        loggers.append(WandbLogger(run_dir, log_cfg.wandb, config))
    for logger in loggers:
        logger.text("config", config_text)
    return loggers


def clock(seconds: float) -> str:
    """h:mm:ss of a duration (negative: 0), for progress lines here and in the sweep's status."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Console:
    """Progress on the console for one run (rank 0): lines, or a bar on a terminal."""

    def __init__(self, mode: str, total: int, start: int):
        self.total, self.start = total, start
        self.tic = time.perf_counter()
        self.latest_score = ""
        self.bar = None
        if mode == "auto" and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            self.bar = Progress(BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                                transient=False)
            self.task = self.bar.add_task("", total=total, completed=start)
            self.bar.start()
        self.quiet = mode == "quiet"

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def line(self, step: int, record: dict[str, Any], main_scalar: str | None) -> str:
        elapsed = time.perf_counter() - self.tic
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        parts = [f"step {step}/{self.total}", f"loss {record.get('loss', float('nan')):.4g}"]
        if main_scalar and main_scalar in record:
            parts.append(f"{main_scalar} {record[main_scalar]:.4g}")
        parts += [f"{record.get('time/images_per_sec', 0.0):.0f} img/s", f"elapsed {clock(elapsed)}",
                  f"ETA {clock(eta)}"]
        if self.latest_score:
            parts.append(self.latest_score)
        return " | ".join(parts)

    def logged(self, step: int, record: dict[str, Any], main_scalar: str | None) -> None:
        text = self.line(step, record, main_scalar)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text.split(" | ", 1)[1])
        elif not self.quiet:
            log.info("%s", text)

    def scored(self, records: list[dict]) -> None:
        if records:
            best = min(records, key=lambda r: (r["metric"], r["value"]))
            self.latest_score = f"{best['metric']} {best['value']:.4g} ({best['ema']}, NFE {best['nfe']})"
            if self.bar is None and not self.quiet:
                log.info("step %d scores: %s", records[0].get("step", 0),
                         ", ".join(f"{r['metric']} {r['value']:.4g} ({r['ema']}, NFE {r['nfe']})" for r in records))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
