"""Typed run configuration: Hydra structured configs, composed from command-line overrides.

Groups: `method` (the registry), `model` (harness.nets presets), `data` (harness.data presets),
`trainer`, `eval`, `launcher`. A method's constants come from its preset (`method.preset`, `auto`
picks the one named after the dataset, else `tiny`); keys set on the command line win over the preset.
Every bad input is a one-line `ConfigError` raised before any work starts.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming what was wrong and what is valid."""


@dataclass
class TrainerConfig:
    steps: int = 2000                  # optimizer steps of the run
    batch_size: int = 128              # global batch (split evenly over ranks)
    precision: str = "auto"            # auto (fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    zero_stage: int = 0                # DeepSpeed ZeRO stage, 0-2
    grad_clip: float = 0.0             # max global grad norm, 0 = off
    optimizer: str = "radam"           # adam | adamw | radam
    lr: float = 1e-4                   # peak learning rate (alpha_ref)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    lr_schedule: str = "constant"      # constant | inverse_sqrt (EDM2 eq. 16: lr / sqrt(max(step / ref, 1)))
    lr_ref_steps: int = 2000           # t_ref of inverse_sqrt [EDM2; ECT Table 7]
    lr_warmup_steps: int = 0           # linear ramp-up from 0
    # EMAs kept for sampling. Default: one EDM2 power-function EMA (sigma_rel 0.05), whose width is relative
    # to the run's length, so a 200-step run and a 200k-step run both get a useful average; the papers'
    # traditional EMAs (e.g. ECT Table 7's 0.9999) come with their recipes.
    ema_betas: list[float] = field(default_factory=list)                # traditional EMAs, beta
    ema_stds: list[float] = field(default_factory=lambda: [0.05])       # EDM2 power-function EMAs, sigma_rel
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2          # newest checkpoints kept (older ones deleted)
    log_every_steps: int = 50
    max_nonfinite_steps: int = 20      # consecutive non-finite losses before the run fails
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads, 0 = torch's default
    grid_every_steps: int = 0          # sample grid PNG during training, 0 = only at the end


@dataclass
class EvalConfig:
    at_end: bool = True                # score the final EMAs when training ends
    every_steps: int = 0               # also score during training, 0 = off
    num_samples: int = 1000            # generated samples per score
    steps: list[int] = field(default_factory=lambda: [1, 2])   # sampler steps scored (0 = the method's N)
    seed: int = 0                      # sampling seed
    batch_size: int = 500
    grid: bool = True                  # write samples_<ema>_<steps>step.png
    # auto: digits_fd on digits, fid on cifar10/imagenet64, energy on 2-D | pixel_fd | digits_fd | fid | energy | sliced_wasserstein
    metric: str = "auto"
    cache_dir: str = ""                # digits classifier, FID reference statistics ("" = <repo>/results/cache)
    inception_path: str = ""           # FID: clean-fid's inception-2015-12-05.pt (file or folder); "" = its cache, /tmp
    fid_mode: str = "clean"            # clean-fid mode: clean | legacy_tensorflow
    fid_reference: str = "auto"        # auto (registry, else train) | registry | train | heldout | custom:NAME | PATH.npz
    sw_projections: int = 256          # sliced Wasserstein: evenly spaced directions in [0, pi)
    # The sampler protocol (harness.eval.select): score every (EMA, steps) on a selection set of training
    # items too, and choose the 2-step mid-point there over one grid of EDM noise levels for every method.
    selection: bool = False            # also score on the selection set (the collector picks EMAs by it)
    selection_size: int = 0            # training items in the selection set (0 = as many as held out)
    selection_samples: int = 0         # samples per selection score (0 = eval.num_samples)
    mid_sigma_grid: list[float] = field(default_factory=list)   # [] = each method's fixed mid_t (papers')


@dataclass
class LauncherConfig:
    name: str = "local"                # local (this machine); slurm arrives with the sweep issue
    nproc: int = 1                     # processes (ranks) per run


@dataclass
class Config:
    defaults: list[Any] = field(default_factory=lambda: [
        {"method": "ect"}, {"model": "unet-s"}, {"data": "digits"}, "_self_"])
    method: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 0                      # data order, noise and init: reseeded every step from (seed, step, rank)
    run_dir: str = ""                  # "" = runs/<method>-<model>-<data>-<config hash>
    init_from: str = ""                # a finished run (e.g. an `edm` teacher) to start the weights from
    init_ema: str = ""                 # which of its EMAs to start from ("" = its first)
    teacher: str = ""                  # frozen teacher run for distillation methods
    recipe: str = ""                   # a paper setup from harness/config/recipes/ (its overrides come first)


GROUPS = ("method", "model", "data")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adam", "adamw", "radam")
LR_SCHEDULES = ("constant", "inverse_sqrt")
_registered: set[str] = set()   # method names already in the ConfigStore


def group_choices() -> dict[str, list[str]]:
    import methods
    from harness.data import DATASETS
    from harness.nets import MODEL_PRESETS
    return {"method": methods.names(), "model": sorted(MODEL_PRESETS), "data": sorted(DATASETS)}


def _register() -> None:
    """Put the schema and every group option into Hydra's ConfigStore (again for late registrations)."""
    from hydra.core.config_store import ConfigStore

    import methods
    from harness.data import DATASETS
    from harness.nets import MODEL_PRESETS
    cs = ConfigStore.instance()
    if not _registered:
        cs.store(name="cmbench", node=Config)
        for name, node in MODEL_PRESETS.items():
            cs.store(group="model", name=name, node=node)
        for name, node in DATASETS.items():
            cs.store(group="data", name=name, node=node)
    for name in methods.names():
        if name not in _registered:
            cs.store(group="method", name=name, node=methods.get(name).Config())
            _registered.add(name)


RECIPE_DIR = Path(__file__).resolve().parent / "recipes"


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def expand_recipe(overrides: list[str]) -> list[str]:
    """`recipe=NAME` puts the recipe's overrides first, so everything on the command line wins."""
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")]
    if not named:
        return list(overrides)
    if len(named) > 1:
        raise ConfigError(f"recipe is given {len(named)} times ({', '.join(named)}); give one")
    if named[0] not in recipes():
        raise ConfigError(f"unknown recipe '{named[-1]}'; valid: {', '.join(recipes())}")
    recipe = yaml.safe_load((RECIPE_DIR / f"{named[0]}.yaml").read_text())
    return [*recipe, *overrides]


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None


def _check_groups(parsed) -> None:
    """Group options (method=, model=, data=) exist; no +key / ~key."""
    choices = group_choices()
    for o in parsed:
        if o.is_add() or o.is_delete():
            raise ConfigError(f"adding or deleting keys is not supported ('{o.input_line}'); set existing keys")
        if o.key_or_group in choices:
            value = o.value()
            if not isinstance(value, str) or value not in choices[o.key_or_group]:
                raise ConfigError(f"unknown {o.key_or_group} '{value}'; valid: {', '.join(choices[o.key_or_group])}")


def _check_keys(base: DictConfig, parsed) -> None:
    """Every other key exists in the composed schema, else the valid keys at that level are named."""
    choices = GROUPS
    for o in parsed:
        key = o.key_or_group
        if key in choices:
            continue
        node: Any = base
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, DictConfig) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                valid = ", ".join(k for k in node.keys() if k != "defaults") if isinstance(node, DictConfig) else ""
                raise ConfigError(f"unknown config key '{key}'; valid keys in {where}: {valid}")
            node = node[part]


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Resolve overrides into the full run config (group choices, method preset, overrides)."""
    from hydra import compose as hydra_compose, initialize
    from hydra.core.global_hydra import GlobalHydra

    _register()
    overrides = expand_recipe(list(overrides))
    parsed = _parse(overrides)
    _check_groups(parsed)
    group_overrides = [o.input_line for o in parsed if o.key_or_group in GROUPS]
    GlobalHydra.instance().clear()
    with initialize(version_base=None):
        base = hydra_compose(config_name="cmbench", overrides=group_overrides)
        _check_keys(base, parsed)
        try:
            cfg = hydra_compose(config_name="cmbench", overrides=list(overrides))
        except Exception as exc:   # type errors from OmegaConf, reported on one line
            msg = " ".join(str(exc).split())
            raise ConfigError(f"invalid override: {msg}") from None
    _apply_method_preset(cfg, {o.key_or_group for o in parsed})
    validate(cfg)
    return cfg


def _apply_method_preset(cfg: DictConfig, explicit: set[str]) -> None:
    """Fill the method's fields from its preset, under the keys the user set explicitly."""
    import methods
    cls = methods.get(cfg.method.name)
    preset = cfg.method.preset
    if preset == "auto":
        preset = cls.preset_for(cfg.data.name)
    if preset not in cls.PRESETS:
        raise ConfigError(f"unknown {cfg.method.name} preset '{preset}'; valid: auto, {', '.join(cls.PRESETS)}")
    OmegaConf.set_struct(cfg, False)
    cfg.method.preset = preset
    for key, value in cls.PRESETS[preset].items():
        if f"method.{key}" not in explicit:
            cfg.method[key] = value
    OmegaConf.set_struct(cfg, True)


def validate(cfg: DictConfig) -> None:
    """Value checks that Hydra's types cannot express; all before any work starts."""
    import torch

    import methods
    from harness.nets.attention import check_backend
    from harness.data import check_data_config

    t = cfg.trainer
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"trainer.zero_stage={t.zero_stage} is not supported; valid: 0, 1, 2")
    if t.steps < 1 or t.batch_size < 1:
        raise ConfigError(f"trainer.steps and trainer.batch_size must be >= 1 (got {t.steps}, {t.batch_size})")
    if len(t.betas) != 2:
        raise ConfigError(f"trainer.betas needs two values, got {list(t.betas)}")
    if any(not 0.0 < b < 1.0 for b in t.ema_betas) or any(s <= 0 for s in t.ema_stds):
        raise ConfigError("trainer.ema_betas must lie in (0, 1) and trainer.ema_stds must be > 0")
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    cuda = torch.cuda.is_available()
    if t.device == "cuda" and not cuda:
        raise ConfigError("trainer.device=cuda but CUDA is not available here; valid: auto, cpu")
    on_cuda = cuda and t.device != "cpu"
    if t.precision == "fp16" and not on_cuda:
        raise ConfigError("trainer.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); "
                          "valid here: fp32, bf16")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "lr_ref_steps",
                "max_nonfinite_steps"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {t[key]}")
    if min(t.lr_warmup_steps, t.grid_every_steps, cfg.eval.every_steps) < 0:
        raise ConfigError("trainer.lr_warmup_steps, trainer.grid_every_steps and eval.every_steps must be >= 0")
    from harness.train.ema import ema_name
    names = [ema_name(beta=b) for b in t.ema_betas] + [ema_name(std=s) for s in t.ema_stds]
    if len(set(names)) != len(names):
        raise ConfigError(f"two EMAs share a name: {names}; make trainer.ema_betas / ema_stds distinct")
    if any(s < 0 for s in cfg.eval.steps):
        raise ConfigError(f"eval.steps must be >= 0, got {list(cfg.eval.steps)}")
    if cfg.eval.num_samples < 2 or cfg.eval.batch_size < 1:
        raise ConfigError(f"eval.num_samples must be >= 2 and eval.batch_size >= 1 "
                          f"(got {cfg.eval.num_samples}, {cfg.eval.batch_size})")
    from harness.eval.metrics import MetricError, check_eval_config
    try:
        check_eval_config(cfg.eval, cfg.data.name)
    except MetricError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.launcher.nproc < 1 or t.batch_size % cfg.launcher.nproc:
        raise ConfigError(f"launcher.nproc={cfg.launcher.nproc} must be >= 1 and divide "
                          f"trainer.batch_size={t.batch_size}")
    try:
        check_backend(cfg.model.attention)
        check_data_config(cfg.data)
        method_cls, method_cfg = methods.get(cfg.method.name), OmegaConf.to_object(cfg.method)
        method_cls.check_config(method_cfg)
        method_cls.check_model(method_cfg, cfg.model)
        method_cls.check_data(method_cfg, cfg.data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if methods.get(cfg.method.name).needs_teacher and not cfg.teacher:
        raise ConfigError(f"method {cfg.method.name} distills a teacher: set teacher=RUN_DIR (a finished run)")


def _one_of(key: str, value: str, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}='{value}' is not valid; valid: {', '.join(valid)}")


def config_hash(cfg: DictConfig) -> str:
    """Stable id of everything that defines a run (the run directory and launcher excluded)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("run_dir", None)
    data["launcher"] = {"nproc": data["launcher"]["nproc"]}   # results depend on the world size only
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def default_run_dir(cfg: DictConfig) -> str:
    return f"runs/{cfg.method.name}-{cfg.model.name}-{cfg.data.name}-{config_hash(cfg)}"
