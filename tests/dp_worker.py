"""Worker for test_distributed: trains a deterministic-loss method and saves the final weights.

    python tests/dp_worker.py RUN_DIR [overrides...]              (one process)
    torchrun --nproc_per_node 2 tests/dp_worker.py RUN_DIR ...    (two ranks over gloo)
"""
import dataclasses
import sys

import torch

import methods
from harness.config import compose
from harness.train.cli import run
from methods.base import Method
from methods.parameterization import EDMParam


@dataclasses.dataclass
class DenoiseConfig:
    name: str = "test_denoise"
    preset: str = "auto"


@methods.register("test_denoise")
class FixedDenoise(Method):
    """EDM-parameterized denoising at fixed noise levels with fixed noise: no per-rank randomness,
    so one process on the whole batch and two on halves must give the same gradients."""
    Config = DenoiseConfig
    PRESETS = {"tiny": {}}

    def loss(self, ctx, batch):
        x0 = batch["x"]
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(x0.shape[1:], generator=gen)          # the same for every sample and rank
        t = 0.2 + (x0.reshape(len(x0), -1).mean(dim=1) + 1)       # a per-sample level set by the data
        D = EDMParam().denoise(ctx.net, x0 + t.reshape(-1, 1, 1, 1) * noise, t)
        return {"loss": ((D - x0) ** 2).sum(dim=(1, 2, 3)).mean()}


if __name__ == "__main__":
    run_dir, *extra = sys.argv[1:]
    cfg = compose(["method=test_denoise", "data=digits", "model=unet-xs", "trainer.batch_size=32",
                   "trainer.steps=3", "trainer.optimizer=adam", "trainer.lr=1e-3", "trainer.threads=1",
                   "eval.at_end=false", f"run_dir={run_dir}", *extra])
    result = run(cfg)
    assert result["status"] == "completed", result
