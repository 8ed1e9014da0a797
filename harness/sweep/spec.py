"""Sweep specs (YAML under sweeps/): parse, check, and expand into runs with stable ids.

    name: scaling                       # the sweep's directory is <out>/<name>/
    out: results/sweeps
    base: [data=digits, trainer.batch_size=128]          # overrides of every run
    grid:                                                # every combination is one grid point
      model: [unet-xs, unet-s]
      budget_nimg: [64000, 128000]      # training images -> trainer.steps = round(nimg / batch_size)
      seed: [0]
      # a grid value may be a bundle of overrides, labelled by its `...name` entry; its key is only a label:
      # size: [{model: unet-xs, model.channels: 8, model.name: unet-c8}, {model: unet-xs}]
    stages:                             # run in dependency order; each runs at every point of its grid
      - name: edm
        grid: {budget_nimg: null}       # per-stage grid: null drops a key, a list replaces its values
        overrides: [method=edm, trainer.steps=1200]
      - name: cd
        grid: {method: [cd]}            # a key only this stage varies
        init_from: edm                  # init_from=/teacher= the run of that stage at the same grid point
        teacher: edm
    launcher: {name: auto, local: {workers: 2}, slurm: {partition: gpu, time: 240}}

A student's source run is the one run of the source stage whose grid values agree with the student's
on every key both stages vary (a teacher that varies over `model` only serves every budget and method).
`budget_flops` instead of `budget_nimg`: trainer.steps = round(budget_flops / (3 * F * batch_size)),
with F the network's forward FLOPs per sample counted by torch.utils.flop_counter on the meta device
(forward + backward ~ 3 forwards; a method's extra passes for targets, JVPs or a teacher are not in
the budget, but are in each run's counted `flops_train`).
Run id: a hash of the stage name and the run's resolved overrides (source runs by their ids), so the
same spec always gives the same ids and directories: `<out>/<name>/<stage>-<grid values>-<id>/`.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import ConfigError
from harness.sweep.compose import TRAIN_FLOPS_PER_FORWARD, compose_cached, flops_of as _flops

SPEC_KEYS = ("name", "description", "out", "base", "grid", "stages", "launcher")
STAGE_KEYS = ("name", "overrides", "grid", "init_from", "teacher", "after")
LAUNCHERS = ("auto", "local", "slurm")
LAUNCHER_OPTIONS = {
    "local": ("workers",),
    "slurm": ("partition", "account", "qos", "time", "gpus_per_node", "nodes", "cpus_per_task", "mem",
              "max_requeue", "runs_per_task"),
}
BUDGET_KEYS = ("budget_nimg", "budget_flops")
SOURCE_KEYS = ("init_from", "teacher")


class SpecError(ConfigError):
    """A bad sweep spec: one line naming what was wrong and what is valid."""


@dataclass(frozen=True)
class Stage:
    name: str
    overrides: tuple[str, ...]
    grid: dict[str, list]                  # this stage's effective grid (global grid, stage edits applied)
    sources: dict[str, str]                # init_from / teacher -> source stage name
    after: tuple[str, ...]                 # every stage this one waits for (sources included)


@dataclass
class Sweep:
    name: str
    out_dir: Path                          # <out>/<name>
    stages: list[Stage]                    # in dependency order
    launcher: dict[str, Any]               # name + per-launcher options
    description: str = ""
    spec: dict = field(default_factory=dict)   # the raw spec after command-line edits (for the manifest)


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    stage: str
    point: dict                            # grid values, budgets included
    overrides: tuple[str, ...]             # compose(overrides) is the run's config
    run_dir: str
    depends_on: tuple[str, ...]            # run ids of its init_from / teacher runs
    method: str
    model: str
    steps: int
    batch_size: int
    num_params: int
    flops_est: float                       # TRAIN_FLOPS_PER_FORWARD * forward FLOPs * images

    @property
    def nimg(self) -> int:
        return self.steps * self.batch_size


def format_value(value: Any) -> str:
    """A grid value as a Hydra override value (a bundle: its label)."""
    if isinstance(value, dict):
        named = [v for k, v in value.items() if str(k).split(".")[-1] == "name"]
        return format_value(named[0]) if named else "_".join(format_value(v) for v in value.values())
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def _point_text(point: dict) -> str:
    return " ".join(f"{k}={format_value(v)}" for k, v in point.items()) or "the single grid point"


def _check_keys(where: str, got: dict, valid: tuple[str, ...]) -> None:
    unknown = sorted(set(got) - set(valid))
    if unknown:
        raise SpecError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {where}; "
                        f"valid: {', '.join(valid)}")


def _check_grid(where: str, grid: Any, allow_null: bool) -> dict:
    if grid is None:
        return {}
    if not isinstance(grid, dict):
        raise SpecError(f"{where} must be a mapping of config key -> list of values, got {grid!r}")
    for key, values in grid.items():
        if values is None and allow_null:
            continue
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where} key '{key}' needs a non-empty list of values, got {values!r}")
        bundles = [v for v in values if isinstance(v, dict)]
        if bundles and (len(bundles) != len(values) or key in BUDGET_KEYS or not all(bundles)):
            raise SpecError(f"{where} key '{key}': a bundle grid needs every value to be a non-empty mapping of "
                            f"config key -> value (and no budget key), got {values!r}")
        if key in BUDGET_KEYS:
            grid[key] = values = [_number(v) for v in values]
            if any(v is None or v <= 0 for v in values):
                raise SpecError(f"{where} key '{key}' needs positive numbers, got {grid[key]!r}")
    if all(k in grid and grid[k] is not None for k in BUDGET_KEYS):
        raise SpecError(f"{where} gives both budget_nimg and budget_flops; give one")
    return grid


def _number(value: Any) -> float | int | None:
    """A budget as a number (YAML reads 1.0e12 without a sign as a string); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def apply_cli(spec: dict, edits: list[str]) -> tuple[dict, list[str]]:
    """Split command-line overrides (Hydra's override grammar) into spec edits (launcher=,
    launcher.local.workers=, name=, grid.KEY=[...] or grid.KEY=a,b) and run overrides (everything
    else, applied to every run after the spec's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    spec, extra = copy.deepcopy(spec), []
    try:
        parsed = OverridesParser.create().parse_overrides(list(edits))
    except OverrideParseException as exc:
        raise SpecError(f"cannot parse override: {str(exc).splitlines()[0]}") from None
    for o in parsed:
        key, item = o.key_or_group, o.input_line
        if o.is_sweep_override():
            value = list(o.sweep_iterator())
            if not key.startswith("grid."):
                raise SpecError(f"override '{item}': a list of values is a grid: write grid.{key}=...")
        else:
            value = o.value()
            value = "" if value is None else value
        if key in ("launcher", "launcher.name"):
            spec.setdefault("launcher", {})["name"] = value
        elif key.split(".")[0] == "launcher" and key.split(".")[1:2] and key.split(".")[1] in LAUNCHER_OPTIONS:
            _, section, *rest = key.split(".")
            if len(rest) != 1:
                raise SpecError(f"override '{item}': use launcher.{section}.OPTION=VALUE")
            spec.setdefault("launcher", {}).setdefault(section, {})[rest[0]] = value
        elif key == "name":
            spec[key] = str(value)
        elif key in ("out", "run_dir"):   # one spelling for every command's output: --out DIR
            raise SpecError(f"override '{item}': the sweep's directory is given as --out DIR; each run's is "
                            f"<out>/<name>/<stage>/<run id>")
        elif key.startswith("grid."):
            spec.setdefault("grid", {})[key[5:]] = value if isinstance(value, list) else [value]
        else:
            extra.append(item)
    return spec, extra


def _launcher_options(section: str) -> tuple[str, ...]:
    """Valid options of a launcher: the SLURM launcher's own option fields where it imports, else the
    documented set."""
    if section == "slurm":
        try:
            from dataclasses import fields

            from launchers.slurm import SlurmOptions
            return tuple(f.name for f in fields(SlurmOptions) if f.name != "folder")
        except ImportError:
            pass
    return LAUNCHER_OPTIONS[section]


def _launcher(raw: Any) -> dict:
    raw = dict(raw or {})
    _check_keys("launcher", raw, ("name", *LAUNCHER_OPTIONS))
    name = raw.get("name", "auto")
    if name not in LAUNCHERS:
        raise SpecError(f"launcher.name '{name}' is not valid; valid: {', '.join(LAUNCHERS)}")
    out = {"name": name}
    for section in LAUNCHER_OPTIONS:
        valid = _launcher_options(section) if raw.get(section) else LAUNCHER_OPTIONS[section]
        options = raw.get(section) or {}
        if not isinstance(options, dict):
            raise SpecError(f"launcher.{section} must be a mapping of options; valid: {', '.join(valid)}")
        _check_keys(f"launcher.{section}", options, valid)
        out[section] = dict(options)
    workers = out["local"].get("workers", 2)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SpecError(f"launcher.local.workers must be an integer >= 1, got {workers!r}")
    return out


def _stage(raw: Any, index: int, grid: dict, names: set[str]) -> Stage:
    if not isinstance(raw, dict) or not raw.get("name"):
        raise SpecError(f"stage {index + 1} needs a mapping with a name, got {raw!r}")
    name = str(raw["name"])
    _check_name(f"stage {index + 1} name", name)
    _check_keys(f"stage '{name}'", raw, STAGE_KEYS)
    edits = _check_grid(f"stage '{name}' grid", raw.get("grid"), allow_null=True)
    merged = {k: v for k, v in {**grid, **edits}.items() if v is not None}
    if edits.get("budget_nimg") is not None:
        merged.pop("budget_flops", None)
    if edits.get("budget_flops") is not None:
        merged.pop("budget_nimg", None)
    sources = {k: str(raw[k]) for k in SOURCE_KEYS if raw.get(k)}
    after = [str(a) for a in (raw.get("after") or [])]
    for src in [*sources.values(), *after]:
        if src not in names:
            raise SpecError(f"stage '{name}' needs stage '{src}', which no stage provides; stages: "
                            f"{', '.join(sorted(names))}")
        if src == name:
            raise SpecError(f"stage '{name}' depends on itself")
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SpecError(f"stage '{name}' overrides must be a list of key=value strings")
    return Stage(name, tuple(overrides), merged, sources, tuple(dict.fromkeys([*sources.values(), *after])))


def _ordered(stages: list[Stage]) -> list[Stage]:
    """Stages in dependency order (spec order where free); a cycle is an error naming it."""
    by_name, done, order = {s.name: s for s in stages}, set(), []

    def visit(stage: Stage, path: list[str]) -> None:
        if stage.name in done:
            return
        if stage.name in path:
            cycle = path[path.index(stage.name):] + [stage.name]
            raise SpecError(f"stage dependency cycle: {' -> '.join(cycle)}")
        for dep in stage.after:
            visit(by_name[dep], [*path, stage.name])
        done.add(stage.name)
        order.append(stage)

    for stage in stages:
        visit(stage, [])
    return order


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _check_name(what: str, name: Any) -> None:
    """Sweep and stage names become folder names under out=: one plain path component."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise SpecError(f"{what} {name!r} is not a plain folder name; use letters, digits, '_', '-', '.' "
                        f"(starting with a letter or digit, no '..')")


def parse_spec(spec: Any, where: str = "sweep spec") -> Sweep:
    if not isinstance(spec, dict):
        raise SpecError(f"{where} is not a mapping")
    _check_keys(where, spec, SPEC_KEYS)
    if not spec.get("name"):
        raise SpecError(f"{where} needs a name")
    _check_name(f"{where}: name", spec["name"])
    if not isinstance(spec.get("base") or [], list):
        raise SpecError(f"{where}: base must be a list of key=value overrides")
    grid = _check_grid("grid", spec.get("grid"), allow_null=False)
    raw_stages = spec.get("stages") or []
    if not isinstance(raw_stages, list) or not raw_stages:
        raise SpecError(f"{where} has no stages; give a list of stages (each with a name and overrides)")
    names = [s.get("name") if isinstance(s, dict) else None for s in raw_stages]
    dup = sorted({n for n in names if n and names.count(n) > 1})
    if dup:
        raise SpecError(f"stage name{'s' if len(dup) > 1 else ''} {', '.join(dup)} given twice")
    stages = [_stage(s, i, grid, {n for n in names if n}) for i, s in enumerate(raw_stages)]
    out_dir = Path(str(spec.get("out", "results/sweeps"))) / str(spec["name"])
    return Sweep(str(spec["name"]), out_dir, _ordered(stages), _launcher(spec.get("launcher")),
                 str(spec.get("description", "")), spec)


def load_spec(path: str, edits: list[str] = (), out: str | None = None) -> tuple[Sweep, list[str]]:
    """Read a spec file, apply command-line edits (and `--out`, the spec's `out`); returns the sweep and
    the per-run overrides."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise SpecError(f"cannot read sweep spec {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"sweep spec {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"sweep spec {path} is not a mapping")
    raw, extra = apply_cli(raw, list(edits))
    if out is not None:
        raw["out"] = out
    return parse_spec(raw, f"sweep spec {path}"), extra


def _slug(point: dict) -> str:
    parts = []
    for key, value in point.items():
        text = format_value(value)
        if key == "budget_nimg":
            text = f"{value / 1000:g}kimg"
        elif key == "budget_flops":
            text = f"{value:.3g}flops"
        elif key == "seed":
            text = f"seed{value}"
        parts.append(text)
    return re.sub(r"[^A-Za-z0-9_.+]+", "_", "-".join(parts)).strip("_") or "base"


def _source_run(stage: Stage, src: Stage, point: dict, planned: dict[str, list[PlannedRun]]) -> PlannedRun:
    shared = [k for k in src.grid if k in stage.grid]
    hits = [r for r in planned[src.name] if all(r.point.get(k) == point.get(k) for k in shared)]
    if len(hits) != 1:
        free = sorted(set(src.grid) - set(stage.grid))
        raise SpecError(f"stage '{stage.name}' at {_point_text(point)}: {len(hits)} runs of stage '{src.name}' match "
                        f"(they must agree on {shared or 'no key'}; '{src.name}' also varies {free or 'nothing'})")
    return hits[0]


def _budget_steps(point: dict, cfg) -> int:
    batch = int(cfg.trainer.batch_size)
    if "budget_nimg" in point:
        return max(1, round(point["budget_nimg"] / batch))
    if "budget_flops" in point:
        fwd, _ = _flops(cfg)
        return max(1, round(point["budget_flops"] / (TRAIN_FLOPS_PER_FORWARD * fwd * batch)))
    return int(cfg.trainer.steps)


def _plan_run(sweep: Sweep, stage: Stage, point: dict, base: list, extra: list,
              planned: dict[str, list[PlannedRun]], cache: dict) -> PlannedRun:
    sources = {key: _source_run(stage, next(s for s in sweep.stages if s.name == src), point, planned)
               for key, src in stage.sources.items()}
    grid_overrides = [o for k, v in point.items() if k not in BUDGET_KEYS
                      for o in ([f"{kk}={format_value(vv)}" for kk, vv in v.items()] if isinstance(v, dict) else [f"{k}={format_value(v)}"])]
    overrides = [*base, *grid_overrides, *stage.overrides, *extra,
                 *(f"{key}={run.run_dir}" for key, run in sources.items())]
    try:
        cfg = compose_cached(overrides, cache)
    except ConfigError as exc:
        raise SpecError(f"stage '{stage.name}' at {_point_text(point)}: {exc}") from None
    steps = _budget_steps(point, cfg)
    if any(k in point for k in BUDGET_KEYS):
        overrides.append(f"trainer.steps={steps}")
    fwd, params = _flops(cfg)
    identity = {"stage": stage.name, "sources": {k: r.run_id for k, r in sources.items()},
                "overrides": [o for o in overrides if o.split("=", 1)[0] not in SOURCE_KEYS]}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    run_dir = str(sweep.out_dir / f"{stage.name}-{_slug(point)}-{run_id}")
    batch = int(cfg.trainer.batch_size)
    return PlannedRun(run_id, stage.name, point, (*overrides, f"run_dir={run_dir}"), run_dir,
                      tuple(r.run_id for r in sources.values()), str(cfg.method.name), str(cfg.model.name),
                      steps, batch, params, TRAIN_FLOPS_PER_FORWARD * fwd * steps * batch)


def expand(sweep: Sweep, extra: list[str] = ()) -> list[PlannedRun]:
    """Every run of the sweep, stage by stage in dependency order; every config composed and checked."""
    base = list(sweep.spec.get("base") or [])
    planned: dict[str, list[PlannedRun]] = {}
    cache: dict = {}
    for stage in sweep.stages:
        keys = list(stage.grid)
        planned[stage.name] = [
            _plan_run(sweep, stage, dict(zip(keys, values)), base, list(extra), planned, cache)
            for values in itertools.product(*(stage.grid[k] for k in keys))]
    runs = [r for stage in sweep.stages for r in planned[stage.name]]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(r for r in runs if ids.count(r.run_id) > 1)
        raise SpecError(f"two runs of stage '{dup.stage}' have the same config ({_point_text(dup.point)}); "
                        f"a grid key the stage's overrides set has no effect")
    return runs
