"""Sample each EMA with 1, 2, ... steps and score with the configured metric (harness.eval.metrics).

Every record carries its protocol: step, ema, steps, nfe, metric, value, floor, reference,
num_samples, seed, sample_sec, plus the metric's own fields (feature_extractor, mode, reference_size,
floor_set, ...) and the sampler's batch size, device and scoring time; with eval.selection, the
selection score and the sampler parameters chosen on it (harness.eval.select).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from harness.eval.grid import save_grid
from harness.eval.metrics import Metric, build_metric
from harness.eval.select import (SELECTION_SEED_OFFSET, finite_or_inf, mid_times, searchable,
                                 selection_reference)


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
    """One record per (EMA, sampler steps); `metric` defaults to build_metric(ecfg, data, device).

    With eval.selection, each record also carries its selection score (the same metric on the selection
    set, harness.eval.select) and, where eval.mid_sigma_grid applies (2 steps of a consistency sampler),
    the mid-point chosen there: every grid point is tried on the selection set and the best one samples
    the reported score. The choice, the grid and every tried value go into the record."""
    metric = metric or build_metric(ecfg, data, device)
    metric.prepare()                             # reference statistics and floor, before any sampling
    selection = metric.selection() if getattr(ecfg, "selection", False) else None
    if selection is not None:
        selection.prepare()
    grid = [float(v) for v in (getattr(ecfg, "mid_sigma_grid", None) or [])]
    records = []
    step_counts = list(dict.fromkeys(s or method.default_steps() for s in ecfg.steps))   # 0 = N; once each

    sel_num = int(getattr(ecfg, "selection_samples", 0) or 0) or ecfg.num_samples

    def sample(net, steps, seed, num=ecfg.num_samples):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x = generate(method, net, num, steps, data.shape, data.num_classes, seed, ecfg.batch_size, device)
        return x, time.perf_counter() - t0

    def value_of(m, x):
        return m(x) if bool(torch.isfinite(x).all()) else float("nan")

    for name, net in nets.items():
        for steps in step_counts:
            t_select = time.perf_counter()
            protocol, chosen = {}, None
            if selection is not None:
                sel_seed = ecfg.seed + SELECTION_SEED_OFFSET
                if grid and searchable(method, steps):
                    tried = []
                    for sigma in grid:
                        t_mid = method.time_of_sigma(sigma)
                        with mid_times(method, [t_mid]):
                            x_sel = sample(net, steps, sel_seed, sel_num)[0]
                        tried.append((sigma, t_mid, value_of(selection, x_sel)))
                    sigma, chosen_t, sel_value = min(tried, key=lambda r: finite_or_inf(r[2]))
                    chosen = [chosen_t]
                    protocol = {"mid_sigma": sigma, "mid_sigma_grid": grid,
                                "mid_sigma_tried": [r[2] for r in tried],
                                "sampler_rule": "2-step mid-point: argmin of the selection score over "
                                                "eval.mid_sigma_grid (EDM sigma, mapped by time_of_sigma)"}
                else:
                    sel_value = value_of(selection, sample(net, steps, sel_seed, sel_num)[0])
                protocol.update({"selection_value": sel_value, "selection_samples": sel_num,
                                 "selection_reference": selection_reference(selection),
                                 "selection_sec": time.perf_counter() - t_select})
            with mid_times(method, chosen):
                x, sample_sec = sample(net, steps, ecfg.seed)
                mid_t = list(method.cfg.mid_t) if searchable(method, steps) else None
            t0 = time.perf_counter()
            value = value_of(metric, x)
            records.append({
                **metric.protocol(),
                "step": step, "ema": name, "steps": steps, "nfe": method.nfe(steps),
                "value": value, "floor": metric.floor, "num_samples": ecfg.num_samples,
                "seed": ecfg.seed, "sample_sec": sample_sec, "score_sec": time.perf_counter() - t0,
                "sample_batch_size": ecfg.batch_size, "device": str(device),
                **({"mid_t": mid_t} if mid_t is not None else {}), **protocol,
            })
            if grid_dir is not None and ecfg.grid:
                save_grid(x[:100].clamp(-1, 1), Path(grid_dir) / f"samples_{name}_{steps}step.png")
    return records
