"""Our training steps against a public implementation's, side by side in one run.

    python benchmarks/peers.py --ect PATH [--channels 32 64] [--rounds 3] [--steps 30]

PATH (or $CMBENCH_ECT) is a checkout of locuslab/ect (github.com/locuslab/ect; `git clone` it anywhere:
it is read, never copied into this project). The network is the same in both codebases: DDPM++ /
SongUNet on 1x8x8 digits batches of 128, `channels` wide, multipliers [1, 2], one block per level,
attention at 4x4, dropout 0.2, positional noise embedding, fp32 (0.749M parameters at 32 channels).

  cmbench ect, sct   harness.train.trainer.Trainer.step: DeepSpeed engine step, the method's loss, the
                     default EDM2 power EMA (what a run pays per step)
  locuslab/ect ect   its ECMLoss (stage 3 of its schedule) on its ECMPrecond(SongUNet), RAdam at 1e-4,
                     the gradient nan_to_num and the EMA update of its training loop (ct_training_loop.py);
                     its dropout-mask replay uses torch.cuda's RNG state, mapped to the CPU generator here

Each (round, width, implementation) is a fresh process with 2 torch threads that times `steps` steps after
3 untimed ones; the processes of a round run one after another and rounds interleave, so machine noise
hits every implementation alike. Writes results/bench/peers.json: every round's median step time, the
ratio ours / peer per round and its median, and the peer's commit.

NVlabs/FastGen (its CM and sCM) is not measured yet: it needs its own environment (numpy < 2, pandas < 2.3,
diffusers 0.35.1, transformers 4.49.0, wandb, boto3, ftfy, loguru, einops, timm, imageio, webdataset at
import time) and a driver for its model classes; `--fastgen` says so and exits 2.
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

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "bench" / "peers.json"
BATCH, WARMUP = 128, 3
IMPLS = ("cmbench-ect", "locuslab-ect", "cmbench-sct")


def _digits_batch():
    from harness.data import DataConfig, load_dataset
    return load_dataset(DataConfig(name="digits")).x[:BATCH]


def _time(step, steps: int) -> list[float]:
    out = []
    for i in range(steps + WARMUP):
        tic = time.perf_counter()
        step(i)
        if i >= WARMUP:
            out.append(time.perf_counter() - tic)
    return out


def _cmbench(method: str, channels: int, steps: int) -> dict:
    from benchmarks.step_cost import SHARED
    from harness.config import compose
    from harness.train import engine as eng
    from harness.train.rundir import RunDir
    from harness.train.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*SHARED, "model=ddpmpp-xs", f"model.channels={channels}", "model.channel_mult=[1,2]",
                       "model.num_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0.2", f"method={method}",
                       f"trainer.steps={steps + WARMUP}", "trainer.device=cpu", "log.console=quiet",
                       "log.tensorboard=false", f"run_dir={tmp}/run"])
        run_dir = RunDir(cfg.run_dir)
        run_dir.prepare(cfg)
        trainer = Trainer(cfg, run_dir, eng.setup_distributed("cpu"))
        secs = _time(trainer.step, steps)
        params = trainer.num_params
        trainer.close()
    return {"secs": secs, "params": params}


def _locuslab_ect(path: str, channels: int, steps: int) -> dict:
    import copy

    import torch
    sys.path.insert(0, path)
    torch.cuda.get_rng_state, torch.cuda.set_rng_state = torch.get_rng_state, torch.set_rng_state
    from training.loss import ECMLoss
    from training.networks import ECMPrecond
    torch.manual_seed(0)
    net = ECMPrecond(img_resolution=8, img_channels=1, label_dim=0, model_type="SongUNet", model_channels=channels,
                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.2)
    net.train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = ECMLoss()
    loss_fn.update_schedule(3)
    optimizer = torch.optim.RAdam(net.parameters(), lr=1e-4)
    images = _digits_batch()
    ema_beta = 0.5 ** (BATCH / 500_000)           # its default ema_halflife_kimg = 500

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net=net, images=images).mean().backward()
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p_net.detach().lerp(p_ema, ema_beta))
    secs = _time(step, steps)
    return {"secs": secs, "params": sum(p.numel() for p in net.parameters())}


def child(impl: str, channels: int, steps: int, ect: str) -> dict:
    import torch
    torch.set_num_threads(2)
    if impl == "locuslab-ect":
        return _locuslab_ect(ect, channels, steps)
    return _cmbench(impl.split("-", 1)[1], channels, steps)


def _in_child(impl: str, channels: int, steps: int, ect: str) -> dict:
    from launchers.base import RENDEZVOUS_ENV
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_ENV} | {"PYTHONPATH": str(ROOT),
                                                                             "OMP_NUM_THREADS": "2"}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.peers import child; "
            f"print('RESULT ' + json.dumps(child({impl!r}, {channels}, {steps}, {ect!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{impl} ({channels} channels) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _commit(path: str) -> str:
    out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown (not a git checkout)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ect", default=os.environ.get("CMBENCH_ECT", ""), help="locuslab/ect checkout")
    parser.add_argument("--fastgen", default=os.environ.get("CMBENCH_FASTGEN", ""), help="NVlabs/FastGen (not yet)")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    if not args.ect or not (Path(args.ect) / "training" / "loss.py").is_file():
        print(f"error: --ect PATH (or CMBENCH_ECT) must name a checkout of locuslab/ect with training/loss.py "
              f"(got {args.ect!r}); git clone https://github.com/locuslab/ect PATH", file=sys.stderr)
        return 2
    if args.fastgen:
        print("error: the NVlabs/FastGen peer is not measured yet (see this file's docstring); run without "
              "--fastgen", file=sys.stderr)
        return 2
    medians: dict[str, dict[str, list[float]]] = {str(c): {i: [] for i in IMPLS} for c in args.channels}
    params: dict[str, dict[str, int]] = {str(c): {} for c in args.channels}
    for r in range(args.rounds):
        for c in args.channels:
            for impl in IMPLS:
                got = _in_child(impl, c, args.steps, args.ect)
                medians[str(c)][impl].append(1000 * statistics.median(got["secs"]))
                params[str(c)][impl] = got["params"]
                print(f"round {r + 1} channels {c} {impl}: {medians[str(c)][impl][-1]:.1f} ms", flush=True)
    widths = {}
    for c, rows in medians.items():
        per_round = [a / b for a, b in zip(rows["cmbench-ect"], rows["locuslab-ect"])]
        widths[c] = {"median_ms_per_round": rows, "params": params[c],
                     "ect_ratio_to_locuslab_per_round": per_round,
                     "ect_ratio_to_locuslab": statistics.median(per_round)}
        print(f"channels {c}: cmbench ECT / locuslab ECT = {widths[c]['ect_ratio_to_locuslab']:.3f} "
              f"(rounds {', '.join(f'{x:.3f}' for x in per_round)})")
    result = {"widths": widths, "batch": BATCH, "steps_timed": args.steps, "rounds": args.rounds, "threads": 2,
              "precision": "fp32", "device": "cpu", "peers": {"locuslab/ect": _commit(args.ect)},
              "not_measured": {"NVlabs/FastGen": "needs its own environment and a driver (docstring)"},
              "torch": __import__("torch").__version__, "machine": platform.machine()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
