"""Power-law fits of a score against training compute or model size, and the comparisons built on them.

Functional form (ECT scaling law, SEED-ECT Sec. 4.2 / Fig. 4; specs/ect_sct.md Sec. 3.12):

    y = K * (x / x0) ** alpha        e.g. FD = K * C^alpha with C = FLOPs / FLOPs at the smallest budget

fit by ordinary least squares of ln y on ln(x / x0) (scipy.stats.linregress; the paper's fit, implied: OLS
over its six points), x0 = the smallest x of the group, so C = 1 at the smallest budget and K is the
fitted score there. The slope alpha does not depend on x0 or the log base. Every point enters (every seed
of every budget). Reported with it: Pearson r between ln x and ln y, R^2 (= r^2), the two-sided p-value of
the slope (t test, n - 2 dof), the OLS standard error of alpha and a t-interval on alpha,
alpha +- t_{n-2, (1+level)/2} * se. The interval is exact for independent normal errors in ln y, so it is
valid at small n (3 seeds x 4 budgets), where a bootstrap over points is not: over three points a
bootstrap interval is a few resamples wide and excludes 0 far more often than the p-value would allow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


class FitError(ValueError):
    """Points that admit no power-law fit (fewer than two distinct x, or a non-positive value)."""


@dataclass(frozen=True)
class PowerLaw:
    K: float               # fitted y at x = x0 (C = 1)
    alpha: float           # exponent: slope of ln y on ln x
    x0: float              # normalization: the smallest x of the fitted points
    n: int                 # points fitted
    r: float               # Pearson r of (ln x, ln y)
    r2: float              # R^2 of the log-log regression
    p_value: float         # two-sided p-value of the slope (nan for n <= 2)
    alpha_se: float        # OLS standard error of alpha (nan for n <= 2)
    alpha_lo: float        # t-interval on alpha, lower end (nan for n <= 2)
    alpha_hi: float        # t-interval on alpha, upper end
    x_min: float           # fitted range
    x_max: float
    level: float = 0.95    # confidence level of [alpha_lo, alpha_hi]

    def predict(self, x):
        """y = K * (x / x0)^alpha."""
        return self.K * (np.asarray(x, dtype=float) / self.x0) ** self.alpha

    def solve(self, y: float) -> float:
        """The x at which the fitted line reaches y; inf where the fit does not fall (alpha >= 0)."""
        if not self.alpha < 0:
            return math.inf
        return float(self.x0 * (y / self.K) ** (1.0 / self.alpha))


def fit_power_law(x, y, *, level: float = 0.95) -> PowerLaw:
    """Fit y = K * (x / min x)^alpha by least squares in log-log space (see the module docstring)."""
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise FitError(f"x and y differ in length ({x.size} vs {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise FitError("a power-law fit needs finite, positive x and y")
    if x.size < 2 or np.unique(x).size < 2:
        raise FitError(f"a power-law fit needs at least two distinct x (got {np.unique(x).size})")
    if not 0.0 < level < 1.0:
        raise FitError(f"level must lie in (0, 1), got {level}")
    n = x.size
    x0 = float(x.min())
    lx, ly = np.log(x / x0), np.log(y)
    if np.ptp(ly) == 0.0:                                    # a flat line: linregress divides by var(y)
        alpha, log_k, r, p_value, alpha_se = 0.0, float(ly[0]), 0.0, 1.0, 0.0
    else:
        res = stats.linregress(lx, ly)
        alpha, log_k, r = float(res.slope), float(res.intercept), float(res.rvalue)
        p_value, alpha_se = float(res.pvalue), float(res.stderr)
    lo = hi = math.nan
    if n > 2:
        half = float(stats.t.ppf((1.0 + level) / 2.0, n - 2)) * alpha_se
        lo, hi = alpha - half, alpha + half
    else:
        p_value = alpha_se = math.nan
    return PowerLaw(K=math.exp(log_k), alpha=alpha, x0=x0, n=n, r=r, r2=r * r, p_value=p_value,
                    alpha_se=alpha_se, alpha_lo=lo, alpha_hi=hi, x_min=x0, x_max=float(x.max()), level=level)


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


FIT_COLUMNS = ["kind", "data", "metric", "method", "nfe", "held", "x", "n", "x0", "K", "alpha",
               "alpha_lo", "alpha_hi", "alpha_se", "r", "r2", "p_value", "x_min", "x_max", "note"]


def fit_groups(points: pd.DataFrame, *, kind: str, x: str, held: str,
               level: float = 0.95) -> tuple[pd.DataFrame, dict[tuple, PowerLaw]]:
    """One fit of `value` vs column `x` per (data, metric, method, nfe, <held>).

    `held` is the column kept fixed inside a fit (the model for compute fits, as ECT fixes the network;
    the training images for size fits, as ECT's Fig. 4 right fixes batch and iterations). A group with
    too few points still gets a row (with a note), so nothing disappears from the table."""
    keys = ["data", "metric", "method", "nfe", held]
    rows, laws = [], {}
    if points.empty:
        return pd.DataFrame(columns=FIT_COLUMNS), laws
    for key, grp in points.groupby(keys, sort=True, dropna=False):
        row = dict(zip(["data", "metric", "method", "nfe"], key[:4]), kind=kind, held=f"{held}={_label(key[4])}",
                   x=x, n=len(grp), note="")
        try:
            law = fit_power_law(grp[x].to_numpy(), grp["value"].to_numpy(), level=level)
        except FitError as exc:
            row["note"] = str(exc)
        else:
            laws[key] = law
            row.update({f: getattr(law, f) for f in ("x0", "K", "alpha", "alpha_lo", "alpha_hi", "alpha_se",
                                                       "r", "r2", "p_value", "x_min", "x_max")})
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=FIT_COLUMNS), laws


def matched_compute(points: pd.DataFrame, laws: dict[tuple, PowerLaw], *, x: str, held: str = "model",
                    rel_tol: float = 0.01) -> pd.DataFrame:
    """Each (method, nfe) at one compute per (data, metric, <held>): the largest x every series reaches.

    A series with a run within rel_tol of that compute reports the measured value (mean over seeds,
    `measured`); otherwise its fit's value there (`fit` inside its range, `extrapolated` outside);
    a series with one point and no run there has none (`no fit`)."""
    rows = []
    for key, grp in points.groupby(["data", "metric", held], sort=True, dropna=False):
        series = grp.groupby(["method", "nfe"], sort=True)
        x_star = float(series[x].max().min())
        for (method, nfe), s in series:
            near = s[np.abs(s[x] / x_star - 1.0) <= rel_tol]
            law = laws.get((key[0], key[1], method, nfe, key[2]))
            if len(near):
                value, source = float(near["value"].mean()), "measured"
            elif law is not None:
                value = float(law.predict(x_star))
                source = "fit" if law.x_min <= x_star <= law.x_max else "extrapolated"
            else:
                value, source = math.nan, "no fit"
            rows.append({"data": key[0], "metric": key[1], held: key[2], "method": method, "nfe": nfe,
                         "matched_" + x: x_star, "value": value, "source": source})
    return pd.DataFrame(rows)


def compute_to_target(points: pd.DataFrame, laws: dict[tuple, PowerLaw], targets: dict[tuple, float], *,
                      x: str, held: str = "model") -> pd.DataFrame:
    """The x each (method, nfe, <held>) fit needs to reach its (data, metric) target score.

    `fit` when the solution lies inside the fitted range, `extrapolated` outside it, `not reached`
    where the fit does not fall with compute; `first_measured_<x>` is the smallest measured x that
    already scores at or below the target (empty where none does)."""
    rows = []
    for key, grp in points.groupby(["data", "metric", "method", "nfe", held], sort=True, dropna=False):
        target = targets.get((key[0], key[1]))
        if target is None:
            continue
        law = laws.get(key)
        hit = grp.loc[grp["value"] <= target, x]
        row = {"data": key[0], "metric": key[1], held: key[4], "method": key[2], "nfe": key[3],
               "target": target, x + "_needed": math.nan, "source": "no fit",
               "first_measured_" + x: float(hit.min()) if len(hit) else math.nan}
        if law is not None:
            need = law.solve(target)
            row[x + "_needed"] = need
            if math.isinf(need):
                row["source"] = "not reached"
            else:
                row["source"] = "fit" if law.x_min <= need <= law.x_max else "extrapolated"
        rows.append(row)
    return pd.DataFrame(rows)
