"""Training-step cost per method: median step time and peak step memory, as ratios to ECT.

    python benchmarks/step_cost.py [--configs dit-s ddpmpp-32] [--methods ect sct ...] [--steps 20]

Every method trains the same network on the same digits batches (batch 128, fp32, CPU) through the
harness trainer (DeepSpeed engine, EMA, method loss), so the numbers are what a run pays per step.
Time: all methods' trainers live in one process and take their steps round-robin, so machine noise
hits them alike; the median over `steps` timed steps after 3 untimed ones. Memory: each method in a
fresh subprocess, peak resident memory of one steady-state step (/proc VmHWM reset just before it)
minus the resident memory before it, with glibc returning large blocks to the OS on free (so resident
memory tracks live tensors rather than the allocator's cache). Distillation methods get a 1-step teacher run of the same network
(its weights do not change the cost). Writes results/bench/step_cost.json.

Configs:
  dit-s       the sCT/ECT comparison of the sCM issue: DiT-S on the digits with `jvp_flash` attention.
  ddpmpp-32   DDPM++ with 32 channels, multipliers [1, 2], one block per level, attention at 4x4,
              dropout 0.2: the shape benchmarks/peers.py times against locuslab/ect side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench" / "step_cost.json"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    "dit-s": ["model=dit-s", "model.attention=jvp_flash"],
    "ddpmpp-32": ["model=ddpmpp-xs", "model.channels=32", "model.channel_mult=[1,2]", "model.num_blocks=1",
                  "model.attn_resolutions=[4]", "model.dropout=0.2"],
}
# Per-method overrides on top of the shared setup; "teacher" names the teacher method to build first.
METHODS = {
    "edm": {}, "trigflow": {},
    "ect": {}, "ct": {}, "ict": {}, "stable_ct": {},
    "cd": {"teacher": "edm"},
    "sct": {"overrides": ["model.logvar=true"]},
    "scd": {"teacher": "trigflow", "overrides": ["model.logvar=true"]},
    "gcm-cu": {"method": "gcm", "overrides": ["method.variant=cu"]},
    "gcm-vu": {"method": "gcm", "overrides": ["method.variant=vu", "model.extra_cond_dim=1"]},
}
SHARED = ["data=digits", "trainer.batch_size=128", "trainer.precision=fp32",
          "trainer.log_every_steps=1000000", "trainer.checkpoint_every_steps=1000000", "eval.at_end=false",
          "eval.every_steps=0"]


def _overrides(config: str, key: str, teacher_dir: str | None, steps: int) -> list[str]:
    spec = METHODS[key]
    out = [*SHARED, *CONFIGS[config], f"method={spec.get('method', key)}", *spec.get("overrides", []),
           f"trainer.steps={steps}"]
    if teacher_dir:
        out.append(f"teacher={teacher_dir}")
    return out


def _teacher(config: str, method: str, root: Path) -> str:
    """A finished 1-step run of `method` on the benchmark network, for distillation students."""
    from harness.config import compose
    from harness.train.cli import run
    run_dir = root / f"teacher-{config}-{method}"
    cfg = compose([*SHARED, *CONFIGS[config], f"method={method}", "trainer.steps=1", f"run_dir={run_dir}",
                   f"trainer.device={DEVICE}"])
    if run(cfg)["status"] != "completed":
        raise RuntimeError(f"teacher {method} for {config} did not complete")
    return str(run_dir)


DEVICE = "cpu"   # --device cuda: the same trainers on the GPU (scripts/gpu_check.sh)


def _trainer(config: str, key: str, root: Path, steps: int, teachers: dict[str, str], tag: str = "time"):
    from harness.train import engine as eng
    from harness.config import compose
    from harness.train.rundir import RunDir
    from harness.train.trainer import Trainer
    teacher = METHODS[key].get("teacher")
    cfg = compose([*_overrides(config, key, teachers.get(teacher) if teacher else None, steps),
                   f"run_dir={root / f'{config}-{key}-{tag}'}", f"trainer.device={DEVICE}"])
    run_dir = RunDir(cfg.run_dir)
    run_dir.prepare(cfg)
    return Trainer(cfg, run_dir, eng.setup_distributed(DEVICE))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(config: str, key: str, root: str, teachers: dict[str, str]) -> int:
    """Child process: bytes of peak resident memory added by one steady-state training step."""
    trainer = _trainer(config, key, Path(root), 10, teachers, tag="memory")
    for step in range(3):                                 # FLOP counting, allocator warm-up
        trainer.step(step)
    Path("/proc/self/clear_refs").write_text("5")         # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    trainer.step(3)
    return (_status_kib("VmHWM") - before) * 1024


def _memory_in_child(config: str, key: str, root: Path, teachers: dict[str, str]) -> int:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch; torch.set_num_threads({torch.get_num_threads()}); "
            f"from benchmarks.step_cost import measure_memory; "
            f"print(measure_memory({config!r}, {key!r}, {str(root)!r}, {teachers!r}))")
    from launchers.base import RENDEZVOUS_ENV
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}   # a private rendezvous
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"   # large blocks are mmap'd and unmapped on free: RSS = live memory
    env["CMBENCH_MALLOC"] = "glibc"           # ... so the trainer must leave that setting alone (harness/train/malloc.py)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"memory run {config}/{key} failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


def _cuda_memory(config: str, key: str, root: Path, teachers: dict[str, str]) -> int:
    """Bytes of peak CUDA memory added by one steady-state step (the allocator's own count)."""
    trainer = _trainer(config, key, root, 10, teachers, tag="memory")
    for step in range(3):
        trainer.step(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.step(3)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    trainer.close()
    return int(peak)


def bench_config(config: str, keys: list[str], steps: int, root: Path) -> dict:
    teachers = {m: _teacher(config, m, root) for m in {METHODS[k]["teacher"] for k in keys if "teacher" in METHODS[k]}}
    trainers = {k: _trainer(config, k, root, steps + 3, teachers) for k in keys}
    times: dict[str, list[float]] = {k: [] for k in keys}
    for step in range(steps + 3):
        for key, trainer in trainers.items():
            tic = time.perf_counter()
            trainer.step(step)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            if step >= 3:
                times[key].append(time.perf_counter() - tic)
    del trainers
    rows = {}
    for key in keys:
        rows[key] = {"median_ms": 1000 * statistics.median(times[key]),
                     "peak_step_bytes": (_cuda_memory(config, key, root, teachers) if DEVICE == "cuda"
                                         else _memory_in_child(config, key, root, teachers))}
        print(config, key, json.dumps(rows[key]), flush=True)
    if "ect" in rows:
        for row in rows.values():
            row["time_ratio_to_ect"] = row["median_ms"] / rows["ect"]["median_ms"]
            row["memory_ratio_to_ect"] = row["peak_step_bytes"] / rows["ect"]["peak_step_bytes"]
    return {"overrides": [*SHARED, *CONFIGS[config]], "methods": rows}


def main() -> None:
    import methods as registry
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all registered of {list(METHODS)}")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None, help="default results/bench/step_cost.json (cpu), step_cost_cuda.json")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    out = Path(args.out) if args.out else OUT.with_name("step_cost_cuda.json") if DEVICE == "cuda" else OUT
    keys = args.methods or [k for k in METHODS if METHODS[k].get("method", k) in registry.names()]
    unknown = sorted(set(keys) - set(METHODS))
    if unknown:
        parser.error(f"unknown method key(s) {unknown}; valid: {', '.join(METHODS)}")
    result = {"configs": {}, "steps_timed": args.steps, "batch_size": 128, "precision": "fp32", "device": DEVICE,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            result["configs"][config] = bench_config(config, keys, args.steps, Path(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
