"""`python -m harness.collect RESULTS_DIR [--out DIR] [--metric M] [--target X] [--compute flops|nimg] [--protocol P]`

Reads every run directory under RESULTS_DIR (harness.analysis.runs), fits power laws per method and NFE
(harness.analysis.fit: score = K * C^alpha in log-log least squares, C = compute / the smallest budget), and
writes under --out (default RESULTS_DIR/collected/):

    runs.csv                 every score record of every completed run, config keys as cfg.<key>
    runs.md / runs.tex       one row per run: setup and its best score per metric and NFE
    fits.{csv,md,tex}        compute fits (model fixed) and model-size fits (training images fixed)
    alphas.{csv,md,tex}      the compute exponents with their intervals, a column per NFE
    claims.{csv,md,tex}      the seed papers' headline claims tested, with intervals and verdicts
    gaps.{csv,md,tex}        each student's score over its own teacher's
    matched.{csv,md,tex}     methods x NFE at matched compute
    target.{csv,md,tex}      the compute each method needs to reach a target score
    problems.{csv,md}        unfinished, failed and unreadable runs
    plots/*.png, *.pdf       score vs compute and vs parameters (log-log, with the fits), 2- vs 1-step
    files.txt                the list of files written

Only final-checkpoint scores enter the fits (a score whose step is the run's last step), one per run,
metric and NFE: the best EMA's (`ema="best"`, the default: chosen by the selection score of
harness.eval.select where the runs have one, else by the score itself) or a named EMA's. Scores are
each run's own protocol unless --protocol names a re-score's (evaluate-<id>.json) or `all` (reported as
mixing). A RESULTS_DIR with no run directory is an error. Same runs, same bytes.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from harness import version
from harness.analysis import claims, report
from harness.analysis.fit import compute_to_target, fit_groups, matched_compute
from harness.analysis.runs import load_runs

__all__ = ["CollectConfig", "CollectError", "collect", "fit_points", "load_runs", "main"]


class CollectError(ValueError):
    """Bad input to the collector: the message is one line naming what was wrong."""


@dataclass(frozen=True)
class CollectConfig:
    metric: str | None = None        # fit and plot only this metric (default: every metric found)
    target: float | None = None      # score to reach in target.* (default: target_factor x best 2-step score)
    target_factor: float = 1.5       # default target = this x the best 2-step score of each data/metric
    compute: str = "flops"           # compute axis: flops (counted training FLOPs) | nimg (training images)
    ema: str = "best"                # per run: best (lowest selection score, else score, over EMAs) | a name
    level: float = 0.95              # confidence level of the t-interval on alpha
    plots: bool = True               # write plots/
    # which scores: run (each run's own protocol: result.json, re-scored in place by evaluate.json), a
    # re-score's protocol id (evaluate-<id>.json) or all (every one; the report says that it mixes them)
    protocol: str = "run"

    def check(self) -> None:
        if self.compute not in ("flops", "nimg"):
            raise CollectError(f"compute must be flops or nimg, got {self.compute!r}")
        if not 0.0 < self.level < 1.0:
            raise CollectError(f"level must lie strictly between 0 and 1, got {self.level}")
        if self.target is not None and not (math.isfinite(self.target) and self.target > 0):
            raise CollectError(f"target must be a positive number, got {self.target}")


def fit_points(df: pd.DataFrame, cfg: CollectConfig) -> pd.DataFrame:
    """One final-checkpoint score per (run, metric, NFE): finite, positive, the chosen EMA's."""
    pts = df[pd.to_numeric(df["value"], errors="coerce").gt(0) & df["value"].lt(math.inf)]
    pts = pts[pts["step"].isna() | pts["train_steps"].isna() | (pts["step"] == pts["train_steps"])]
    if cfg.metric is not None:
        pts = pts[pts["metric"] == cfg.metric]
    if cfg.ema == "best":
        # the EMA with the best selection score (harness.eval.select) where the run has one, so the choice
        # never looks at the reported score; older runs without it fall back to the lowest reported score
        pts = pts.assign(_choose=pd.to_numeric(pts.get("selection_value", pts["value"]), errors="coerce")
                         .fillna(pts["value"]))
        pts = pts.sort_values(["run", "metric", "nfe", "_choose", "ema"], kind="stable")
        pts = pts.drop_duplicates(["run", "metric", "nfe"], keep="first").drop(columns="_choose")
    else:
        pts = pts[pts["ema"] == cfg.ema]
    return pts.sort_values(["data", "metric", "method", "nfe", "run"], kind="stable").reset_index(drop=True)


def _targets(pts: pd.DataFrame, cfg: CollectConfig) -> tuple[dict, str]:
    if cfg.target is not None:
        return {k: cfg.target for k, _ in pts.groupby(["data", "metric"], sort=True)}, f"target {cfg.target:g}"
    out = {}
    for key, grp in pts.groupby(["data", "metric"], sort=True):
        two = grp[grp["nfe"] == 2]
        out[key] = cfg.target_factor * float((two if len(two) else grp)["value"].min())
    return out, f"target = {cfg.target_factor:g} x the best 2-step score (best score where no 2-step run exists)"


def _slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def _matched_wide(matched: pd.DataFrame, x: str) -> pd.DataFrame:
    if matched.empty:
        return matched
    m = matched.assign(cell=[report.fmt(v) + ("" if s == "measured" else f" ({s})")
                             for v, s in zip(matched["value"], matched["source"])])
    wide = m.pivot_table(index=["data", "metric", "model", "matched_" + x, "method"], columns="nfe",
                         values="cell", aggfunc="first")
    wide.columns = [f"NFE {report.fmt(c)}" for c in wide.columns]
    return wide.reset_index()


def _alphas_wide(cfits: pd.DataFrame) -> pd.DataFrame:
    """One row per (data, metric, model, method), a column per NFE: 'alpha [lo, hi] (n)'."""
    from harness.analysis.claims import DISPLAY
    if cfits.empty:
        return pd.DataFrame(columns=["data", "metric", "held", "method"])
    cell = [f"{report.fmt(a, 3)} [{report.fmt(lo, 3)}, {report.fmt(hi, 3)}] ({n})" if isinstance(a, float)
            and math.isfinite(a) else f"- ({n})" for a, lo, hi, n in
            zip(cfits["alpha"], cfits["alpha_lo"], cfits["alpha_hi"], cfits["n"])]
    wide = cfits.assign(cell=cell, method=cfits["method"].map(lambda m: DISPLAY.get(m, m))).pivot_table(
        index=["data", "metric", "held", "method"], columns="nfe", values="cell", aggfunc="first")
    wide.columns = [f"NFE {report.fmt(c)}" for c in wide.columns]
    return wide.reset_index()


def _write_fits(out: Path, df: pd.DataFrame, pts: pd.DataFrame, cfg: CollectConfig) -> tuple[dict, list[str]]:
    x = cfg.compute
    files, lines = {}, []
    cpts = pts[pts[x].gt(0)]
    spts = pts[pts["num_params"].gt(0)]
    cfits, claws = fit_groups(cpts, kind="compute", x=x, held="model", level=cfg.level)
    sfits, slaws = fit_groups(spts, kind="size", x="num_params", held="nimg", level=cfg.level)
    fits = pd.concat([f for f in (cfits, sfits) if not f.empty], ignore_index=True) \
        if not (cfits.empty and sfits.empty) else cfits
    form = (f"score = K * (x / x0)^alpha, OLS in log-log space, x0 = the smallest x of each fit; "
            f"compute fits hold the model fixed (x = {x}), size fits hold the training images fixed "
            f"(x = num_params); every seed of every budget is a point; [alpha_lo, alpha_hi] is the "
            f"{cfg.level:.0%} t-interval on alpha (n - 2 degrees of freedom).")
    md_cols = ["kind", "data", "metric", "method", "nfe", "held", "n", "x0", "K", "alpha", "alpha_lo",
               "alpha_hi", "r", "r2", "p_value", "note"]
    files |= report.write_table(fits[md_cols], out / "fits", "Power-law fits: " + form, csv_df=fits)
    students = cfits[~cfits["method"].isin(claims.TEACHERS)] if not cfits.empty else cfits
    files |= report.write_table(_alphas_wide(students), out / "alphas",
                                f"Compute exponents alpha [{cfg.level:.0%} t-interval] (points) per consistency method, "
                                f"NFE and model: score = K * C^alpha, C = {x} / the smallest; fits.md has K, r "
                                f"and p.")
    matched = matched_compute(cpts, claws, x=x)
    files |= report.write_table(_matched_wide(matched, x), out / "matched",
                                f"Score at matched compute ({x}): per data, metric and model, the largest "
                                f"{x} every method and NFE reaches; a plain number is a measured run "
                                f"(within 1%, mean over seeds), (fit) the power law inside its range, "
                                f"(extrapolated) outside it.", csv_df=matched)
    targets, rule = _targets(pts, cfg)
    need = compute_to_target(cpts, claws, targets, x=x)
    files |= report.write_table(need, out / "target", f"Compute ({x}) each method needs to reach the target "
                                f"score, from its fit; {rule}. first_measured_{x}: the smallest measured "
                                f"{x} already at or below the target.")
    for row in fits.itertuples(index=False):
        if isinstance(row.alpha, float) and math.isfinite(row.alpha):
            lines.append(f"  {row.kind:7s} {row.data} {row.metric} {row.method} NFE {report.fmt(row.nfe)} "
                         f"{row.held}: K={report.fmt(row.K)} alpha={report.fmt(row.alpha)} "
                         + (f"[{report.fmt(row.alpha_lo)}, {report.fmt(row.alpha_hi)}] "
                            if math.isfinite(row.alpha_lo) else "")
                         + f"r={report.fmt(row.r)} n={row.n}")
    more, claim_lines = claims.write_claims(out, pts, x, cfg.level)
    files |= more
    lines += claim_lines
    if cfg.plots:
        files |= _write_plots(out, pts, claws, slaws, x)
    unfitted = len(fits) - len(claws) - len(slaws)
    note = f"; {unfitted} groups with too few points listed unfitted in fits.md" if unfitted else ""
    return files, [f"fits: {len(claws)} compute, {len(slaws)} size{note}"] + lines


def _write_plots(out: Path, pts: pd.DataFrame, claws: dict, slaws: dict, x: str) -> dict:
    from harness.analysis import plots   # matplotlib only when plotting
    files = {}
    for (data, metric), grp in pts.groupby(["data", "metric"], sort=True):
        laws_c = {k: v for k, v in claws.items() if k[0] == data and k[1] == metric}
        laws_s = {k: v for k, v in slaws.items() if k[0] == data and k[1] == metric}
        tag = _slug(data, metric)
        for kind, xcol, held, laws in (("compute", x, "model", laws_c), ("size", "num_params", "nimg", laws_s)):
            sub = grp[grp[xcol].gt(0)]
            if len(sub):
                got = plots.plot_scaling(sub, laws, x=xcol, held=held, metric=metric,
                                         stem=out / "plots" / f"{kind}_{tag}", title=f"{data}: {metric} vs {xcol}")
                files |= {f"plots/{k}": v for k, v in got.items()}
        got = plots.plot_steps(grp, metric=metric, stem=out / "plots" / f"steps_{tag}",
                               title=f"{data}: 2-step vs 1-step")
        files |= {f"plots/{k}": v for k, v in got.items()}
        for model, sub in grp[grp[x].gt(0)].groupby("model", sort=True):
            got = plots.plot_methods(sub, x=x, metric=metric, teacher_levels=claims.teacher_levels(sub),
                                     stem=out / "plots" / f"methods_{_slug(data, metric, model)}",
                                     title=f"{data}, {model}: {metric} vs {x} per method (every seed a point; "
                                           f"fit with its 95% band)")
            files |= {f"plots/{k}": v for k, v in got.items()}
    return files


def collect(root: str | Path, out: str | Path | None = None, config: CollectConfig | None = None,
            **overrides) -> dict[str, Path]:
    """Collect every run under root into tables, fits and plots under out (default root/collected/).

    Returns {file name relative to out: path}; an empty dict when root holds no run directory."""
    files, _ = _collect(root, out, replace(config or CollectConfig(), **overrides))
    return files


def _collect(root, out, cfg: CollectConfig) -> tuple[dict[str, Path], list[str]]:
    cfg.check()
    root = Path(root)
    if not root.is_dir():
        raise CollectError(f"results directory {root} does not exist (or is not a directory)")
    out = Path(out) if out is not None else root / "collected"
    df, problems = load_runs(root, skip=(out,), protocol=cfg.protocol)
    n_dirs = df["run"].nunique() + len({p["run"] for p in problems} - set(df["run"]))
    if n_dirs == 0:
        raise CollectError(f"no run directories under {root} (a run directory holds config.yaml or "
                           f"result.json); nothing written")
    if cfg.metric is not None and cfg.metric not in set(df["metric"]):
        raise CollectError(f"metric {cfg.metric!r} is not in the runs under {root}; found: "
                           f"{', '.join(sorted(map(str, set(df['metric'])))) or 'none'}")
    if cfg.ema != "best" and cfg.ema not in set(df["ema"]):
        raise CollectError(f"ema {cfg.ema!r} is not in the runs under {root}; valid: best, "
                           f"{', '.join(sorted(map(str, set(df['ema'])))) or '(no scores)'}")
    files = report.write_table(report.run_summary(df), out / "runs",
                               f"Completed runs under {root.name or root}: best score per metric and NFE "
                               f"over EMAs.", csv_df=df.drop(columns=["run_dir"]))
    prob = pd.DataFrame(problems, columns=["run", "problem"])
    files["problems.csv"] = report.write_text(out / "problems.csv", report.to_csv(prob))
    files["problems.md"] = report.write_text(out / "problems.md", report.problems_markdown(problems, n_dirs))
    completed = df["run"].nunique()
    lines = [f"{n_dirs} run directories under {root}: {completed} completed with scores "
             f"({len(df)} score rows), {len(problems)} problems"
             + (f" (see {out / 'problems.md'})" if problems else "")]
    mixed = sorted(set(df["protocol"].dropna()))
    if len(mixed) > 1:
        lines.append(f"note: the scores mix {len(mixed)} protocols ({', '.join(mixed)}); fits pool them "
                     f"(--protocol run or --protocol ID keeps one)")
    pts = fit_points(df, cfg)
    if pts.empty:
        lines.append("no final scores to fit")
    else:
        more, fit_lines = _write_fits(out, df, pts, cfg)
        files |= more
        lines += fit_lines[:21] + ([f"  ... {len(fit_lines) - 21} more in fits.md"] if len(fit_lines) > 21 else [])
    files["files.txt"] = out / "files.txt"
    report.write_text(out / "files.txt", "".join(f"{k}\n" for k in sorted(files)))
    lines.append(f"wrote {len(files)} files to {out}")
    return dict(sorted(files.items())), lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.collect", description=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir", help="directory searched (recursively) for run directories")
    ap.add_argument("--out", default=None, help="output directory (default RESULTS_DIR/collected)")
    ap.add_argument("--metric", default=None, help="fit and plot only this metric (default: all)")
    ap.add_argument("--target", type=float, default=None,
                    help="target score for target.* (default: 1.5 x the best 2-step score)")
    ap.add_argument("--compute", default="flops", choices=["flops", "nimg"], help="compute axis")
    ap.add_argument("--ema", default="best", help="EMA whose score is fitted (default: best per run)")
    ap.add_argument("--no-plots", action="store_true", help="skip plots")
    ap.add_argument("--protocol", default="run",
                    help="scores used: run (each run's own, default), a re-score's id (evaluate-ID.json), or all")
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    args = ap.parse_args(argv)
    cfg = CollectConfig(metric=args.metric, target=args.target, compute=args.compute, ema=args.ema,
                        plots=not args.no_plots, protocol=args.protocol)
    try:
        _, lines = _collect(args.results_dir, args.out, cfg)
    except CollectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
