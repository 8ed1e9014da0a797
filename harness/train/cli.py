"""`python -m harness.train method=ect model=unet-s data=digits trainer.steps=200 ...`

Trains one run into its run directory; running the same command again resumes it (or, when it
already completed, reports its result). `run(cfg)` is the entry point launchers call.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.config import ConfigError, compose, default_run_dir
from harness.train.rundir import RunDir, RunDirError, first_line

log = logging.getLogger("harness.train")


def _configure_threads(threads: int) -> None:
    import torch
    if threads > 0:
        torch.set_num_threads(threads)


def _with_run_dir(cfg: DictConfig) -> DictConfig:
    if not cfg.run_dir:
        OmegaConf.set_struct(cfg, False)
        cfg.run_dir = default_run_dir(cfg)
        OmegaConf.set_struct(cfg, True)
    return cfg


def run(cfg: DictConfig) -> dict:
    """Train (or resume) one run; returns its result.json content. Collective over all ranks."""
    from harness.train import engine as eng
    from harness.train.trainer import NonFiniteLoss, Trainer

    cfg = _with_run_dir(cfg)
    _configure_threads(cfg.trainer.threads)
    dist = eng.setup_distributed(cfg.trainer.device)
    run_dir = RunDir(cfg.run_dir)
    error = None
    if dist.rank == 0:
        try:
            run_dir.prepare(cfg)
        except RunDirError as exc:
            error = str(exc)
    error = eng.broadcast_object(error)
    if error:
        raise RunDirError(error)
    previous = run_dir.read_json("result.json")
    if previous and previous.get("status") == "completed":
        log.info("%s already completed", run_dir.path)
        return previous
    result: dict = {"status": "running", "run_dir": str(run_dir.path)}
    try:
        trainer = Trainer(cfg, run_dir, dist)
        resumed = trainer.resume()
        if dist.rank == 0:
            if resumed:
                run_dir.truncate_metrics(trainer.counters.step)
            run_dir.write_json("derived.json", _derived(trainer))
            run_dir.write_json("result.json", {**result, "resumed_from_step": trainer.counters.step})
        trainer.train()
        trainer.save()
        scores = trainer.evaluate(final=True) if cfg.eval.at_end else []
        c = trainer.counters
        result = {"status": "completed", "run_dir": str(run_dir.path), "steps": c.step,
                  "nimg": c.step * cfg.trainer.batch_size, "flops_train": c.flops_total,
                  "train_sec": c.train_sec, "nonfinite_skipped": c.nonfinite_total,
                  "num_params": trainer.num_params, "scores": scores, "evals": c.evals}
    except NonFiniteLoss as exc:
        result = {"status": f"failed: {exc}", "run_dir": str(run_dir.path)}
    except Exception as exc:
        result = {"status": f"failed: {type(exc).__name__}: {first_line(exc)}",
                  "run_dir": str(run_dir.path), "traceback": traceback.format_exc()}
    if dist.rank == 0:
        run_dir.write_json("result.json", result)
    return result


def _derived(trainer) -> dict:
    """Values derived from the config (never written back into it)."""
    d = trainer.dist
    return {"precision": trainer.precision, "world_size": d.world_size, "device": str(trainer.device),
            "num_params": trainer.num_params, "batch_per_rank": trainer.cfg.trainer.batch_size // d.world_size,
            "method_config": OmegaConf.to_container(trainer.cfg.method, resolve=True)}


def _relaunch_distributed(nproc: int, argv: list[str]) -> int:
    """launcher.nproc > 1 from a plain shell: restart this command under torchrun."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "harness.train", *argv])
    except ChildFailedError as exc:
        print(f"error: a rank failed ({first_line(exc) or 'see its output above'})",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = compose(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from harness.train.trainer import check_source_run
    for key, student in (("init_from", ""), ("teacher", cfg.method.name)):
        try:
            if cfg[key]:
                check_source_run(cfg[key], cfg.data, student)
        except ValueError as exc:
            print(f"error: {key}: {exc}", file=sys.stderr)
            return 2
    if cfg.launcher.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_distributed(cfg.launcher.nproc, argv)
    try:
        result = run(cfg)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = result["status"]
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if status == "completed" else 1
    print(f"{Path(result['run_dir'])}: {status}")
    for s in result.get("scores", []):
        print(f"  {s['ema']:>16s} {s['steps']:>3d} step(s) (NFE {s['nfe']}): {s['metric']} "
              f"{s['value']:.3f} (floor {s['floor']:.3f})")
    return 0 if status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
