"""Typed run configuration: Hydra structured configs in a ConfigStore, plus the `recipe` group of paper setups
(harness/config/recipe/*.yaml, Hydra experiment configs), composed by Hydra for `python -m harness.train` and
by `compose()` (Hydra's compose API over the same store) for sweeps and tests.

Groups: `method` (the registry), `model` (harness.nets presets), `data` (harness.data presets), `preset` (a
method's constants; `auto` picks the one named after the dataset, else `tiny`), `recipe`. Composition order:
schema, method, model, data, the method's preset, a recipe, then the command line, so a key set on the command
line always wins. Every bad input is a one-line `ConfigError` raised before any work starts.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict


log = logging.getLogger(__name__)


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
    # Divergence guard: the run fails when |loss| stays above divergence_factor x the median |loss| of the
    # last 200 steps for divergence_steps steps in a row (a loss that blows up to 2e8 yet stays finite).
    divergence_factor: float = 1000.0  # 0 = off
    divergence_steps: int = 20
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch CPU threads, 0 = torch's default
    grid_every_steps: int = 0          # sample grid PNG during training, 0 = only at the end
    # DeepSpeed options merged over the config the harness builds (harness.train.engine.deepspeed_config):
    # a JSON file, then keys, e.g. trainer.deepspeed={zero_optimization:{overlap_comm:true}}. The batch
    # sizes, precision switches, optimizer and scheduler stay the harness's (set them with trainer.*).
    deepspeed_config: str = ""         # path of a DeepSpeed JSON config ("" = none)
    deepspeed: Any = None             # {key: value, ...} (None = none)


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
class LogConfig:
    """What a run shows while it trains (harness.train.watch); none of it changes what is trained."""
    console: str = "auto"              # auto (a progress bar on a terminal, else lines) | lines | quiet
    tensorboard: bool = True           # event files in <run>/tensorboard/
    wandb: str = ""                    # "" (off) | offline | online: Weights & Biases, under <run>/wandb/


@dataclass
class LauncherConfig:
    name: str = "local"                # local (this machine); slurm arrives with the sweep issue
    nproc: int = 1                     # processes (ranks) per run


@dataclass
class Config:
    method: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0                      # data order, noise and init: reseeded every step from (seed, step, rank)
    run_dir: str = ""                  # "" = runs/<method>-<model>-<data>-<config hash>
    init_from: str = ""                # a finished run (e.g. an `edm` teacher) to start the weights from
    init_ema: str = ""                 # which of its EMAs to start from ("" = its first)
    teacher: str = ""                  # frozen teacher run for distillation methods
    recipe: str = ""                   # the paper setup from harness/config/recipe/ it was composed with


# Hydra config groups a user chooses from (group=option). `preset` picks a method's constants: `auto` follows
# the dataset. Hydra composes the choice through a hidden group of (method, preset, data) nodes, interpolated
# in the defaults list, so a preset is merged by Hydra after the method and before anything the user sets.
GROUPS = ("method", "model", "data", "preset", "recipe")
PRESET_NODES = "method_preset"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_EVAL_STEPS = 1000   # sampler steps: consistency samplers take 1-4, EDM's Heun teachers 18-79 [EDM Tab. 2]
OPTIMIZERS = ("adam", "adamw", "radam")
LR_SCHEDULES = ("constant", "inverse_sqrt")
CONFIG_MODULE = "harness.config"     # its recipe/ folder is the `recipe` group (Hydra experiment configs)
RECIPE_DIR = Path(__file__).resolve().parent / "recipe"
_UNKNOWN = "unknown:"                # a method_preset node for a preset the method does not have
_registered: set = set()             # what is already in the ConfigStore (methods, presets, ...)


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def presets() -> list[str]:
    import methods
    return ["auto", *sorted({p for n in methods.names() for p in methods.get(n).PRESETS} - {"auto"})]


def group_choices() -> dict[str, list[str]]:
    import methods
    from harness.data import DATASETS
    from harness.nets import MODEL_PRESETS
    return {"method": methods.names(), "model": sorted(MODEL_PRESETS), "data": sorted(DATASETS),
            "preset": presets(), "recipe": recipes()}


def _preset_node(cls, preset: str, dataset: str) -> dict:
    resolved = cls.preset_for(dataset) if preset == "auto" else preset
    if resolved not in cls.PRESETS:
        return {"preset": _UNKNOWN + preset}
    return {**cls.PRESETS[resolved], "preset": resolved}


HYDRA_SETTINGS = {
    # No change of directory and nothing written by Hydra: a run writes only its run directory, which
    # hydra.run.dir / hydra.sweep.dir(/subdir) name when given (harness.train.cli.run_dir_of).
    "job": {"chdir": False},
    "output_subdir": None,
    "run": {"dir": "."},
    "sweep": {"dir": "runs", "subdir": "."},   # -m writes runs/multirun.yaml (the grid last launched)
}


def register() -> None:
    """Put the schema, every group option and the primary config into Hydra's ConfigStore (again for
    methods registered later)."""
    from hydra.core.config_store import ConfigStore

    import methods
    from harness.data import DATASETS
    from harness.nets import MODEL_PRESETS
    cs = ConfigStore.instance()
    names = methods.names()
    if ("store", "schema") not in _registered:
        _registered.add(("store", "schema"))
        cs.store(name="cmbench_schema", node=Config)
        for name, node in MODEL_PRESETS.items():
            cs.store(group="model", name=name, node=node)
        for name, node in DATASETS.items():
            cs.store(group="data", name=name, node=node)
    choices = presets()
    for name in choices:
        if ("preset", name) not in _registered:
            cs.store(group="preset", name=name, node={}, package="_global_")
            _registered.add(("preset", name))
    for name in names:
        cls = methods.get(name)
        if name not in _registered:
            cs.store(group="method", name=name, node=cls.Config())
            _registered.add(name)
        for preset in choices:
            if (name, preset) not in _registered:
                for dataset in DATASETS:
                    cs.store(group=PRESET_NODES, name=f"{name}-{preset}-{dataset}", package="method",
                             node=_preset_node(cls, preset, dataset))
                _registered.add((name, preset))
    if ("store", "primary") in _registered:
        return
    _registered.add(("store", "primary"))
    cs.store(name="cmbench", node={
        "defaults": ["cmbench_schema", {"method": "ect"}, {"model": "unet-s"}, {"data": "digits"},
                     {"preset": "auto"}, {PRESET_NODES: "${method}-${preset}-${data}"}, "_self_",
                     {"recipe": None},
                     {"override hydra/job_logging": "none"}, {"override hydra/hydra_logging": "none"}],
        "hydra": {**HYDRA_SETTINGS, "help": {"app_name": "harness.train", "template": help_text()}}})


def help_text() -> str:
    """`python -m harness.train --help`: the groups with their choices, then the composed config."""
    lines = ["harness.train: train one run (or, with -m, a grid of runs) into its run directory.",
             "Running the same command again resumes it, or reports its result when it completed.",
             "", "Usage: python -m harness.train [group=option ...] [key=value ...] [--out DIR] [-m]",
             "       [--cfg job | --info | --help | --version]",
             "", "== Config groups (group=option) =="]
    for group, options in group_choices().items():
        lines.append(f"{group}: {', '.join(options)}")
    lines += ["", "preset=auto follows the dataset; recipe=NAME is a paper setup (harness/config/recipe/).",
              "Output: --out DIR, the run directory (-m: one sub-folder per job, named by hydra.sweep.subdir,",
              "default the job's number); Hydra's hydra.run.dir= / hydra.sweep.dir= also work; none given:",
              "runs/<method>-<model>-<data>-<hash>.",
              "", "== Config (key=value; shown with the overrides given) ==", "$CONFIG",
              "Hydra's own options: --hydra-help"]
    return "\n".join(lines)


def parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse override: {str(exc).splitlines()[0]}") from None


def is_hydra_override(o) -> bool:
    return o.key_or_group == "hydra" or o.key_or_group.startswith(("hydra.", "hydra/"))


def _check_groups(parsed) -> None:
    """Group options (method=, model=, data=, preset=, recipe=) exist; `method.preset` is a group."""
    choices = group_choices()
    for o in parsed:
        if o.key_or_group not in choices and (o.is_add() or o.is_force_add() or o.is_delete()):
            raise ConfigError(f"'{o.input_line}': every key already exists (the schema is closed) and none can be "
                              f"deleted; set it with {o.key_or_group}=VALUE")
        if o.key_or_group in choices and (o.is_add() or o.is_force_add()):
            raise ConfigError(f"'{o.input_line}': {o.key_or_group} is already a group of the config; "
                              f"write {o.key_or_group}={o.value()}")
        if o.key_or_group == "method.preset" and not o.is_delete():
            raise ConfigError(f"a method's preset is a config group: write preset={o.value()} "
                              f"(valid: {', '.join(choices['preset'])})")
        if o.key_or_group in choices and not o.is_delete():
            value = o.value()
            if not isinstance(value, str) or value not in choices[o.key_or_group]:
                raise ConfigError(f"unknown {o.key_or_group} '{value}'; valid: {', '.join(choices[o.key_or_group])}")


def check_keys(base: DictConfig, parsed) -> None:
    """Every other key exists in the composed schema, else the valid keys at that level are named."""
    for o in parsed:
        key = o.key_or_group
        if key in GROUPS:
            continue
        node: Any = base
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, DictConfig) or part not in node:
                where = ".".join(parts[:i]) or "the top level"
                valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else ""
                raise ConfigError(f"unknown config key '{key}'; valid keys in {where}: {valid}")
            node = node[part]


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Resolve overrides into the full run config, as `python -m harness.train` does (Hydra's compose API
    over the same ConfigStore and recipe group); Hydra's own overrides (hydra.*, hydra/...) are ignored."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register()
    parsed = [o for o in parse_overrides(list(overrides)) if not is_hydra_override(o)]
    _check_groups(parsed)
    overrides = [o.input_line for o in parsed]
    group_overrides = [o.input_line for o in parsed if o.key_or_group in GROUPS]
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        try:
            cfg = hydra_compose(config_name="cmbench", overrides=overrides, return_hydra_config=True)
        except Exception as exc:
            # name the unknown key and the valid ones (composing the groups alone), else Hydra's reason
            check_keys(hydra_compose(config_name="cmbench", overrides=group_overrides), parsed)
            reason = f": {str(exc.__cause__).splitlines()[0]}" if exc.__cause__ else ""
            raise ConfigError(f"invalid override: {' '.join(str(exc).split())}{reason}") from None
    GlobalHydra.instance().clear()
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        del cfg["hydra"]
    return finish(cfg, choices.get("recipe"))


def finish(cfg: DictConfig, recipe: str | None) -> DictConfig:
    """What composition leaves to do: record the recipe's name, apply the method's needs on the network,
    then check the values."""
    if recipe:
        with open_dict(cfg):
            cfg.recipe = recipe
    apply_network_requirements(cfg)
    validate(cfg)
    return cfg


def apply_network_requirements(cfg: DictConfig) -> None:
    """Set the model keys the method config needs (methods.base.Method.network_requirements: sCT/sCD's
    log-variance head, GCM-VU's second time input, a JVP-capable attention backend), logging each change;
    the resolved config (config.yaml) shows them."""
    import torch

    import methods
    device = "cuda" if cfg.trainer.device != "cpu" and torch.cuda.is_available() else "cpu"
    try:
        cls = methods.get(cfg.method.name)
        needs = cls.network_requirements(OmegaConf.to_object(cfg.method), cfg.model, device)
    except (ValueError, TypeError):
        return                       # validate() reports the method's own errors
    for key, (value, why) in needs.items():
        if key in cfg.model and cfg.model[key] != value:
            log.info("method=%s sets model.%s=%s (was %s): %s", cfg.method.name, key, value, cfg.model[key], why)
            cfg.model[key] = value


def validate(cfg: DictConfig) -> None:
    """Value checks that Hydra's types cannot express; all before any work starts."""
    import torch

    import methods
    from harness.nets import check_model_config
    from harness.nets.attention import check_backend
    from harness.data import check_data_config, data_shape

    if str(cfg.method.preset).startswith(_UNKNOWN):
        cls = methods.get(cfg.method.name)
        raise ConfigError(f"unknown {cfg.method.name} preset '{cfg.method.preset[len(_UNKNOWN):]}'; valid: auto, "
                          f"{', '.join(sorted(cls.PRESETS))}")
    t = cfg.trainer
    _one_of("trainer.precision", t.precision, PRECISIONS)
    _one_of("trainer.optimizer", t.optimizer, OPTIMIZERS)
    _one_of("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"trainer.zero_stage={t.zero_stage} is not supported; valid: 0, 1, 2")
    if t.steps < 1 or t.batch_size < 1:
        raise ConfigError(f"trainer.steps and trainer.batch_size must be >= 1 (got {t.steps}, {t.batch_size})")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise ConfigError(f"trainer.lr must be a finite number > 0, got {t.lr}")
    if not (math.isfinite(t.grad_clip) and t.grad_clip >= 0):
        raise ConfigError(f"trainer.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    if not (t.weight_decay >= 0 and t.eps > 0):
        raise ConfigError(f"trainer.weight_decay must be >= 0 and trainer.eps > 0 (got {t.weight_decay}, {t.eps})")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"trainer.betas needs two values in [0, 1), got {list(t.betas)}")
    if any(not 0.0 < b < 1.0 for b in t.ema_betas) or any(s <= 0 for s in t.ema_stds):
        raise ConfigError("trainer.ema_betas must lie in (0, 1) and trainer.ema_stds must be > 0")
    _one_of("trainer.device", t.device, ("auto", "cpu", "cuda"))
    _one_of("log.console", cfg.log.console, ("auto", "lines", "quiet"))
    _one_of("log.wandb", cfg.log.wandb, ("", "offline", "online"))
    if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"log.wandb={cfg.log.wandb} needs the wandb package (pip install wandb); "
                          f"valid without it: log.wandb=''")
    cuda = torch.cuda.is_available()
    if t.device == "cuda" and not cuda:
        raise ConfigError("trainer.device=cuda but CUDA is not available here; valid: auto, cpu")
    on_cuda = cuda and t.device != "cpu"
    if t.precision == "fp16" and not on_cuda:
        raise ConfigError("trainer.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); "
                          "valid here: fp32, bf16")
    if t.divergence_factor != 0 and not t.divergence_factor > 1:
        raise ConfigError(f"trainer.divergence_factor must be > 1 (or 0 = off), got {t.divergence_factor}")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "lr_ref_steps",
                "max_nonfinite_steps", "divergence_steps"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key} must be >= 1, got {t[key]}")
    if min(t.lr_warmup_steps, t.grid_every_steps, cfg.eval.every_steps) < 0:
        raise ConfigError("trainer.lr_warmup_steps, trainer.grid_every_steps and eval.every_steps must be >= 0")
    from harness.train.engine import DeepSpeedConfigError, user_deepspeed_options
    try:
        user_deepspeed_options(t)
    except DeepSpeedConfigError as exc:
        raise ConfigError(str(exc)) from None
    from harness.train.ema import ema_name
    names = [ema_name(beta=b) for b in t.ema_betas] + [ema_name(std=s) for s in t.ema_stds]
    if len(set(names)) != len(names):
        raise ConfigError(f"two EMAs share a name: {names}; make trainer.ema_betas / ema_stds distinct")
    if any(s < 0 or s > MAX_EVAL_STEPS for s in cfg.eval.steps):
        raise ConfigError(f"eval.steps must lie in [0, {MAX_EVAL_STEPS}] (sampler steps; 0 = the method's own), "
                          f"got {list(cfg.eval.steps)}")
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
        shape, classes = data_shape(cfg.data)
        check_model_config(cfg.model, shape, classes, cfg.data.name)
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
    """Stable id of everything that defines a run (the run directory, launcher and log options excluded)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("run_dir", None)
    data.pop("log", None)
    data["launcher"] = {"nproc": data["launcher"]["nproc"]}   # results depend on the world size only
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def default_run_dir(cfg: DictConfig) -> str:
    return f"runs/{cfg.method.name}-{cfg.model.name}-{cfg.data.name}-{config_hash(cfg)}"
