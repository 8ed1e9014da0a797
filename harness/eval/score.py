"""Sample each EMA with 1, 2, ... steps and score against held-out data (pixel-space Frechet distance).

The evaluation issue replaces the metric with clean-fid / the digits-classifier FD; the protocol record
(metric, reference, sizes, seed, NFE, sampler time) is already written with every score.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.eval.frechet import frechet_distance
from harness.eval.grid import save_grid


@torch.no_grad()
def generate(method, net, num: int, steps: int, shape, num_classes: int, seed: int,
             batch_size: int, device: torch.device) -> torch.Tensor:
    """`num` samples from `net` with `steps` sampler steps; labels drawn uniformly when conditional."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out, was_training = [], net.training
    net.eval()                                   # no dropout while sampling
    try:
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            noise = torch.randn((b, *shape), generator=gen, device=device)
            labels = (torch.randint(num_classes, (b,), generator=gen, device=device)
                      if num_classes else None)
            out.append(method.sample(net, noise, steps, labels, gen).float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(out)


def floor_score(data, num: int) -> float:
    """The metric between held-out real data and as many training images: the best reachable value."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.x), generator=gen)[:num]
    return frechet_distance(data.x[idx].reshape(len(idx), -1), data.heldout_x.reshape(len(data.heldout_x), -1))


def score(method, nets: dict[str, torch.nn.Module], data, ecfg, device, step: int,
          grid_dir: Path | None = None) -> list[dict]:
    """One record per (EMA, sampler steps)."""
    ref = data.heldout_x.reshape(len(data.heldout_x), -1)
    floor = floor_score(data, min(ecfg.num_samples, len(data.x)))
    records = []
    for name, net in nets.items():
        for steps in ecfg.steps:
            steps = steps or method.default_steps()
            t0 = time.perf_counter()
            x = generate(method, net, ecfg.num_samples, steps, data.shape, data.num_classes,
                         ecfg.seed, ecfg.batch_size, device)
            sample_sec = time.perf_counter() - t0
            finite = bool(torch.isfinite(x).all())
            value = frechet_distance(x.reshape(len(x), -1), ref) if finite else float("nan")
            records.append({
                "step": step, "ema": name, "steps": steps, "nfe": method.nfe(steps),
                "metric": "pixel_fd", "value": value, "floor": floor,
                "reference": f"{data.name} held-out ({len(ref)})", "num_samples": ecfg.num_samples,
                "seed": ecfg.seed, "sample_sec": sample_sec,
            })
            if grid_dir is not None and ecfg.grid:
                save_grid(x[:100].clamp(-1, 1), Path(grid_dir) / f"samples_{name}_{steps}step.png")
    return records
