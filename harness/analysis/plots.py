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


def _palette(points: pd.DataFrame) -> dict:
    methods = sorted(points["method"].astype(str).unique())
    return dict(zip(methods, sns.color_palette("colorblind", len(methods))))


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
        fig, axes = _facets(points["nfe"].unique())
        for nfe, ax in axes.items():
            sub = points[points["nfe"] == nfe].assign(**{held: lambda d: d[held].map(_label)})
            sns.scatterplot(data=sub, x=x, y="value", hue="method", style=held, palette=palette,
                            markers=markers, hue_order=list(palette), style_order=list(markers), ax=ax,
                            legend=nfe == min(axes), rasterized=len(sub) > _RASTER_ABOVE)
            notes = []
            for key, law in sorted(laws.items(), key=lambda kv: str(kv[0])):
                if key[3] != nfe or key[1] != metric or str(key[2]) not in palette:
                    continue
                grid = np.geomspace(law.x_min, law.x_max, 50)
                ax.plot(grid, law.predict(grid), color=palette[str(key[2])], lw=1.2, label=None)
                notes.append(f"{key[2]} {_label(key[4])}: $\\alpha$ = {law.alpha:.3f}")
            if notes:
                more = [f"... {len(notes) - 6} more fits"] if len(notes) > 6 else []
                ax.text(0.02, 0.02, "\n".join(notes[:6] + more), transform=ax.transAxes, fontsize=6,
                        va="bottom", ha="left")
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
        palette = _palette(wide)
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
