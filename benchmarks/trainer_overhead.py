"""Trainer overhead: harness trainer steps vs a bare PyTorch loop, same net / loss / batch / optimizer.

    python benchmarks/trainer_overhead.py [--steps 60] [--model unet-s]

Both run in this process, interleaved step by step (so machine noise hits both alike), on CPU fp32.
Writes {"ratio": median harness step / median bare step, ...} to results/bench/trainer_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import methods
from harness.train import engine as eng
from harness.config import compose
from harness.train.engine import make_optimizer
from harness.nets import build_net
from harness.train.rundir import RunDir
from harness.train.seeding import seed_step
from harness.train.trainer import Trainer, method_config
from methods.base import StepContext

OUT = Path(__file__).resolve().parent.parent / "results" / "bench" / "trainer_overhead.json"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="unet-s")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    cfg = compose(["method=ect", f"model={args.model}", "data=digits", "trainer.ema_betas=[0.999]",
                   f"trainer.steps={args.steps + args.warmup}", "trainer.log_every_steps=1000000",
                   "trainer.checkpoint_every_steps=1000000", "eval.at_end=false"])
    dist = eng.setup_distributed("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        run.prepare(cfg)
        trainer = Trainer(cfg, run, dist)

        # the bare loop: a plain module, a plain torch optimizer, the same method loss and batches
        torch.manual_seed(cfg.seed)
        net = build_net(cfg.model, trainer.data.shape, trainer.data.num_classes)
        opt = make_optimizer(net.parameters(), cfg.trainer)
        method = methods.get("ect")(method_config(cfg), trainer.data.shape, trainer.data.num_classes)

        def bare_step(step: int) -> None:
            gen = seed_step(cfg.seed, step, 0, torch.device("cpu"))
            ctx = StepContext(net, net, None, step, cfg.trainer.steps, gen)
            loss = method.loss(ctx, trainer.batch(step))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        harness_sec, bare_sec = [], []
        for step in range(args.steps + args.warmup):
            for fn, acc in ((trainer.step, harness_sec), (bare_step, bare_sec)):
                tic = time.perf_counter()
                fn(step)
                if step >= args.warmup:
                    acc.append(time.perf_counter() - tic)
    h, b = statistics.median(harness_sec), statistics.median(bare_sec)
    result = {"ratio": h / b, "harness_median_step_sec": h, "bare_median_step_sec": b,
              "steps": args.steps, "model": args.model, "batch_size": cfg.trainer.batch_size,
              "precision": "fp32", "device": "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
