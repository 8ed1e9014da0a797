"""The seed papers' headline claims, tested on collected runs: `claims.md` / `claims.csv`, and each
student's gap to its own teacher: `gaps.md` / `gaps.csv`.

Every claim is tested by one fixed rule on the collector's fit points (final checkpoint, EMA chosen on
the selection set), nothing tuned per claim. Effects are ratios of scores (lower is better), estimated
on the log scale with a t-interval over the training seeds, so the interval is valid at 3 seeds:

- power law: the fit's alpha and its t-interval (n - 2 dof over every seed of every budget), claim
  side alpha < 0;
- 2 steps beat 1: per seed, ln(score_2 / score_1) at the largest budget; mean +- t_{n-1} se;
- A beats B at equal compute: per seed index, the mean over the budgets both have of
  ln(score_A / score_B) (independent runs, so any pairing of seeds is valid); mean +- t_{n-1} se;
- gap to the teacher: per seed, ln(student 2-step / teacher N-step) at the largest budget (the teacher,
  one shared run, is a constant); claim side: below ln(1.10).

Verdict: `holds` when the whole interval is on the claim's side, `fails` when the whole interval is on
the other side, `inconclusive` otherwise (also when fewer than 2 seeds or points make an interval).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from harness.analysis import report
from harness.analysis.fit import FitError, fit_power_law

TEACHERS = ("edm", "trigflow")
DISPLAY = {"ct": "CT", "ict": "iCT", "ect": "ECT", "cd": "CD", "sct": "sCT", "scd": "sCD", "stable_ct": "SCT",
           "gcm": "GCM", "edm": "EDM (teacher)", "trigflow": "TrigFlow (teacher)"}
# Where each method's 1- vs 2-step claim comes from: CIFAR-10 FID 1-step -> 2-step, as transcribed in
# results/reference/ (cm_ct_cifar10, cm_cd_cifar10, cm_ict_cifar10, ect_table1_cifar10, stable_ct_table1_cifar10,
# scm_table1_cifar10, gcm_table4_cifar10).
TWO_STEP_SOURCE = {
    "ct": "CM (Song et al. 2023), CIFAR-10 CT table: CT (LPIPS) 8.70 -> 5.83",
    "cd": "CM (Song et al. 2023), CIFAR-10 CD table: CD (LPIPS) 3.55 -> 2.93",
    "ict": "iCT (Song & Dhariwal 2024), CIFAR-10 table: 2.83 -> 2.46",
    "ect": "ECT (Geng et al. 2024) Tab. 1: ECM (400k iters) 3.60 -> 2.11",
    "stable_ct": "SCT (Wang et al. 2024) Tab. 1: 3.11 -> 2.05",
    "sct": "sCM (Lu & Song 2024) Tab. 1: sCT 2.97 -> 2.06",
    "scd": "sCM (Lu & Song 2024) Tab. 1: sCD 3.66 -> 2.52",
    "gcm": "GCM guide Tab. 4: CU 2.59 -> 2.05, VU 2.53 -> 1.92",
}
TEACHER_GAP = 1.10   # sCM abstract / §6: 2-step sCD "within 10%" of the teacher's FID (specs/scm.md 8)


@dataclass(frozen=True)
class Effect:
    estimate: float      # ratio (or alpha), on the natural scale
    lo: float
    hi: float
    n: int               # seeds (or points for a fit)


def log_t_interval(logs: np.ndarray, level: float = 0.95) -> Effect:
    """exp(mean +- t_{n-1} se) of log ratios, one per seed."""
    logs = logs[np.isfinite(logs)]
    n = len(logs)
    if n == 0:
        return Effect(math.nan, math.nan, math.nan, 0)
    mean = float(logs.mean())
    if n < 2:
        return Effect(math.exp(mean), math.nan, math.nan, n)
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * logs.std(ddof=1) / math.sqrt(n))
    return Effect(math.exp(mean), math.exp(mean - half), math.exp(mean + half), n)


def verdict(lo: float, hi: float, threshold: float) -> str:
    """holds: the interval lies below threshold; fails: above it; else inconclusive."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if hi < threshold:
        return "holds"
    if lo > threshold:
        return "fails"
    return "inconclusive"


def _seed(pts: pd.DataFrame) -> pd.Series:
    return pts["cfg.seed"] if "cfg.seed" in pts else pd.Series(0, index=pts.index)


def _by_seed(pts: pd.DataFrame, method: str, nfe: int, x: str) -> pd.DataFrame:
    """score per (budget, seed) of one method and NFE (one metric, one data: the caller's group)."""
    sub = pts[(pts["method"] == method) & (pts["nfe"] == nfe)]
    return sub.assign(_seed=_seed(sub)).pivot_table(index=x, columns="_seed", values="value", aggfunc="first")


def _row(claim, source, test, effect: Effect, threshold, unit, **extra) -> dict:
    return {"claim": claim, "source": source, "test": test, "n": effect.n, "effect": effect.estimate,
            "lo": effect.lo, "hi": effect.hi, "unit": unit,
            "verdict": verdict(effect.lo, effect.hi, threshold), **extra}


def power_law_claims(pts, methods, x, level):
    rows = []
    for method in methods:
        for nfe in (1, 2):
            sub = pts[(pts["method"] == method) & (pts["nfe"] == nfe)]
            try:
                law = fit_power_law(sub[x].to_numpy(), sub["value"].to_numpy(), level=level)
                eff = Effect(law.alpha, law.alpha_lo, law.alpha_hi, law.n)
            except FitError:
                eff = Effect(math.nan, math.nan, math.nan, len(sub))
            rows.append(_row(f"{DISPLAY[method]} {nfe}-step score falls with compute as a power law",
                             "ECT (Geng et al. 2024) §4.2, Fig. 4: FD = K C^alpha, alpha < 0",
                             f"OLS of ln score on ln {x} over every budget and seed; alpha's "
                             f"{level:.0%} t-interval (n - 2 dof)", eff, 0.0, "alpha", method=method, nfe=nfe))
    return rows


def two_step_claims(pts, methods, x, level):
    rows = []
    for method in methods:
        one, two = _by_seed(pts, method, 1, x), _by_seed(pts, method, 2, x)
        common = sorted(set(one.index) & set(two.index))
        if common:
            top = common[-1]
            logs = np.log(two.loc[top].reindex(one.columns).to_numpy(float) / one.loc[top].to_numpy(float))
            eff, where = log_t_interval(logs, level), f"{x} = {report.fmt(top)}"
        else:
            eff, where = Effect(math.nan, math.nan, math.nan, 0), "no budget with both"
        rows.append(_row(f"{DISPLAY[method]}: 2 steps beat 1", TWO_STEP_SOURCE.get(method, ""),
                         f"per seed, 2-step / 1-step score at the largest budget ({where}); geometric mean "
                         f"and {level:.0%} t-interval over seeds", eff, 1.0, "ratio 2-step / 1-step",
                         method=method, nfe=2))
    return rows


def pair_claim(pts, a, b, nfe, x, level, claim, source):
    sa, sb = _by_seed(pts, a, nfe, x), _by_seed(pts, b, nfe, x)
    budgets = sorted(set(sa.index) & set(sb.index))
    seeds = sorted(set(sa.columns) & set(sb.columns))
    logs = np.array([np.nanmean(np.log(sa.loc[budgets, s].to_numpy(float) / sb.loc[budgets, s].to_numpy(float)))
                     for s in seeds]) if budgets and seeds else np.array([])
    eff = log_t_interval(logs, level)
    test = (f"per seed, the mean over the {len(budgets)} budgets both have ({x} "
            f"{report.fmt(budgets[0]) if budgets else '-'} to {report.fmt(budgets[-1]) if budgets else '-'}) of "
            f"ln({DISPLAY[a]} / {DISPLAY[b]}) at NFE {nfe}, student training only (teacher not counted); "
            f"geometric mean and {level:.0%} t-interval over seeds")
    return _row(claim, source, test, eff, 1.0, f"ratio {DISPLAY[a]} / {DISPLAY[b]}", method=f"{a} vs {b}", nfe=nfe)


def _teacher_scores(pts_all: pd.DataFrame) -> dict[str, float]:
    """{teacher run directory name: its best (largest-NFE) score} over the teacher methods."""
    out = {}
    for run_dir, grp in pts_all[pts_all["method"].isin(TEACHERS)].groupby("run_dir"):
        out[Path(str(run_dir)).name] = float(grp.sort_values("nfe")["value"].iloc[-1])
    return out


def _source_name(value) -> str:
    return Path(str(value)).name if isinstance(value, str) and value else ""


def _teacher_score(grp: pd.DataFrame, teachers: dict[str, float]) -> float | None:
    """The score of the one teacher run (cfg.teacher, else cfg.init_from) the runs of `grp` name; None when
    they name none, several, or one that is not among the collected teachers."""
    blank = [""] * len(grp)
    names = {_source_name(t) or _source_name(i)
             for t, i in zip(grp.get("cfg.teacher", blank), grp.get("cfg.init_from", blank))} - {""}
    return teachers.get(next(iter(names))) if len(names) == 1 else None


def teacher_levels(pts: pd.DataFrame) -> dict[str, float]:
    """{student method: its teacher's best score} where every run of the method has the same teacher."""
    teachers = _teacher_scores(pts)
    levels = {str(m): _teacher_score(grp, teachers) for m, grp in pts[~pts["method"].isin(TEACHERS)].groupby("method")}
    return {m: v for m, v in levels.items() if v is not None}


def teacher_gaps(pts: pd.DataFrame, x: str, level: float) -> pd.DataFrame:
    """Every student's score over its own teacher's (NFE 1 and 2, per budget, over seeds)."""
    teachers = _teacher_scores(pts)
    rows = []
    students = pts[~pts["method"].isin(TEACHERS)]
    for (method, nfe, budget), grp in students.groupby(["method", "nfe", x], sort=True):
        teacher = _teacher_score(grp, teachers)
        if teacher is None:
            continue
        eff = log_t_interval(np.log(grp["value"].to_numpy(float) / teacher), level)
        rows.append({"method": DISPLAY.get(method, method), "nfe": nfe, x: budget, "teacher_score": teacher,
                     "student_mean": float(grp["value"].mean()), "ratio": eff.estimate, "lo": eff.lo,
                     "hi": eff.hi, "seeds": eff.n})
    return pd.DataFrame(rows)


def gap_claims(pts, x, level):
    gaps = teacher_gaps(pts, x, level)
    rows = []
    for method in ("sct", "scd"):
        name = DISPLAY[method]
        sub = gaps[(gaps["method"] == name) & (gaps["nfe"] == 2)] if len(gaps) else gaps
        if len(sub):
            top = sub.sort_values(x).iloc[-1]
            eff = Effect(top["ratio"], top["lo"], top["hi"], int(top["seeds"]))
            where = f"{x} = {report.fmt(top[x])}"
        else:
            eff, where = Effect(math.nan, math.nan, math.nan, 0), "no student with a teacher"
        rows.append(_row(f"{name} 2-step within 10% of its teacher", "sCM (Lu & Song 2024) abstract, §6: "
                         "2-step FID within 10% of the teacher diffusion model's",
                         f"per seed, student 2-step / teacher N-step (Heun) score at the largest budget "
                         f"({where}); geometric mean and {level:.0%} t-interval over seeds",
                         eff, TEACHER_GAP, "ratio student / teacher", method=method, nfe=2))
    return rows, gaps


def claims_table(pts: pd.DataFrame, compute: str = "flops", level: float = 0.95,
                 x: str = "nimg") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(claims, teacher gaps) for one data/metric group of fit points: power laws against `compute` (as the
    collector's fits), budgets matched by `x` (training images: the same for every method at a grid point,
    where counted FLOPs differ by the methods' extra passes)."""
    methods = [m for m in DISPLAY if m not in TEACHERS and m in set(pts["method"])]
    rows = power_law_claims(pts, methods, compute, level) + two_step_claims(pts, methods, x, level)
    rows.append(pair_claim(pts, "ect", "ict", 2, x, level,
                           "Tuning from a diffusion model beats training from scratch at equal compute (ECT vs iCT)",
                           "ECT (Geng et al. 2024) Tab. 1, §4.1: ECT 2-step FID 2.11 at a fraction of iCT's cost"))
    rows.append(pair_claim(pts, "cd", "ct", 2, x, level,
                           "Distillation beats training at equal compute (CD vs CT)",
                           "CM (Song et al. 2023), CIFAR-10 tables: CD (LPIPS) 2.93 vs CT (LPIPS) 5.83, 2-step FID"))
    more, gaps = gap_claims(pts, x, level)
    return pd.DataFrame(rows + more), gaps


def write_claims(out: Path, pts: pd.DataFrame, compute: str, level: float, x: str = "nimg") -> tuple[dict, list[str]]:
    files, lines, tables, gap_tables = {}, [], [], []
    for (data, metric), grp in pts.groupby(["data", "metric"], sort=True):
        claims, gaps = claims_table(grp, compute, level, x)
        tables.append(claims.assign(data=data, metric=metric))
        if len(gaps):
            gap_tables.append(gaps.assign(data=data, metric=metric))
    if not tables:
        return files, lines
    claims = pd.concat(tables, ignore_index=True)
    cols = ["data", "metric", "claim", "verdict", "effect", "lo", "hi", "unit", "n", "test", "source"]
    files |= report.write_table(claims[cols], out / "claims",
                                f"The seed papers' claims tested on these runs ({level:.0%} intervals over seeds; "
                                f"holds / fails: the whole interval on the claim's side / the other side; "
                                f"else inconclusive). Rules: harness/analysis/claims.py.", csv_df=claims)
    if gap_tables:
        gaps = pd.concat(gap_tables, ignore_index=True)
        files |= report.write_table(gaps, out / "gaps", f"Each student's score over its own teacher's best "
                                    f"(largest-NFE) score, per budget ({x}): geometric mean over seeds with its "
                                    f"{level:.0%} t-interval.")
    counts = claims["verdict"].value_counts()
    lines.append("claims: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in ("holds", "fails", "inconclusive")))
    return files, lines
