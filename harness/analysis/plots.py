"""Seaborn plots of collected runs (Agg backend): score vs compute and vs model size in log-log with the
fitted power laws, and 1-step vs 2-step scores. PNG and PDF, written with fixed metadata (no dates), so
the same runs give the same bytes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import ticker  # noqa: E402
from scipy import stats  # noqa: E402

from harness.analysis.fit import PowerLaw  # noqa: E402

_METADATA = {"png": {"Software": "cmbench"},
             "pdf": {"Creator": "cmbench", "Producer": "cmbench", "CreationDate": None}}
_RC = {"svg.hashsalt": "cmbench", "pdf.fonttype": 42, "font.family": "DejaVu Sans", "font.size": 9}
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_RASTER_ABOVE = 1000     # scatter points per panel past which they are drawn as an image inside the PDF
_X_LABELS = {"flops": "training FLOPs (counted)", "nimg": "training images", "num_params": "parameters"}


def save(fig, stem: Path) -> dict[str, Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for ext in ("png", "pdf"):
        path = stem.with_suffix("." + ext)
        fig.savefig(path, format=ext, dpi=120, metadata=_METADATA[ext])
        out[path.name] = path
    plt.close(fig)
    return out


# One colour per method in every figure: a fixed palette keyed by method (colorblind-safe), so a method
# keeps its colour whichever methods a figure shows; unknown methods take the remaining colours in order.
METHOD_ORDER = ("ect", "stable_ct", "cd", "sct", "scd", "ct", "ict", "gcm", "edm", "trigflow")
_COLORS = sns.color_palette("colorblind", 10)
METHOD_COLORS = dict(zip(METHOD_ORDER, _COLORS))


def _palette(points: pd.DataFrame) -> dict:
    methods = sorted(points["method"].astype(str).unique(),
                     key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m))
    spare = iter(sns.color_palette("dark", 10))
    return {m: METHOD_COLORS[m] if m in METHOD_COLORS else next(spare) for m in methods}


def display(method: str) -> str:
    from harness.analysis.claims import DISPLAY
    return DISPLAY.get(method, method)


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _markers(values) -> dict:
    values = sorted(set(values), key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
    labels = list(dict.fromkeys(_label(v) for v in values))
    return {v: _MARKERS[i % len(_MARKERS)] for i, v in enumerate(labels)}


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """1-2-5 ticks written as plain numbers where the data span under two decades (else matplotlib's)."""
    if lo > 0 and hi / lo < 100:
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(ticker.NullFormatter())


def _facets(nfes) -> tuple:
    nfes = sorted(nfes)
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.0 * len(nfes) + 1.2, 3.4), squeeze=False,
                             layout="constrained")
    return fig, dict(zip(nfes, axes[0]))


def plot_scaling(points: pd.DataFrame, laws: dict[tuple, PowerLaw], *, x: str, held: str, metric: str,
                 stem: Path, title: str) -> dict[str, Path]:
    """Score vs x per NFE (one panel each), a colour per method, a marker per `held` value, fit lines."""
    with plt.rc_context(_RC):
        palette, markers = _palette(points), _markers(points[held])
        shown = {display(m): c for m, c in palette.items()}
        fig, axes = _facets(points["nfe"].unique())
        for nfe, ax in axes.items():
            sub = points[points["nfe"] == nfe].assign(**{held: lambda d: d[held].map(_label)},
                                                      method=lambda d: d["method"].astype(str).map(display))
            sns.scatterplot(data=sub, x=x, y="value", hue="method", style=held, palette=shown,
                            markers=markers, hue_order=list(shown), style_order=list(markers), ax=ax,
                            legend=nfe == min(axes), rasterized=len(sub) > _RASTER_ABOVE)
            for key, law in sorted(laws.items(), key=lambda kv: str(kv[0])):     # alphas: alphas.md
                if key[3] != nfe or key[1] != metric or str(key[2]) not in palette:
                    continue
                grid = np.geomspace(law.x_min, law.x_max, 50)
                ax.plot(grid, law.predict(grid), color=palette[str(key[2])], lw=1.2, label=None)
            ax.set(xscale="log", yscale="log", title=f"NFE {nfe:g}", xlabel=_X_LABELS.get(x, x),
                   ylabel=metric)
            _plain_log_ticks(ax.yaxis, float(sub["value"].min()), float(sub["value"].max()))
        first = axes[min(axes)]
        if first.get_legend() is not None:
            handles, labels = first.get_legend_handles_labels()
            first.get_legend().remove()
            fig.legend(handles, labels, loc="outside right center", fontsize=7, frameon=False)
        fig.suptitle(title, fontsize=9)
        return save(fig, stem)


def plot_steps(points: pd.DataFrame, *, metric: str, stem: Path, title: str) -> dict[str, Path]:
    """2-step vs 1-step score of each run (best EMA of each), with the diagonal."""
    wide = points.pivot_table(index=["run", "method"], columns="nfe", values="value", aggfunc="min")
    if not {1.0, 2.0} <= set(wide.columns):
        return {}
    wide = wide[[1.0, 2.0]].dropna().rename(columns={1.0: "one", 2.0: "two"}).reset_index()
    if wide.empty:
        return {}
    with plt.rc_context(_RC):
        palette = {display(m): c for m, c in _palette(wide).items()}
        wide = wide.assign(method=wide["method"].astype(str).map(display))
        fig, ax = plt.subplots(figsize=(4.0, 3.6), layout="constrained")
        sns.scatterplot(data=wide, x="one", y="two", hue="method", palette=palette, hue_order=list(palette),
                        ax=ax, rasterized=len(wide) > _RASTER_ABOVE)
        lo = float(min(wide["one"].min(), wide["two"].min())) * 0.9
        hi = float(max(wide["one"].max(), wide["two"].max())) * 1.1
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--", label="2-step = 1-step")
        ax.set(xscale="log", yscale="log", xlabel=f"{metric}, 1 step", ylabel=f"{metric}, 2 steps",
               title=title)
        _plain_log_ticks(ax.xaxis, lo, hi)
        _plain_log_ticks(ax.yaxis, lo, hi)
        ax.legend(fontsize=7, frameon=False)
        return save(fig, stem)


def _band(x: np.ndarray, y: np.ndarray, grid: np.ndarray, level: float):
    """The fitted line and its pointwise t confidence band (n - 2 dof) of ln y on ln x, at `grid`."""
    lx, ly = np.log(x), np.log(y)
    n = len(lx)
    slope, icept = np.polyfit(lx, ly, 1)
    resid = ly - (icept + slope * lx)
    s = np.sqrt(resid @ resid / (n - 2))
    sxx = ((lx - lx.mean()) ** 2).sum()
    lg = np.log(grid)
    half = stats.t.ppf((1 + level) / 2, n - 2) * s * np.sqrt(1 / n + (lg - lx.mean()) ** 2 / sxx)
    fit = icept + slope * lg
    return np.exp(fit), np.exp(fit - half), np.exp(fit + half)


def plot_methods(points: pd.DataFrame, *, x: str, metric: str, teacher_levels: dict[str, float], stem: Path,
                 title: str, level: float = 0.95) -> dict[str, Path]:
    """Small multiples, one panel per consistency method: score vs x at NFE 1 (circles, solid) and NFE 2
    (triangles, dashed), every seed a point, the power-law fit with its {level} confidence band over the
    measured range, and the method's own teacher's best score as a grey line. Teachers get no panel."""
    students = points[~points["method"].isin(("edm", "trigflow"))]
    if students.empty:
        return {}
    palette = _palette(students)
    methods = list(palette)
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    styles = {1: ("o", "-"), 2: ("^", "--")}
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.3 * rows + 0.4), squeeze=False,
                                 sharex=True, layout="constrained")
        for ax in axes.flat[len(methods):]:
            ax.set_visible(False)
        for ax, method in zip(axes.flat, methods):
            color = palette[method]
            for nfe, (marker, ls) in styles.items():
                sub = students[(students["method"] == method) & (students["nfe"] == nfe)]
                if sub.empty:
                    continue
                xs, ys = sub[x].to_numpy(float), sub["value"].to_numpy(float)
                ax.scatter(xs, ys, color=color, marker=marker, s=12, alpha=0.8, linewidths=0)
                if len(set(xs)) >= 2 and len(xs) >= 3:
                    grid = np.geomspace(xs.min(), xs.max(), 40)
                    fit, lo, hi = _band(xs, ys, grid, level)
                    ax.plot(grid, fit, color=color, ls=ls, lw=1.1)
                    ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0)
            if method in teacher_levels:
                ax.axhline(teacher_levels[method], color="0.45", lw=0.9, ls=":")
            ax.set(xscale="log", yscale="log", title=display(method))
            values = students.loc[students["method"] == method, "value"]
            _plain_log_ticks(ax.yaxis, float(values.min()), float(values.max()))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())      # decades only: minor labels collide
            ax.tick_params(labelsize=7)
        for ax in axes[-1]:
            ax.set_xlabel(_X_LABELS.get(x, x), fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel(metric, fontsize=8)
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color="0.3", marker=m, ls=ls, ms=4, lw=1, label=f"{nfe} step{'s' * (nfe > 1)}")
                   for nfe, (m, ls) in styles.items()]
        handles.append(Line2D([], [], color="0.45", ls=":", lw=0.9, label="its teacher (Heun)"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=7, frameon=False)
        fig.suptitle(title, fontsize=9)
        return save(fig, stem)
