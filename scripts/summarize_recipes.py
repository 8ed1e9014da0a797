"""Summarize the recipe sweep (sweeps/recipes_digits.yaml) as the README's table, and apply its rule.

    .venv/bin/python scripts/summarize_recipes.py results/sweeps/recipes_digits

One row per (method, learning rate, budget): the geometric mean over seeds of the final score at 1 and 2
steps on the selection set (training digits: what the choice uses) and on the held-out digits (what the main
job reports), with 95% t-intervals over seeds, and the number of seeds. Then the rule, the same for every
method: the learning rate with the lowest mean log selection score over budgets, 1 and 2 steps and seeds.
EMA and mid-point are chosen on the selection set, as the collector does.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from harness.analysis.claims import log_t_interval
from harness.analysis.collect import CollectConfig, fit_points
from harness.analysis.runs import load_runs


def _cell(values) -> str:
    eff = log_t_interval(np.log(np.asarray(values, float)))
    return f"{eff.estimate:.0f} [{eff.lo:.0f}, {eff.hi:.0f}]"


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
    print("| method | lr | steps | selection, 1 step | selection, 2 steps | held-out, 1 step | held-out, 2 steps "
          "| seeds |")
    print("|---|---|---|---|---|---|---|---|")
    for (method, lr, steps), grp in pts.groupby(["method", "cfg.trainer.lr", "train_steps"], sort=True):
        cells = [_cell(grp.loc[grp["nfe"] == nfe, col]) for col in ("selection_value", "value") for nfe in (1, 2)]
        print(f"| {method} | {lr:g} | {int(steps)} | {' | '.join(cells)} | {grp['cfg.seed'].nunique()} |")
    print("\nChosen (lowest mean log selection score over budgets, 1 and 2 steps, seeds):\n")
    print("| method | lr | mean log selection score per lr |")
    print("|---|---|---|")
    for method, grp in pts.groupby("method", sort=True):
        means = np.log(grp["selection_value"].astype(float)).groupby(grp["cfg.trainer.lr"]).mean()
        detail = ", ".join(f"{lr:g}: {m:.3f}" for lr, m in means.items())
        print(f"| {method} | {means.idxmin():g} | {detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
