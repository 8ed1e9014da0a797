"""`python -m harness.train method=ect model=unet-s data=digits trainer.steps=200 ...`, a Hydra application.

Trains one run into its run directory (`--out DIR`); running the same command again resumes it (or, when it already
completed, reports its result). `-m` runs a grid (`method=ect,ict`; Hydra's basic launcher here,
`hydra/launcher=submitit_slurm` on SLURM); `--help`, `--cfg job`, `--info` and shell completion are Hydra's.
Every job is composed and checked before Hydra starts any, so bad input is one line and writes nothing.
`run(cfg)` is the entry point launchers call.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.config import ConfigError, compose, default_run_dir
from harness.train.rundir import RunDir, RunDirError, describe_error, exclusive, first_line

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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run(cfg: DictConfig, stop_signals: tuple[int, ...] = STOP_SIGNALS) -> dict:
    """Train (or resume) one run; returns its result.json content. Collective over all ranks.
    Each of `stop_signals` checkpoints and stops it (status `interrupted: <signal> ...`): SIGTERM and
    SIGINT by default; a SLURM task adds its pre-timeout signal (launchers.slurm_job)."""
    from harness.train import engine as eng

    cfg = _with_run_dir(cfg)
    _configure_threads(cfg.trainer.threads)
    dist = eng.setup_distributed(cfg.trainer.device)
    run_dir = RunDir(cfg.run_dir)
    error = None
    with contextlib.ExitStack() as held:
        if dist.rank == 0:
            try:       # the lock first: a second process must not even rewrite config.json
                held.enter_context(exclusive(run_dir.path, "harness.train"))
                run_dir.prepare(cfg)
            except RunDirError as exc:
                error = str(exc)
        error = eng.broadcast_object(error)
        if error:
            raise RunDirError(error)
        return _train(cfg, run_dir, dist, stop_signals)


@contextlib.contextmanager
def _stop_on_signals(box: dict, signals: tuple[int, ...]):
    """Each of `signals` (SIGTERM / SIGINT: what schedulers and Ctrl-C send): during the loop the trainer
    finishes its step, checkpoints and stops; elsewhere (setup, final scores) the run stops at once, as
    Interrupted. A second signal stops at once too. Only in the main thread, where Python delivers signals."""
    from harness.train.trainer import Interrupted
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer = box.get("trainer")
        if trainer is not None and box.get("in_loop") and not trainer.stop_signal:
            trainer.request_stop(signum)
            return
        raise Interrupted(f"{signal.Signals(signum).name} (the newest checkpoint holds the work; run the same "
                          f"command to resume)", signum)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train(cfg: DictConfig, run_dir: RunDir, dist, stop_signals: tuple[int, ...]) -> dict:
    from harness.train.trainer import Interrupted, LossDiverged, NonFiniteLoss
    previous = run_dir.read_json("result.json")
    if previous and previous.get("status") == "completed":
        if int(previous.get("steps", 0)) >= cfg.trainer.steps:
            log.info("%s already completed", run_dir.path)
            return previous
        log.info("%s completed %s steps; training on to trainer.steps=%d from its last checkpoint",
                 run_dir.path, previous.get("steps"), cfg.trainer.steps)
    result: dict = {"status": "running", "run_dir": str(run_dir.path)}
    box: dict = {}
    try:
        with _stop_on_signals(box, stop_signals):
            result = _train_and_score(cfg, run_dir, dist, box, result)
    except Interrupted as exc:
        result = {"status": f"interrupted: {exc}", "run_dir": str(run_dir.path), "signal": int(exc.signum)}
    except (NonFiniteLoss, LossDiverged) as exc:
        result = {"status": f"failed: {exc}", "run_dir": str(run_dir.path)}
    except Exception as exc:
        result = {"status": f"failed: {describe_error(exc)}",
                  "run_dir": str(run_dir.path), "traceback": traceback.format_exc()}
    if dist.rank == 0:
        unwritten = run_dir.write_status(result)
        if unwritten:
            print(f"error: {run_dir.path / 'result.json'} could not be written ({unwritten}); it does not "
                  f"say that the run ended with: {result['status']}", file=sys.stderr)
            result = {**result, "status_unwritten": unwritten}
    return result


def _train_and_score(cfg: DictConfig, run_dir: RunDir, dist, box: dict, result: dict) -> dict:
    """Resume or start, train, checkpoint, score: the completed run's result."""
    from harness.train.trainer import Trainer
    trainer = box["trainer"] = Trainer(cfg, run_dir, dist)
    try:
        return _resume_train_score(cfg, run_dir, dist, box, result, trainer)
    finally:
        trainer.close()


def _resume_train_score(cfg: DictConfig, run_dir: RunDir, dist, box: dict, result: dict, trainer) -> dict:
    trainer.resume()
    restarted = {"restarted": trainer.restarted} if trainer.restarted else {}
    if dist.rank == 0:
        # the log reads as one straight run: lines past the resumed step (all of them when starting
        # again from step 0, the step-0 evaluation included) go
        run_dir.truncate_metrics(trainer.counters.step if trainer.counters.step else -1)
        run_dir.write_json("derived.json", _derived(trainer))
        run_dir.write_json("result.json", {**result, "resumed_from_step": trainer.counters.step, **restarted})
    box["in_loop"] = True
    trainer.train()
    box["in_loop"] = False
    trainer.save()
    scores = trainer.evaluate(final=True) if cfg.eval.at_end else []
    c = trainer.counters
    return {"status": "completed", "run_dir": str(run_dir.path), "steps": c.step,
            "nimg": c.step * cfg.trainer.batch_size, "flops_train": c.flops_total,
            "train_sec": c.train_sec, "nonfinite_skipped": c.nonfinite_total,
            "num_params": trainer.num_params, "scores": scores, "evals": c.evals, **restarted}


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


# Hydra's flags that print something and run nothing, and those that take a value.
_INFO_FLAGS = ("-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc",
               "--shell-completion", "--resolve", "-p", "--package")
# flags whose value is the next token
_VALUE_FLAGS = ("-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                "--experimental-rerun", "-c", "--cfg", "-sc", "--shell-completion")
_MULTIRUN_FLAGS = ("-m", "--multirun")
_exit_codes: list[int] = []   # one per job the Hydra app ran in this process


def _out_to_override(argv: list[str]) -> list[str]:
    """`--out DIR` (every command's spelling of where it writes) as the override it stands for: the run
    directory (`run_dir=DIR`); with -m, the folder of the grid's run directories (`hydra.sweep.dir=DIR`,
    one sub-folder per job). The config key run_dir is not given on the command line: one spelling."""
    multirun = any(a in _MULTIRUN_FLAGS for a in argv)
    out, rest, it = [], [], iter(argv)
    for arg in it:
        if arg == "--out":
            value = next(it, "")
            if not value or value.startswith("-"):
                raise ConfigError("--out needs a directory: --out DIR")
            out.append(value)
        elif arg.startswith("--out="):
            out.append(arg.split("=", 1)[1])
        elif arg.lstrip("+").startswith("run_dir="):
            raise ConfigError(f"the run directory is given as --out DIR, not {arg.lstrip('+').split('=')[0]}=")
        else:
            rest.append(arg)
    if len(out) > 1:
        raise ConfigError(f"--out given {len(out)} times ({', '.join(out)}); give one")
    if out:
        hydra_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        if any(a.split("=", 1)[0] == hydra_key for a in rest):
            raise ConfigError(f"--out and {hydra_key}= both name the output; give one")
        rest.append(f"hydra.sweep.dir={out[0]}" if multirun else f"run_dir={out[0]}")
    return rest


def _split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(Hydra's flags, the overrides, multirun?)."""
    flags, overrides, it = [], [], iter(argv)
    for arg in it:
        if arg.startswith("-") and "=" not in arg:
            flags.append(arg)
            if arg in _VALUE_FLAGS:
                flags.append(next(it, ""))
        else:
            overrides.append(arg)
    return flags, overrides, any(f in _MULTIRUN_FLAGS for f in flags)


def _grid(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun (Hydra's basic sweeper's expansion), Hydra's own overrides left out."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from harness.config import is_hydra_override, parse_overrides
    parsed = [o for o in parse_overrides(overrides) if not is_hydra_override(o)]
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _precheck(overrides: list[str], multirun: bool) -> list[DictConfig]:
    """Compose (and check) every job before Hydra starts anything, so bad input is one line and writes nothing."""
    from harness.train.malloc import malloc_choice
    from harness.train.trainer import check_init_fits, check_source_run
    try:
        malloc_choice()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfgs = [compose(job) for job in (_grid(overrides) if multirun else [overrides])]
    for cfg in cfgs:
        for key, student in (("init_from", ""), ("teacher", cfg.method.name)):
            try:
                if cfg[key]:
                    source = check_source_run(cfg[key], cfg.data, student)
                    if key == "init_from":
                        check_init_fits(cfg, source.model)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
    return cfgs


def run_dir_of(cfg: DictConfig) -> str:
    """The run directory a Hydra job trains into: --out (run_dir); else hydra.run.dir= (with -m: hydra.sweep.dir=/
    hydra.sweep.subdir=, the subdir defaulting to the job's number) when given on the command line; else
    the default runs/<method>-<model>-<data>-<hash>."""
    from hydra.core.hydra_config import HydraConfig
    hc = HydraConfig.get()
    given = {o.split("=", 1)[0].lstrip("+") for o in hc.overrides.hydra}
    if hc.mode.name == "MULTIRUN":
        hydra_dir = None
        if given & {"hydra.sweep.dir", "hydra.sweep.subdir"}:
            subdir = hc.sweep.subdir if "hydra.sweep.subdir" in given else str(hc.job.num)
            hydra_dir = str(Path(hc.sweep.dir) / subdir)
    else:
        hydra_dir = hc.run.dir if "hydra.run.dir" in given else None
    if hydra_dir and cfg.run_dir and Path(cfg.run_dir).resolve() != Path(hydra_dir).resolve():
        raise ConfigError(f"run_dir={cfg.run_dir} and Hydra's {hydra_dir} are different directories; give one")
    return cfg.run_dir or hydra_dir or default_run_dir(cfg)


def _job(cfg: DictConfig) -> dict | None:
    """Hydra's task function: one run per job."""
    from hydra.core.hydra_config import HydraConfig

    from harness.config import finish
    hc = HydraConfig.get()
    try:
        cfg = finish(cfg, hc.runtime.choices.get("recipe"))
        with open_dict(cfg):
            cfg.run_dir = run_dir_of(cfg)
        result = run(cfg)
    except (ConfigError, RunDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        _exit_codes.append(2)
        return None
    _exit_codes.append(_report(result))
    if result.get("signal"):      # SIGTERM / SIGINT stop the whole command, not only this job of a grid
        raise SystemExit(_exit_codes[-1])
    remote = hc.mode.name == "MULTIRUN" and "BasicLauncher" not in str(hc.launcher.get("_target_", ""))
    if remote and result["status"] != "completed":     # a cluster job: its failure reaches the launcher
        raise RuntimeError(f"{result['run_dir']}: {result['status']}")
    return result


def _report(result: dict) -> int:
    status = result["status"]
    if int(os.environ.get("RANK", "0")) != 0:
        return 0 if status == "completed" else 1
    print(f"{Path(result['run_dir'])}: {status}")
    for s in result.get("scores", []):
        print(f"  {s['ema']:>16s} {s['steps']:>3d} step(s) (NFE {s['nfe']}): {s['metric']} "
              f"{s['value']:.3f} (floor {s['floor']:.3f})")
    if result.get("signal"):
        return 128 + int(result["signal"])          # the shell's convention for a process a signal stopped
    return 0 if status == "completed" and not result.get("status_unwritten") else 1


def _hydra_app(argv: list[str]) -> int:
    """Run the Hydra application on argv (its flags, overrides, -m)."""
    import hydra

    from harness.config import CONFIG_MODULE, register
    register()
    app = hydra.main(version_base=None, config_path=f"pkg://{CONFIG_MODULE}", config_name="cmbench")(_job)
    saved = sys.argv
    sys.argv = [saved[0] if saved and not saved[0].startswith("-") else "harness.train", *argv]
    _exit_codes.clear()
    try:
        app()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved
    return max(_exit_codes, default=0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _out_to_override(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    flags, overrides, multirun = _split_argv(argv)
    if "--version" in flags:          # Hydra's own would name Hydra's version
        from harness import version
        print(f"harness.train {version()}")
        return 0
    if flags in (["--cfg", "job"], ["-c", "job"]):   # the config as it will run, wherever --cfg job stands:
        try:                                          # after the method's network needs and the checks
            cfg = compose(overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    if any(f in _INFO_FLAGS for f in flags):
        return _hydra_app(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfgs = _precheck(overrides, multirun)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not multirun and cfgs[0].launcher.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_distributed(cfgs[0].launcher.nproc, argv)
    return _hydra_app(argv)


if __name__ == "__main__":
    sys.exit(main())
