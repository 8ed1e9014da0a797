"""The DeepSpeed engine and torch.distributed: the only module that imports either.

`deepspeed.initialize` owns the optimizer step, gradient clipping, the ZeRO stage and mixed
precision (fp16 with dynamic loss scaling, bf16, fp32). Processes are started by torchrun, by
SLURM (srun / submitit), or as a single process, which gets a private loopback rendezvous.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_slurm_env() -> None:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT from a SLURM task's environment (srun- or
    submitit-started), by submitit's TorchDistributedEnvironment: the one place this mapping lives. GPUs stay
    visible, so each rank takes cuda:LOCAL_RANK."""
    import submitit
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def quiet_libraries() -> None:
    """Library messages that are noise on a machine as it is, turned down at their loggers (real warnings
    from them still show): torch's cpp_extension says at import that a CPU-only machine has no CUDA
    runtime; DeepSpeed says at import that it falls back to the CPU, which DS_ACCELERATOR=cpu states up
    front, and logs its engine setup at INFO."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Initialize torch.distributed (gloo on CPU, nccl on CUDA) from torchrun's or SLURM's environment."""
    env = os.environ
    if device == "cpu":   # DeepSpeed picks its accelerator at import: keep it off a present GPU
        env["DS_ACCELERATOR"] = "cpu"
    quiet_libraries()
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        export_slurm_env()
    if "RANK" not in env:   # a lone process: a private rendezvous, so parallel runs never collide
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):   # "DeepSpeed ... shm_comm_op built successfully" (a print)
            deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo",
                                       auto_mpi_discovery=False, verbose=False)
        if printed.getvalue().strip():
            log.debug("deepspeed.init_distributed: %s", printed.getvalue().strip())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def make_optimizer(params, t) -> torch.optim.Optimizer:
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[t.optimizer]
    return cls(params, **kwargs)


def lr_factor(step: int, t) -> float:
    """Multiplier of trainer.lr at optimizer step `step` [EDM2 eq. 16 for inverse_sqrt]."""
    factor = 1.0
    if t.lr_schedule == "inverse_sqrt":
        factor /= max(step / t.lr_ref_steps, 1.0) ** 0.5
    if t.lr_warmup_steps > 0:
        factor *= min(step / t.lr_warmup_steps, 1.0)
    return factor


class DeepSpeedConfigError(ValueError):
    """trainer.deepspeed_config / trainer.deepspeed that cannot be used (one line)."""


# Keys of DeepSpeed's config that the harness sets from trainer.* (a user value would silently disagree
# with the schedule, the batch accounting or the precision the harness records).
HARNESS_DEEPSPEED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                          "optimizer", "scheduler", "fp16.enabled", "bf16.enabled", "amp", "gradient_clipping",
                          "zero_optimization.stage")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    return [k for key, v in d.items()
            for k in ([f"{prefix}{key}", *_flat_keys(v, f"{prefix}{key}.")] if isinstance(v, dict) else [f"{prefix}{key}"])]


def user_deepspeed_options(t) -> dict:
    """trainer.deepspeed_config (a JSON file) merged with trainer.deepspeed (keys), checked."""
    import json
    from omegaconf import OmegaConf
    options: dict = {}
    if t.deepspeed_config:
        path = os.path.expanduser(str(t.deepspeed_config))
        try:
            with open(path) as fh:
                options = json.load(fh)
        except OSError as exc:
            raise DeepSpeedConfigError(f"trainer.deepspeed_config={path} cannot be read ({exc.strerror})") from None
        except json.JSONDecodeError as exc:
            raise DeepSpeedConfigError(f"trainer.deepspeed_config={path} is not JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(options, dict):
            raise DeepSpeedConfigError(f"trainer.deepspeed_config={path} must hold a JSON object")
    keys = t.deepspeed
    if keys is not None and not isinstance(keys, dict):
        keys = OmegaConf.to_container(keys, resolve=True) if OmegaConf.is_config(keys) else keys
    if keys is not None and not isinstance(keys, dict):
        raise DeepSpeedConfigError(f"trainer.deepspeed={keys!r} must be a mapping, e.g. "
                                   f"trainer.deepspeed={{zero_optimization:{{overlap_comm:true}}}}")
    options = _merge(options, keys or {})
    owned = sorted(k for k in _flat_keys(options) if k in HARNESS_DEEPSPEED_KEYS)
    if owned:
        raise DeepSpeedConfigError(f"DeepSpeed option(s) {', '.join(owned)} are set by the harness from trainer.* "
                                   f"(batch_size, precision, optimizer, lr, grad_clip, zero_stage); set those instead")
    return options


def deepspeed_config(t, precision: str, world_size: int) -> dict:
    """DeepSpeed's config: the harness's own, with the user's options (user_deepspeed_options) over it."""
    if t.batch_size % world_size:
        raise ValueError(f"trainer.batch_size={t.batch_size} is not divisible by the {world_size} ranks")
    return _merge(_harness_deepspeed_config(t, precision, world_size), user_deepspeed_options(t))


def _harness_deepspeed_config(t, precision: str, world_size: int) -> dict:
    return {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "zero_allow_untested_optimizer": True,        # torch optimizers (RAdam etc.) under ZeRO
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,          # 0 = dynamic scaling
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def build_engine(net: torch.nn.Module, t, precision: str, world_size: int):
    """Wrap the network: returns the DeepSpeed engine (the optimizer inside)."""
    import deepspeed

    optimizer = make_optimizer(net.parameters(), t)
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer,
                                           config=deepspeed_config(t, precision, world_size),
                                           dist_init_required=False)
    from harness.train.checkpoint import install_safe_loader   # checkpoint imports this module
    install_safe_loader(engine)
    return engine


def set_lr(engine, step: int, t) -> None:
    """The learning rate of optimizer step `step`: a function of the step alone, so skipped steps
    (fp16 overflow, non-finite loss) never shift the schedule."""
    for group in engine.optimizer.param_groups:
        group["lr"] = t.lr * lr_factor(step, t)


def all_finite(value: torch.Tensor) -> bool:
    """True when the value is finite on every rank (so all ranks skip a bad step together)."""
    return all_true(bool(torch.isfinite(value.detach()).all()))


def all_true(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    ok = torch.tensor([float(flag)], device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    buf /= dist.get_world_size()
    return dict(zip(keys, buf.cpu().tolist()))
