"""Sample each EMA with 1, 2, ... steps and score with the configured metric (harness.eval.metrics).

Every record carries its protocol: step, ema, steps, nfe, metric, value, floor, reference,
num_samples, seed, sample_sec, plus the metric's own fields (feature_extractor, mode, reference_size,
floor_set, ...) and the sampler's batch size, device and scoring time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.eval.grid import save_grid
from harness.eval.metrics import Metric, build_metric


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


def score(method, nets: dict[str, torch.nn.Module], data, ecfg, device, step: int,
          grid_dir: Path | None = None, metric: Metric | None = None) -> list[dict]:
    """One record per (EMA, sampler steps); `metric` defaults to build_metric(ecfg, data, device)."""
    metric = metric or build_metric(ecfg, data, device)
    metric.prepare()                             # reference statistics and floor, before any sampling
    records = []
    step_counts = list(dict.fromkeys(s or method.default_steps() for s in ecfg.steps))   # 0 = N; once each
    for name, net in nets.items():
        for steps in step_counts:
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            x = generate(method, net, ecfg.num_samples, steps, data.shape, data.num_classes,
                         ecfg.seed, ecfg.batch_size, device)
            sample_sec = time.perf_counter() - t0
            finite = bool(torch.isfinite(x).all())
            value = metric(x) if finite else float("nan")
            records.append({
                **metric.protocol(),
                "step": step, "ema": name, "steps": steps, "nfe": method.nfe(steps),
                "value": value, "floor": metric.floor, "num_samples": ecfg.num_samples,
                "seed": ecfg.seed, "sample_sec": sample_sec, "score_sec": time.perf_counter() - t0 - sample_sec,
                "sample_batch_size": ecfg.batch_size, "device": str(device),
            })
            if grid_dir is not None and ecfg.grid:
                save_grid(x[:100].clamp(-1, 1), Path(grid_dir) / f"samples_{name}_{steps}step.png")
    return records
