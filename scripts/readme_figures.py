"""Figures for the README from finished runs of the main job (results/sweeps/scaling/).

    .venv/bin/python scripts/readme_figures.py [SWEEP_DIR]

Writes docs/figures/: the score curves of the teacher and ECT runs (from metrics.jsonl) and copies
of the 2-step sample grids, beside a grid of real held-out digits.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "figures"


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval/value" in r]


def main(sweep: Path) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for stage, ax in zip(("teacher", "ect"), axes):
        for run in sorted(sweep.glob(f"{stage}-*")):
            rows = evals(run)
            for steps in sorted({r["eval/steps"] for r in rows}):
                pts = sorted((r["step"], r["eval/value"]) for r in rows if r["eval/steps"] == steps)
                nfe = next(r["eval/nfe"] for r in rows if r["eval/steps"] == steps)
                ax.plot(*zip(*pts), marker="o", label=f"{run.name.split('-', 1)[1]}, NFE {nfe}")
            floor = rows[0]["eval/floor"]
        ax.axhline(floor, color="k", ls=":", label="floor (held-out vs train)")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("pixel Frechet distance to held-out digits")
        ax.set_title({"teacher": "EDM teacher", "ect": "ECT tuned from the teacher"}[stage])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "digits_curves.png", dpi=110)
    for run in sorted(sweep.glob("*-unet-s")):
        for grid in run.glob("samples_*.png"):
            shutil.copy(grid, OUT / f"{run.name}_{grid.name}")
    from harness.data import DATASETS, load_dataset
    from harness.eval.grid import save_grid
    save_grid(load_dataset(DATASETS["digits"]).heldout_x[:100], OUT / "real_heldout_digits.png")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/sweeps/scaling"))
