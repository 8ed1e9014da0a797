"""Writing collected tables as CSV (full precision), Markdown and LaTeX (4 significant digits).

Output is a pure function of the table: fixed row order, fixed number formats, "\\n" line ends, no
timestamps, so collecting the same runs twice writes the same bytes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def fmt(value: Any, digits: int = 4) -> str:
    """One cell: floats to `digits` significant digits (scientific from 1e6 or under 1e-3), NaN/None empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    if hasattr(value, "item"):          # numpy scalars
        return fmt(value.item(), digits)
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(df: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    cols = [str(c) for c in df.columns]
    align = "".join("r" if pd.api.types.is_numeric_dtype(df[c]) else "l" for c in df.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in cols) + r" \\", r"\midrule"]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(tex_escape(fmt(v)) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(df: pd.DataFrame) -> str:
    return df.to_csv(index=False, lineterminator="\n")


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
    return path


def write_table(df: pd.DataFrame, stem: Path, caption: str, *, csv_df: pd.DataFrame | None = None,
                formats: tuple[str, ...] = ("csv", "md", "tex")) -> dict[str, Path]:
    """stem.csv (csv_df if given, else df, full precision), stem.md (caption, then the table), stem.tex."""
    out = {}
    name = stem.name
    if "csv" in formats:
        out[f"{name}.csv"] = write_text(stem.with_suffix(".csv"), to_csv(df if csv_df is None else csv_df))
    if "md" in formats:
        out[f"{name}.md"] = write_text(stem.with_suffix(".md"), f"{caption}\n\n{to_markdown(df)}")
    if "tex" in formats:
        out[f"{name}.tex"] = write_text(stem.with_suffix(".tex"), to_latex(df, caption, f"tab:{name}"))
    return out


def run_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its setup and, per (metric, NFE), its best score over EMAs."""
    if df.empty:
        return pd.DataFrame(columns=["run", "method", "model", "data", "num_params", "nimg", "flops",
                                     "train_sec"])
    keys = ["run", "method", "model", "data", "num_params", "nimg", "flops", "train_sec"]
    runs = df[keys].drop_duplicates("run").set_index("run")
    best = df.groupby(["run", "metric", "nfe"], sort=True)["value"].min().reset_index()
    best["col"] = best["metric"].astype(str) + " NFE " + best["nfe"].map(fmt)
    wide = best.pivot(index="run", columns="col", values="value")
    wide = wide.reindex(columns=sorted(wide.columns, key=_col_order))
    return runs.join(wide).reset_index().sort_values("run", kind="stable")


def _col_order(col: str) -> tuple:
    metric, _, nfe = col.rpartition(" NFE ")
    try:
        return metric, float(nfe), ""
    except ValueError:
        return metric, math.inf, nfe


def problems_markdown(problems: list[dict], n_runs: int) -> str:
    head = f"# Problems\n\n{n_runs} run directories found; {len(problems)} problems"
    if not problems:
        return head + ": none.\n"
    rows = pd.DataFrame([{"run": p["run"], "problem": p["problem"]} for p in problems])
    return head + ". Runs listed here contribute only the scores they could be read for.\n\n" \
        + to_markdown(rows)
