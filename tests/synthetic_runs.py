"""Synthetic run directories in harness.train.rundir's layout, for the collector's tests and benchmark.

The files mirror what `python -m harness.train method=ect model=unet-xs data=digits trainer.steps=20
eval.num_samples=100` writes (config.yaml from OmegaConf.to_yaml and the same config as config.json,
result.json / derived.json with sorted keys and indent 2, one metrics.jsonl line per log interval and
evaluation; `config_json=False` writes a run from before config.json existed);
tests/test_collect.py checks the config keys against harness.config.compose.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# harness.config.compose(["method=ect", "model=unet-xs", "data=digits"]), abridged to one method's keys.
CONFIG = {
    "method": {"name": "ect", "preset": "tiny", "sigma_data": 0.5, "p_mean": -1.1, "p_std": 2.0, "q": 2.0,
               "stages": 8, "stage_steps": 0, "stage_offset": 1, "k": 8.0, "b": 1.0, "mapping": "sigmoid",
               "huber_c": 0.00432, "adaptive_p": 0.5, "weighting": "inv_dt", "delta": 0.0,
               "shared_dropout_mask": True, "sigma_max": 80.0, "mid_t": [0.821], "eval_shift_sigma_min": 0.0},
    "model": {"name": "unet-xs", "arch": "unet", "dropout": 0.0, "attention": "sdpa", "logvar": False,
              "extra_cond_dim": 0, "channels": 16, "channel_mult": [1, 2], "channel_mult_noise": 0,
              "channel_mult_emb": 0, "num_blocks": 1, "attn_resolutions": [], "mid_attention": False,
              "channels_per_head": 16, "label_balance": 0.5, "concat_balance": 0.5, "res_balance": 0.3,
              "attn_balance": 0.3, "clip_act": 256.0, "dropout_res": 0, "noise_embedding": "fourier",
              "resample_filter": [1, 1]},
    "data": {"name": "digits", "path": "", "heldout_path": "", "class_conditional": False, "heldout": 297,
             "num_points": 50000, "max_images": 0, "xflip": False},
    "trainer": {"steps": 20, "batch_size": 128, "precision": "auto", "zero_stage": 0, "grad_clip": 0.0,
                "optimizer": "radam", "lr": 0.0001, "betas": [0.9, 0.999], "eps": 1.0e-08,
                "weight_decay": 0.0, "lr_schedule": "constant", "lr_ref_steps": 2000, "lr_warmup_steps": 0,
                "ema_betas": [], "ema_stds": [0.05], "checkpoint_every_steps": 1000, "keep_checkpoints": 2,
                "log_every_steps": 50, "max_nonfinite_steps": 20, "device": "auto", "threads": 0,
                "grid_every_steps": 0},
    "eval": {"at_end": True, "every_steps": 0, "num_samples": 100, "steps": [1, 2], "seed": 0,
             "batch_size": 500, "grid": True},
    "launcher": {"name": "local", "nproc": 1},
    "seed": 0, "run_dir": "", "init_from": "", "init_ema": "", "teacher": "", "recipe": "",
}


def score(value: float, nfe: int, *, ema: str = "ema_std0.05", metric: str = "pixel_fd", step: int = 20,
          **extra) -> dict:
    """A score record as harness.eval writes it (sampler steps = NFE for consistency samplers)."""
    return {"ema": ema, "floor": 2.09, "metric": metric, "nfe": nfe, "num_samples": 100,
            "reference": "digits held-out (297)", "sample_sec": 0.03, "seed": 0, "step": step,
            "steps": extra.pop("steps", nfe), "value": value, **extra}


def write_run(path: Path, *, method: str = "ect", model: str = "unet-xs", data: str = "digits",
              steps: int = 20, batch_size: int = 128, num_params: int = 164283, flops_per_img: float = 3.566e7,
              scores: list[dict] | None = None, status: str = "completed", seed: int = 0,
              evaluate: list[dict] | None = None, init_from: str = "", teacher: str = "",
              config_json: bool = True) -> Path:
    """A complete run directory; `status` other than completed writes what a running or failed run has."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(CONFIG)
    cfg["method"]["name"], cfg["model"]["name"], cfg["data"]["name"] = method, model, data
    cfg["trainer"].update(steps=steps, batch_size=batch_size)
    cfg["seed"], cfg["run_dir"], cfg["init_from"], cfg["teacher"] = seed, str(path), init_from, teacher
    (path / "config.yaml").write_text(yaml.dump(cfg, Dumper=_DUMPER, sort_keys=False))
    if config_json:
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    derived = {"batch_per_rank": batch_size, "device": "cpu", "method_config": cfg["method"],
               "num_params": num_params, "precision": "fp32", "world_size": 1}
    _json(path / "derived.json", derived)
    nimg, flops = steps * batch_size, flops_per_img * steps * batch_size
    with open(path / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"flops/train_total": flops, "loss": 5.1, "nimg": nimg, "step": steps,
                             "time": 1796149006.28}, sort_keys=True) + "\n")
    if status == "completed":
        scores = [score(40.0, 1, step=steps), score(30.0, 2, step=steps)] if scores is None else scores
        result = {"evals": [], "flops_train": flops, "nimg": nimg, "nonfinite_skipped": 0,
                  "num_params": num_params, "run_dir": str(path), "scores": scores, "status": status,
                  "steps": steps, "train_sec": nimg / 1163.0}
    elif status == "running":
        result = {"resumed_from_step": 0, "run_dir": str(path), "status": status}
    else:
        result = {"run_dir": str(path), "status": status, "traceback": "Traceback ...\n"}
    _json(path / "result.json", result)
    if evaluate is not None:
        _json(path / "evaluate.json", {"scores": evaluate})
    return path


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
