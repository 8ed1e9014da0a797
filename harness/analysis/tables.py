"""The papers' tables in their own layout, with this harness's measured numbers in added columns.

    python -m harness.tables [RESULTS_DIR] --paper ect|stable_ct|scm|gcm|cm|all [--latex] [--out DIR]

Tables come from results/reference/ (harness.analysis.reference); printed, or with --out written to
DIR/tables-<paper>.md (.tex with --latex). With RESULTS_DIR, the collector's DataFrame
(harness.analysis.collect.load_runs) is matched to each table by dataset, metric, class conditioning, the row's
method (registry name) and NFE; each cmbench cell is the lowest final-checkpoint score over the
matching runs and their EMAs. Measured methods a table does not list get added rows 'cmbench: <method>'.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness import version
from harness.analysis.reference import PAPERS, ReferenceError, Table, cell_values, load_tables

PAPER_NAMES = {"ect": "ECT", "stable_ct": "SCT", "scm": "sCM", "gcm": "GCM", "cm": "CM slides"}  # as the papers write them
PAPER_TITLES = {  # the seed papers (results/reference/*.yaml `source.seed`)
    "ect": "ECT: Consistency Models Made Easy",
    "stable_ct": "SCT: Stable Consistency Tuning",
    "scm": "sCM: Simplifying, Stabilizing & Scaling Continuous-Time Consistency Models",
    "gcm": "GCM: A Guide to Training Consistency Models",
    "cm": "Consistency Models slides (CT, CD, iCT, sCM)",
}


@dataclass
class Measured:
    """The cmbench columns added to one table: labels, one cell per paper row, extra rows, notes."""

    labels: list[str] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)  # per paper row, one string per label
    extra: list[tuple[dict, list[str]]] = field(default_factory=list)  # (row cells by role, measured cells)
    notes: list[str] = field(default_factory=list)
    used: set = field(default_factory=set)  # DataFrame index labels of the scores this table shows


def _fmt(value: float) -> str:
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _nfes(cell) -> list[int]:
    return [int(v) for v in cell_values(cell) if v.isdigit()]


def final_scores(df):
    """Completed runs' final-checkpoint scores (a record whose step is the run's last), as the collector fits them."""
    if "status" in df:
        df = df[df["status"] == "completed"]
    if "step" in df and "train_steps" in df:
        df = df[df["step"].isna() | df["train_steps"].isna() | (df["step"] == df["train_steps"])]
    return df


def _subset(df, dataset: str, table: Table):
    sub = df[df["data"] == dataset]
    if table["metric"]:
        sub = sub[sub["metric"] == table["metric"]]
    cond = table.get("conditional")
    if cond is not None and "cfg.data.class_conditional" in sub:
        sub = sub[sub["cfg.data.class_conditional"].astype(bool) == bool(cond)]
    return sub


def _best(sub, method: str, where: dict | None, nfe: int) -> str:
    rows = sub[(sub["method"] == method) & (sub["nfe"] == nfe)]
    for key, value in (where or {}).items():
        if key not in rows:
            return ""
        rows = rows[rows[key].astype(str) == str(value)]
    return _fmt(float(rows["value"].min())) if len(rows) else ""


def measure(table: Table, df) -> Measured:
    """The added columns for `table` from the collector's DataFrame (none when no run matches)."""
    if df is None or not table["dataset"] or not len(df) or not any("method" in r for r in table["rows"]):
        return Measured()  # ablation tables name no harness method: nothing to put beside them
    df = final_scores(df)
    sub = _subset(df, table["dataset"], table)
    if table.get("kind") == "fit":
        return _measure_fit(table, sub) if len(sub) and "nimg" in sub else Measured()
    columns = table["columns"]
    nfe_col = next((j for j, c in enumerate(columns) if c.get("role") == "nfe"), None)
    col_nfes = sorted({c["nfe"] for c in columns if "nfe" in c})
    if not len(sub) or (nfe_col is None and not col_nfes):
        return Measured()
    metric = table["metric"]
    if nfe_col is not None:
        labels = [f"cmbench {metric}"]
    else:
        labels = [f"cmbench {n}-step {metric}" for n in col_nfes]
    out = Measured(labels=labels, used=set(sub.index))
    for row in table["rows"]:
        rsub = _subset(df, row["dataset"], table) if row.get("dataset") else sub
        if "method" not in row:
            out.cells.append([""] * len(labels))
        elif nfe_col is not None:
            vals = [_best(rsub, row["method"], row.get("where"), n) for n in _nfes(row["cells"][nfe_col])]
            out.cells.append([" / ".join(vals) if any(vals) else ""])
        else:
            out.cells.append([_best(rsub, row["method"], row.get("where"), n) for n in col_nfes])
    listed = {r["method"] for r in table["rows"] if "method" in r}
    for method in sorted(set(sub["method"].dropna().astype(str)) - listed):
        nfes = sorted(int(n) for n in set(sub[sub["method"] == method]["nfe"].dropna()))
        if nfe_col is not None:
            for n in nfes:
                out.extra.append(({"method": f"cmbench: {method}", "nfe": str(n)}, [_best(sub, method, None, n)]))
        else:
            out.extra.append(({"method": f"cmbench: {method}"}, [_best(sub, method, None, n) for n in col_nfes]))
    runs = sub["run_dir"].nunique() if "run_dir" in sub else 0
    out.notes.append(f"cmbench: this harness's {metric} on {table['dataset']} ({len(sub)} final-checkpoint scores of "
                     f"{runs} completed runs); each cell is the lowest over EMAs and runs of that method and NFE; "
                     f"rows 'cmbench: <method>' are methods the paper's table does not list.")
    return out


def md_escape(text: str) -> str:
    """Escape the characters Markdown would read as emphasis or a cell border."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")


def _measure_fit(table: Table, sub) -> Measured:
    """This harness's K, alpha and Pearson r of metric = K * C^alpha beside a paper's fitted law: C is
    training images over the smallest budget (ECT Fig. 4: the model is fixed, so FLOPs are proportional)."""
    from harness.analysis.fit import FitError, fit_power_law  # imported when a fit is asked for

    out = Measured(labels=["cmbench K", "cmbench α", "cmbench r"], used=set(sub.index))
    for row in table["rows"]:
        pts = sub[(sub["method"] == row.get("method")) & (sub["nfe"] == row.get("nfe"))]
        pts = pts.sort_values("value").drop_duplicates("run_dir")  # one score per run: its best EMA
        models = set(pts["model"]) if "model" in pts else set()
        try:
            if len(models) > 1:
                raise FitError(f"runs of {len(models)} models")
            law = fit_power_law(pts["nimg"], pts["value"])
            out.cells.append([f"{law.K:.1f}", f"{law.alpha:.3f}", f"{law.r:.4f}"])
        except FitError as exc:
            out.cells.append(["", "", ""])
            out.notes.append(f"cmbench {row['cells'][0]}: no fit ({exc})")
    out.notes.append(f"cmbench: least squares of ln {table['metric']} on ln C over completed runs' final scores "
                     f"on {table['dataset']}, C = training images / the smallest budget.")
    return out


def _cell_markdown(cell) -> str:
    text = md_escape(" / ".join(cell_values(cell)))
    if not isinstance(cell, dict) or not text:
        return text
    if cell.get("italic"):
        text = f"*{text}*"
    if cell.get("underline"):
        text = f"<u>{text}</u>"
    if cell.get("bold"):
        text = f"**{text}**"
    if cell.get("mark"):
        text += f"^{cell['mark']}"
    return text


def _title(table: Table) -> str:
    tid = table["table"]
    head = f"{PAPER_NAMES[table['paper']]} " + (f"Table {tid}" if tid[:1].isdigit() else tid)
    return head + (f": {table['panel']}" if table.get("panel") else "")


def _extra_cells(table: Table, roles: dict) -> list:
    cells = []
    for col in table["columns"]:
        cells.append(roles.get(col.get("role"), ""))
    return cells


def _footnotes(table: Table, measured: Measured) -> list[str]:
    notes = [(f"^{f['mark']} " if f.get("mark") else "") + f["text"] for f in table["footnotes"]]
    src = table["source"]
    notes.append(f"Source: {src['spec']} §{src['section']}" + (f"; seed {src['seed']}" if src.get("seed") else ""))
    return notes + measured.notes


def render_markdown(table: Table, measured: Measured | None = None) -> str:
    """One table as Markdown: title, caption, the paper's rows and columns, cmbench columns, footnotes."""
    measured = measured or Measured()
    labels = [c["label"] for c in table["columns"]] + measured.labels
    lines = [f"### {_title(table)}", "", table["caption"], "", "| " + " | ".join(labels) + " |",
             "|" + "---|" * len(labels)]
    for i, row in enumerate(table["rows"]):
        extra = measured.cells[i] if measured.labels else []
        lines.append("| " + " | ".join([_cell_markdown(c) for c in row["cells"]] + extra) + " |")
    for roles, vals in measured.extra:
        lines.append("| " + " | ".join(_extra_cells(table, roles) + vals) + " |")
    lines.append("")
    lines += [f"- {md_escape(n)}" for n in _footnotes(table, measured)]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"↓": r"$\downarrow$", "×": r"$\times$", "–": "--", "—": "---", "σ": r"$\sigma$", "α": r"$\alpha$",
                  "Δ": r"$\Delta$", "‖": r"$\|$", "²": r"$^2$", "₂": r"$_2$", "₁": r"$_1$", "✓": r"\checkmark{}",
                  "✗": r"$\times$", "∞": r"$\infty$", "→": r"$\rightarrow$", "≡": r"$\equiv$", "≤": r"$\leq$",
                  "†": r"\dag{}", "w̄": r"$\bar{w}$", "ν": r"$\nu$", "μ": r"$\mu$", "λ": r"$\lambda$",
                  "γ": r"$\gamma$", "ε": r"$\epsilon$", "θ": r"$\theta$", "·": r"$\cdot$", "≈": r"$\approx$",
                  "±": r"$\pm$", "−": r"$-$", "∈": r"$\in$", "§": r"\S{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the tables' Unicode symbols to LaTeX commands."""
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    for uni, tex in _LATEX_UNICODE.items():
        out = out.replace(uni, tex)
    return out


def _cell_latex(cell) -> str:
    text = latex_escape(" / ".join(cell_values(cell)))
    if not isinstance(cell, dict) or not text:
        return text
    for flag, cmd in (("italic", "textit"), ("underline", "underline"), ("bold", "textbf")):
        if cell.get(flag):
            text = f"\\{cmd}{{{text}}}"
    if cell.get("mark"):
        text += f"$^{{{latex_escape(str(cell['mark']))}}}$"
    return text


def render_latex(table: Table, measured: Measured | None = None) -> str:
    """One table as a LaTeX table environment (booktabs), footnotes in a tablenotes-style block."""
    measured = measured or Measured()
    labels = [c["label"] for c in table["columns"]] + measured.labels
    spec = "".join("r" if c["kind"] == "number" else "l" for c in table["columns"]) + "r" * len(measured.labels)
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(_title(table))}: {latex_escape(table['caption'])}}}",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule", " & ".join(latex_escape(x) for x in labels) + r" \\", "\\midrule"]
    for i, row in enumerate(table["rows"]):
        extra = [latex_escape(x) for x in measured.cells[i]] if measured.labels else []
        lines.append(" & ".join([_cell_latex(c) for c in row["cells"]] + extra) + r" \\")
    for roles, vals in measured.extra:
        lines.append(" & ".join(latex_escape(x) for x in _extra_cells(table, roles) + vals) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [f"\\par\\footnotesize {latex_escape(n)}" for n in _footnotes(table, measured)]
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def render(paper: str = "all", df=None, latex: bool = False, root=None) -> str:
    """Every table of `paper` (or all papers) rendered, with cmbench columns from `df` where runs match."""
    tables = load_tables(paper, root) if root else load_tables(paper)
    parts, current, used = [], None, set()
    for table in tables:
        if table["paper"] != current:
            current = table["paper"]
            title = PAPER_TITLES[current]
            parts.append(f"% {title}\n" if latex else f"## {title}\n")
        fn = render_latex if latex else render_markdown
        measured = measure(table, df)
        used |= measured.used
        parts.append(fn(table, measured))
    if df is not None:
        parts.append(_unmatched(final_scores(df), used, latex))
    return "\n".join(parts)


def _unmatched(df, used: set, latex: bool) -> str:
    """One line naming the (dataset, metric) of final scores that no printed table shows."""
    rest = df[~df.index.isin(list(used))]
    pairs = sorted({(str(d), str(m)) for d, m in zip(rest["data"], rest["metric"])})
    text = "cmbench runs with no matching paper table: " + (", ".join(f"{d}/{m}" for d, m in pairs) or "none")
    return f"% {text}\n" if latex else f"_{text}_\n"


def _load_runs(runs: str):
    from harness.analysis.collect import load_runs
    if not Path(runs).is_dir():
        raise ReferenceError(f"RESULTS_DIR '{runs}' is not a directory of run directories")
    df, _problems = load_runs(runs)
    return df


def _out_file(out: str, paper: str, latex: bool) -> Path:
    """--out names a directory (every command's --out does); the table file is named by the paper."""
    path = Path(out)
    if path.is_file() or (not path.exists() and path.suffix in (".md", ".tex", ".txt")):
        raise ReferenceError(f"--out names a directory (tables-<paper>.md is written in it), not a file: '{out}'")
    return path / f"tables-{paper}.{'tex' if latex else 'md'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tables", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default=None,
                        help="directory of run directories whose scores are added (as for harness.collect)")
    parser.add_argument("--paper", default="all", help=f"one of {', '.join(PAPERS)}, all")
    parser.add_argument("--latex", action="store_true", help="write LaTeX instead of Markdown")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="write DIR/tables-<paper>.md (.tex) instead of printing")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    args = parser.parse_args(argv)
    if args.paper not in (*PAPERS, "all"):
        print(f"harness.analysis.tables: unknown --paper '{args.paper}'; valid: {', '.join(PAPERS)}, all", file=sys.stderr)
        return 2
    try:
        out = _out_file(args.out, args.paper, args.latex) if args.out else None
        df = _load_runs(args.results_dir) if args.results_dir else None
        text = render(args.paper, df, args.latex)
    except ReferenceError as exc:
        print(f"harness.analysis.tables: {exc}", file=sys.stderr)
        return 2
    if out is None:
        sys.stdout.write(text)
        return 0
    from harness.train.rundir import atomic_write_text
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
