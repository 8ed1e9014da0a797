"""`python -m harness.sweep SPEC.yaml [key=value ...] [--dry-run]`

A sweep spec (YAML) names overrides for every run (`base`), a grid over config keys (`grid`: every
combination is one grid point), and stages run in order at each grid point; a stage with `init_from:
<stage>` starts from that stage's run at the same grid point (a diffusion teacher before ECT):

    name: scaling
    base: [data=digits]
    grid: {model: [unet-xs, unet-s]}
    stages:
      - {name: teacher, overrides: [method=edm, trainer.steps=3000]}
      - {name: ect, init_from: teacher, overrides: [method=ect, trainer.steps=1000]}

Runs go to `<out>/<name>/<stage>-<grid values>/` (stable names: re-running the same command skips
completed runs and resumes interrupted ones). This driver runs locally, one run at a time; the
sweep issue extends it (launchers, budgets, collection).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.config import ConfigError, compose


@dataclass(frozen=True)
class PlannedRun:
    stage: str
    point: dict
    overrides: tuple[str, ...]
    run_dir: str


def _point_name(point: dict) -> str:
    return "-".join(f"{v}" for v in point.values()) or "base"


def load_spec(path: str) -> dict:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read sweep spec {path}: {exc.strerror}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep spec {path} is not a mapping")
    unknown = set(spec) - {"name", "base", "grid", "stages", "out"}
    if unknown:
        raise ConfigError(f"unknown sweep spec keys {sorted(unknown)}; valid: name, base, grid, stages, out")
    if not spec.get("stages"):
        raise ConfigError(f"sweep spec {path} has no stages")
    for key, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid key '{key}' needs a non-empty list of values")
    return spec


def plan(spec: dict, extra: list[str]) -> list[PlannedRun]:
    """Expand grid x stages into runs, in an order where every init_from stage runs first."""
    grid = spec.get("grid") or {}
    keys = list(grid)
    names = [s["name"] for s in spec["stages"]]
    out_root = Path(spec.get("out", "results/sweeps")) / spec.get("name", "sweep")
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values))
        dirs: dict[str, str] = {}
        for stage in spec["stages"]:
            src = stage.get("init_from")
            if src and src not in dirs:
                raise ConfigError(f"stage '{stage['name']}' starts from '{src}', which is not an earlier "
                                  f"stage; stages: {', '.join(names)}")
            run_dir = str(out_root / f"{stage['name']}-{_point_name(point)}")
            overrides = [*spec.get("base", []), *(f"{k}={v}" for k, v in point.items()),
                         *stage.get("overrides", []), *extra, f"run_dir={run_dir}"]
            if src:
                overrides.append(f"init_from={dirs[src]}")
            dirs[stage["name"]] = run_dir
            runs.append(PlannedRun(stage["name"], point, tuple(overrides), run_dir))
    return runs


def _status(run: PlannedRun) -> str:
    try:
        return json.loads((Path(run.run_dir) / "result.json").read_text()).get("status", "unknown")
    except (OSError, json.JSONDecodeError):
        return "queued"


def _summary(runs: list[PlannedRun]) -> str:
    lines = ["| stage | grid point | status | EMA | 1-step | 2-step | train s |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        res = {}
        try:
            res = json.loads((Path(run.run_dir) / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        by_ema: dict[str, dict[int, float]] = {}
        for s in res.get("scores", []):
            by_ema.setdefault(s["ema"], {})[s["steps"]] = s["value"]
        for ema, vals in (by_ema or {"-": {}}).items():
            cells = [f"{vals[k]:.3f}" if k in vals else "-" for k in (1, 2)]
            lines.append(f"| {run.stage} | {_point_name(run.point)} | {res.get('status', 'queued')} | {ema} | "
                         f"{' | '.join(cells)} | {res.get('train_sec', 0):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        runs = plan(spec, args.overrides)
        configs = [compose(list(r.overrides)) for r in runs]      # every config checked before any work
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"{_status(run):>10s}  {run.run_dir}")
    if args.dry_run:
        return 0
    from launchers.local import run_all

    tic = time.time()

    def report(i: int, result: dict) -> None:
        run = runs[i]
        print(f"[{i + 1}/{len(runs)}] {run.stage} {_point_name(run.point)}: {result['status']} "
              f"({time.time() - tic:.0f} s)", flush=True)

    run_all(configs, report)
    table = _summary(runs)
    out = Path(runs[0].run_dir).parent
    (out / "summary.md").write_text(f"# {spec.get('name', 'sweep')}\n\n{table}\n\nwall time {time.time() - tic:.0f} s\n")
    print(table)
    print(f"summary: {out / 'summary.md'} ({time.time() - tic:.0f} s)")
    return 0 if all(_status(r) == "completed" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
