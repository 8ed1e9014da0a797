"""Summarize the recipe sweep (sweeps/recipes_digits.yaml) as the README's table.

    .venv/bin/python scripts/summarize_recipes.py results/sweeps/recipes_digits

One row per (method, learning rate, budget): the geometric mean over seeds of the final score at 1 and 2
steps (EMA and mid-point chosen on the selection set, as the collector does) with its 95% t-interval
over seeds, and the number of seeds.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from harness.analysis.claims import log_t_interval
from harness.analysis.collect import CollectConfig, fit_points
from harness.analysis.runs import load_runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="the recipe sweep's directory")
    args = ap.parse_args(argv)
    df, _ = load_runs(args.root)
    pts = fit_points(df, CollectConfig())
    pts = pts[~pts["method"].isin(("edm", "trigflow"))]
    if pts.empty:
        print(f"error: no finished student runs under {args.root}", file=sys.stderr)
        return 2
    print("| method | lr | steps | 1 step | 2 steps | seeds |")
    print("|---|---|---|---|---|---|")
    for (method, lr, steps), grp in pts.groupby(["method", "cfg.trainer.lr", "train_steps"], sort=True):
        cells = []
        for nfe in (1, 2):
            v = grp.loc[grp["nfe"] == nfe, "value"].to_numpy(float)
            eff = log_t_interval(np.log(v))
            cells.append(f"{eff.estimate:.0f} [{eff.lo:.0f}, {eff.hi:.0f}]")
        print(f"| {method} | {lr:g} | {int(steps)} | {cells[0]} | {cells[1]} | {grp['cfg.seed'].nunique()} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
