"""`python -m harness.evaluate RUN_DIR [--steps 1 2 0] [--num-samples N] [--metric M] [eval.KEY=VALUE ...]
[method.KEY=VALUE ...]`

Scores a run's last checkpoint: every EMA (or the raw network when the run kept none), sampled with
each of --steps sampler steps (0 = the method's own N), with the run's eval and method settings unless
given here: e.g. `method.mid_t=[1.5]` re-scores with another 2-step mid-point, and
`eval.selection=true 'eval.mid_sigma_grid=[0.1,0.2,0.4,0.8,1.6,3.2]'` chooses it on the selection set
(harness.eval.select).

Scores keep their protocol: with the run's own protocol (its eval.* and method.* settings; --steps
and the batch size do not count) it writes RUN_DIR/evaluate.json, whose scores the collector uses in
place of result.json's; with any other (e.g. --num-samples 50) it writes RUN_DIR/evaluate-<protocol>.json
beside the original, never replacing it, and the collector reads it only when asked for that protocol
(`harness.collect --protocol`). Each file is written atomically and nothing else in the run directory is
touched. Exit status 2 on a bad RUN_DIR or option (one line).
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness import version

log = logging.getLogger("harness.eval.evaluate")


class EvaluateError(ValueError):
    """A run directory or option this command cannot use; the message is one line."""


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's resolved config, its eval section completed with today's defaults (older runs)."""
    from harness.config import EvalConfig
    if not run_dir.is_dir():
        raise EvaluateError(f"{run_dir} does not exist or is not a directory")
    if not (run_dir / "config.yaml").is_file():
        raise EvaluateError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        cfg = OmegaConf.load(run_dir / "config.yaml")
        OmegaConf.set_struct(cfg, False)
        cfg.eval = OmegaConf.merge(OmegaConf.structured(EvalConfig), cfg.get("eval", {}))
    except Exception as exc:
        raise EvaluateError(f"{run_dir}/config.yaml is unreadable ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None
    return cfg


def apply_options(cfg: DictConfig, args: argparse.Namespace) -> DictConfig:
    """--steps / --num-samples / --metric / eval.KEY=VALUE on top of the run's eval section, checked."""
    from harness.config import check_keys, parse_overrides
    from harness.eval.metrics import check_eval_config
    ecfg = cfg.eval
    ecfg.steps = list(args.steps)
    for flag, key, value in (("--num-samples", "num_samples", args.num_samples), ("--metric", "metric", args.metric)):
        given = [o.split("=", 1)[1] for o in args.overrides if o.split("=", 1)[0] == f"eval.{key}"]
        if value is not None and given and given[-1] != str(value):
            raise EvaluateError(f"{flag} {value} and eval.{key}={given[-1]} disagree; give one of them")
        if value is not None:
            ecfg[key] = value
    bad = [o for o in args.overrides if not o.startswith(("eval.", "method."))]
    if bad:
        raise EvaluateError(f"only eval.KEY=VALUE and method.KEY=VALUE (sampler settings such as "
                            f"method.mid_t=[1.5]) overrides apply here, got '{bad[0]}'")
    parsed = parse_overrides(args.overrides)
    if any(o.key_or_group == "method.name" for o in parsed):
        raise EvaluateError("method.name cannot change when re-scoring: the checkpoint is a "
                            f"{cfg.method.name} run")
    schema = _method_schema(cfg)
    check_keys(OmegaConf.create({"eval": OmegaConf.to_container(ecfg), "method": schema}), parsed)
    for o in parsed:
        OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    if any(s < 0 for s in ecfg.steps) or ecfg.num_samples < 2:
        raise EvaluateError(f"--steps must be >= 0 and --num-samples >= 2 (got {list(ecfg.steps)}, "
                            f"{ecfg.num_samples})")
    check_eval_config(ecfg, cfg.data.name)
    _check_method(cfg)
    return cfg


# eval keys that change how many rows there are or how fast they come, not what a score measures
PROTOCOL_FREE = {"steps", "at_end", "every_steps", "batch_size", "grid", "cache_dir", "inception_path"}


def protocol_of(run_cfg: DictConfig, cfg: DictConfig) -> tuple[str, dict]:
    """("run", {}) when `cfg` scores as the run itself did, else (an id for file names, {key: new value})."""
    import hashlib
    import json
    import re
    old = {"eval": OmegaConf.to_container(run_cfg.eval, resolve=True),
           "method": OmegaConf.to_container(run_cfg.method, resolve=True)}
    new = {"eval": OmegaConf.to_container(cfg.eval, resolve=True),
           "method": OmegaConf.to_container(cfg.method, resolve=True)}
    changes = {f"{section}.{k}": v for section in ("eval", "method") for k, v in new[section].items()
               if not (section == "eval" and k in PROTOCOL_FREE) and old[section].get(k) != v}
    if not changes:
        return "run", {}
    digest = hashlib.sha256(json.dumps(changes, sort_keys=True).encode()).hexdigest()[:6]
    readable = "-".join(f"{k.split('.', 1)[1]}{v}" for k, v in sorted(changes.items()))
    return f"{re.sub(r'[^A-Za-z0-9_.]+', '_', readable)[:40]}-{digest}", changes


def _method_schema(cfg: DictConfig) -> dict:
    import methods
    try:
        cls = methods.get(cfg.method.name)
    except ValueError as exc:
        raise EvaluateError(str(exc)) from None
    return OmegaConf.to_container(OmegaConf.structured(cls.Config()))


def _check_method(cfg: DictConfig) -> None:
    """The method section, overrides included, passes the method's own check (one line)."""
    import methods
    cls = methods.get(cfg.method.name)
    try:
        method_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config()), cfg.method))
        cls.check_config(method_cfg)
    except Exception as exc:
        raise EvaluateError(f"method settings: {' '.join(str(exc).split())}") from None


def load_networks(run_dir: Path, cfg: DictConfig, data, device):
    """(method, {ema name: network}, checkpoint path, its harness state) from the newest readable checkpoint."""
    import methods
    from harness.train import checkpoint
    from harness.nets import build_net
    ckpts = checkpoint.list_checkpoints(run_dir)
    if not ckpts:
        raise EvaluateError(f"{run_dir} has no checkpoint (checkpoints/step-*/): train it first")
    for ckpt in ckpts:
        try:
            state = checkpoint.safe_load(ckpt / "harness.pt")
            weights = state["emas"] or {"net": _engine_weights(ckpt)}
            break
        except checkpoint.UnsafeCheckpointError as exc:
            raise EvaluateError(str(exc)) from None
        except Exception as exc:
            log.warning("%s is unreadable (%s); trying the previous checkpoint", ckpt, type(exc).__name__)
    else:
        raise EvaluateError(f"{run_dir} has no readable checkpoint")
    cls = methods.get(cfg.method.name)
    method_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Config()), cfg.method))
    method = cls(method_cfg, data.shape, data.num_classes)
    nets = {}
    for name, sd in weights.items():
        net = build_net(cfg.model, data.shape, data.num_classes)
        net.load_state_dict(sd)
        nets[name] = net.float().to(device).eval().requires_grad_(False)
    method.attach(next(iter(nets.values())))
    if hasattr(method, "attach_data"):
        method.attach_data(data.x, data.y)
    method.load_state_dict(state.get("method", {}))
    return method, nets, ckpt, state


def _engine_weights(ckpt: Path) -> dict:
    """The raw network from DeepSpeed's model states file, for a run that kept no EMA."""
    from harness.train import checkpoint
    files = sorted((ckpt / "engine").glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no model states under {ckpt / 'engine'}")
    return checkpoint.safe_load(files[0])["module"]


def evaluate(run_dir: Path, cfg: DictConfig, device: str = "auto", argv: list[str] | None = None,
             run_cfg: DictConfig | None = None) -> dict:
    """Score the run's last checkpoint; returns (and writes) the evaluate.json content (evaluate-<protocol>.json
    when `cfg` scores by another protocol than the run's own config `run_cfg`)."""
    import torch

    from harness.data import load_dataset
    from harness.eval.metrics import build_metric
    from harness.eval.score import score
    from harness.train.rundir import RunDir
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    from harness.train import checkpoint
    if not checkpoint.list_checkpoints(run_dir):
        raise EvaluateError(f"{run_dir} has no checkpoint (checkpoints/step-*/): train it first")
    data = load_dataset(cfg.data)
    metric = build_metric(cfg.eval, data, dev, cfg.data)          # missing weights / statistics: fail now
    method, nets, ckpt, state = load_networks(run_dir, cfg, data, dev)
    t0 = time.perf_counter()
    step = int(state.get("counters", {}).get("step", -1))
    scores = score(method, nets, data, cfg.eval, dev, step, metric=metric)
    protocol, changes = protocol_of(run_cfg if run_cfg is not None else load_run_config(run_dir), cfg)
    for record in scores:
        record.update({"checkpoint": ckpt.name, "train_seed": int(cfg.get("seed", 0)), "protocol": protocol})
    out = {"scores": scores, "run_dir": str(run_dir), "checkpoint": str(ckpt), "checkpoint_step": step,
           "eval": OmegaConf.to_container(cfg.eval, resolve=True), "created": time.time(),
           "protocol": {"id": protocol, "changes": changes}, "file": evaluate_file(protocol),
           "eval_sec": time.perf_counter() - t0, "command": ["python", "-m", "harness.evaluate", *(argv or [])]}
    RunDir(run_dir).write_json(evaluate_file(protocol), out)
    return out


def evaluate_file(protocol: str) -> str:
    return "evaluate.json" if protocol == "run" else f"evaluate-{protocol}.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from harness.eval.metrics import METRIC_NAMES
    p = argparse.ArgumentParser(prog="python -m harness.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 0], help="sampler steps (0 = the method's N)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per score (default: the run's)")
    p.add_argument("--metric", choices=METRIC_NAMES, default=None, help="default: the run's eval.metric")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("overrides", nargs="*", help="eval.KEY=VALUE (e.g. eval.seed=1, eval.selection=true) or "
                   "method.KEY=VALUE (e.g. method.mid_t=[1.5])")
    # KEY=VALUE tokens are overrides wherever they stand (also right after --steps 1 2)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = p.parse_intermixed_args([a for a in argv if a not in overrides])
    args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    from harness.config import ConfigError
    from harness.data import DataError
    from harness.eval.metrics import MetricError
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        run_cfg = load_run_config(run_dir)
        cfg = apply_options(copy.deepcopy(run_cfg), args)
        out = evaluate(run_dir, cfg, args.device, argv, run_cfg)
    except (EvaluateError, ConfigError, MetricError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{run_dir / out['file']}: {len(out['scores'])} scores ({out['checkpoint']}; protocol {out['protocol']['id']})")
    for s in out["scores"]:
        print(f"  {s['ema']:>16s} {s['steps']:>3d} step(s) (NFE {s['nfe']}): {s['metric']} "
              f"{s['value']:.3f} (floor {s['floor']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
