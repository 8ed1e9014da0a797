"""The prepared GPU check: everything that needs a CUDA GPU and has not run on this project's CPU machines.

    python benchmarks/gpu_check.py [--out results/bench/gpu_check.json] [--budget-sec 480]
    bash scripts/gpu_check.sh                 (the same, after the project's setup)

Checks, each in its own process with a deadline, so one failure or hang never hides the others:
  fp16_ect, fp16_sct     fp16 training through DeepSpeed with dynamic loss scaling: finite losses, the
                         overflow-skipped steps counted (metrics.jsonl fp16/overflow_skipped_total)
  bf16_ect               bf16 training
  triton_jvp             the compiled Triton JVP attention kernel (jvp_flash on CUDA) against
                         torch.func.jvp over math attention: parity at N = 256, then peak memory and median
                         time of both at N = 1k, 2k, 4k, 8k, 16k
  dropout_tape           the dropout tape's CUDA branch against replaying the CUDA RNG (same bits)
  xformers               xformers attention against sdpa (parity), when xformers is installed
  nccl_one_rank          a run over nccl with one rank; nccl_two_ranks: torchrun with two, given two GPUs
  step_cost              benchmarks/step_cost.py --device cuda (results/bench/step_cost_cuda.json)
  smoke_sweep            sweeps/smoke.yaml end to end on the GPU
On a machine without a CUDA GPU every check is listed as skipped, with the reason, and the exit status
is 0; with one, the exit status is 1 when any check failed. Writes the JSON and prints one screen.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench" / "gpu_check.json"
TRAIN = ["data=digits", "model=unet-xs", "trainer.batch_size=128", "trainer.steps=60", "trainer.log_every_steps=10",
         "trainer.device=cuda", "eval.num_samples=200", "eval.steps=[1,2]", "log.console=lines"]
LENGTHS = (1024, 2048, 4096, 8192, 16384)


def _env() -> dict[str, str]:
    from launchers.base import RENDEZVOUS_ENV
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(timeout, 1))


def _tail(text: str, lines: int = 3) -> str:
    return " / ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _train(name: str, tmp: Path, timeout: float, *overrides: str,
           command: tuple[str, ...] = (sys.executable, "-m", "harness.train")) -> dict:
    run_dir = tmp / name
    out = _run([*command, *TRAIN, *overrides, "--out", str(run_dir)], timeout)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    losses = [m["loss"] for m in metrics if "loss" in m]
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
    finite = bool(losses) and all(isinstance(v, float) and abs(v) < float("inf") for v in losses)
    row = {"status": "passed" if out.returncode == 0 and result.get("status") == "completed" and finite
           else "failed", "losses": losses, "run_status": result.get("status"),
           "scores": {f"{s['ema']} {s['steps']}-step": s["value"] for s in result.get("scores", [])},
           "overflow_skipped": max((m.get("fp16/overflow_skipped_total", 0) for m in metrics), default=None),
           "nonfinite_skipped": result.get("nonfinite_skipped")}
    if row["status"] == "failed":
        row["reason"] = _tail(out.stderr or out.stdout)
    return row


def _triton_jvp() -> dict:
    """In a child: parity, then memory and time of jvp_flash (the Triton kernel) and math + torch.func.jvp."""
    import statistics

    import torch

    from harness.nets.attention import attention
    from harness.nets.jvp_attention import use_triton

    def inputs(n):
        gen = torch.Generator(device="cuda").manual_seed(n)
        return [torch.randn(1, 4, n, 64, device="cuda", generator=gen) for _ in range(6)]

    def call(backend, t):
        q, k, v, tq, tk, tv = t
        with torch.no_grad():
            return torch.func.jvp(lambda a, b, c: attention(a, b, c, backend), (q, k, v), (tq, tk, tv))

    small = inputs(256)
    assert use_triton(small[0]), "jvp_flash does not take the Triton path on this GPU"
    (y_f, t_f), (y_m, t_m) = call("jvp_flash", small), call("math", small)
    parity = {"max_abs_err_y": float((y_f - y_m).abs().max()), "max_abs_err_tangent": float((t_f - t_m).abs().max())}
    rows = []
    for n in LENGTHS:
        t = inputs(n)
        row = {"length": n}
        for backend in ("math", "jvp_flash"):
            try:
                call(backend, t)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                secs = []
                for _ in range(5):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call(backend, t)
                    end.record()
                    torch.cuda.synchronize()
                    secs.append(start.elapsed_time(end) / 1000)
                row[f"{backend}_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                row[f"{backend}_median_sec"] = statistics.median(secs)
            except torch.cuda.OutOfMemoryError:
                row[f"{backend}_peak_bytes"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
    ok = parity["max_abs_err_y"] < 1e-4 and parity["max_abs_err_tangent"] < 1e-3
    return {"status": "passed" if ok else "failed", "parity_n256": parity, "rows": rows,
            **({} if ok else {"reason": f"parity off: {parity}"})}


def _xformers() -> dict:
    import torch

    from harness.nets.attention import attention
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", generator=gen) for _ in range(3))
    err = float((attention(q, k, v, "xformers") - attention(q, k, v, "sdpa")).abs().max())
    return {"status": "passed" if err < 1e-3 else "failed", "max_abs_err": err}


def _dropout_tape() -> dict:
    """The tape's CUDA branch (torch.native_dropout's mask, scaled) against replaying the CUDA RNG: the
    second pass's output and gradients must be the same bits."""
    import torch

    from harness.config import compose
    from harness.nets import build_net
    from harness.nets.layers import DropoutTape
    cfg = compose(["model=ddpmpp-xs", "model.dropout=0.2", "data=digits", "method=ect"])
    net = build_net(cfg.model, (1, 8, 8), 0).cuda().train()
    x, t = torch.randn(16, 1, 8, 8, device="cuda"), torch.rand(16, device="cuda") + 0.1
    results = []
    for mode in ("rng", "tape"):
        torch.cuda.manual_seed(0)
        tape, state = DropoutTape(), torch.cuda.get_rng_state()
        with tape.record():
            first = net(x, t)
        if mode == "rng":
            torch.cuda.set_rng_state(state)
            second = net(x * 0.5, t)
        else:
            with tape.replay():
                second = net(x * 0.5, t)
        grads = torch.autograd.grad(second.square().sum(), list(net.parameters()))
        results.append((first, second, grads))
    (f0, s0, g0), (f1, s1, g1) = results
    same = torch.equal(f0, f1) and torch.equal(s0, s1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    return {"status": "passed" if same else "failed", "max_abs_diff": float((s0 - s1).abs().max()),
            **({} if same else {"reason": "the tape's masks are not the RNG replay's on CUDA"})}


def _in_child(fn: str, timeout: float) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.gpu_check import {fn}; "
            f"print('RESULT ' + json.dumps({fn}()))")
    out = _run([sys.executable, "-c", code], timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        return {"status": "failed", "reason": _tail(out.stderr or out.stdout)}
    return json.loads(lines[-1][len("RESULT "):])


def checks(tmp: Path, gpus: int, has_xformers: bool):
    """(name, why it is skipped or None, what runs it with the seconds it may take)."""
    yield "fp16_ect", None, lambda t: _train("fp16-ect", tmp, t, "method=ect", "trainer.precision=fp16")
    yield "fp16_sct", None, lambda t: _train("fp16-sct", tmp, t, "method=sct", "trainer.precision=fp16")
    yield "bf16_ect", None, lambda t: _train("bf16-ect", tmp, t, "method=ect", "trainer.precision=bf16")
    yield "triton_jvp", None, lambda t: _in_child("_triton_jvp", t)
    yield "dropout_tape", None, lambda t: _in_child("_dropout_tape", t)
    yield ("xformers", None if has_xformers else "xformers is not installed (pip install -e '.[gpu]')",
           lambda t: _in_child("_xformers", t))
    yield "nccl_one_rank", None, lambda t: _train("nccl-1", tmp, t, "method=ect", "launcher.nproc=1")
    yield ("nccl_two_ranks", None if gpus >= 2 else f"needs two GPUs ({gpus} here)",
           lambda t: _train("nccl-2", tmp, t, "method=ect", "trainer.batch_size=128",
                            command=(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "-m", "harness.train")))
    yield "step_cost", None, lambda t: _script(["benchmarks/step_cost.py", "--device", "cuda", "--steps", "10"], t)
    yield "smoke_sweep", None, lambda t: _script(["-m", "harness.sweep", "sweeps/smoke.yaml",
                                                  "--out", str(tmp / "sweeps"),
                                                  "trainer.device=cuda"], t)


def _script(args: list[str], timeout: float) -> dict:
    out = _run([sys.executable, *args], timeout)
    return {"status": "passed" if out.returncode == 0 else "failed", "tail": _tail(out.stdout, 4),
            **({"reason": _tail(out.stderr or out.stdout)} if out.returncode else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--budget-sec", type=float, default=480.0, help="all checks together (default 8 min)")
    args = parser.parse_args(argv)
    import importlib.util

    import torch
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    report = {"device": torch.cuda.get_device_name(0) if cuda else "no CUDA GPU", "gpus": gpus,
              "torch": torch.__version__, "cuda": torch.version.cuda, "machine": platform.machine(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checks": {}}
    deadline = time.time() + args.budget_sec
    with tempfile.TemporaryDirectory() as tmp:
        todo = list(checks(Path(tmp), gpus, importlib.util.find_spec("xformers") is not None))
        for i, (name, skip, fn) in enumerate(todo):
            if not cuda:
                skip = "no CUDA GPU here (torch.cuda.is_available() is False)"
            left = deadline - time.time()
            if skip is None and left < 10:
                skip = f"the {args.budget_sec:.0f} s budget ran out"
            if skip is not None:
                report["checks"][name] = {"status": "skipped", "reason": skip}
                continue
            tic = time.time()
            try:
                row = fn(left / (len(todo) - i) * 2)        # a fair share of what is left, twice over
            except subprocess.TimeoutExpired:
                row = {"status": "failed", "reason": "deadline passed"}
            report["checks"][name] = {**row, "sec": round(time.time() - tic, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu check on {report['device']} ({gpus} GPU(s), torch {report['torch']}):")
    for name, row in report["checks"].items():
        detail = row.get("reason") or ", ".join(f"{k} {v}" for k, v in row.items()
                                                if k in ("sec", "overflow_skipped", "max_abs_err", "parity_n256"))
        print(f"  {name:<15s} {row['status']:<8s} {detail}")
    print(f"wrote {out}")
    return 1 if any(r["status"] == "failed" for r in report["checks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
