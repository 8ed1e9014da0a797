"""harness.analysis.tables: the ECT CIFAR-10 table printed in the paper's order, bold and footnote marks,
LaTeX shape, errors, and the cmbench columns from a collector DataFrame."""

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.analysis import tables
from harness.analysis.reference import PAPERS, cell_values, load_tables

TABLES = {t.name: t for t in load_tables()}


# ECT Table 1, CIFAR-10 (unconditional), as the spec reproduces it (ect_sct.md 3.11 Table E1): group, method, FID, NFE.
ECT_CIFAR10 = [
    ("Diffusion Models", "Score SDE", "2.38", "2000"), ("", "Score SDE-deep", "2.20", "2000"), ("", "EDM", "2.01", "35"),
    ("", "EDM (DPM-Solver-v3)", "2.51", "10"),
    ("Diffusion Distillation", "PD", "8.34", "1"), ("", "GET", "5.49", "1"), ("", "Diff-Instruct", "4.53", "1"),
    ("", "TRACT", "3.32", "2"), ("", "CD (LPIPS)", "3.55", "1"), ("", "CD (LPIPS)", "2.93", "2"),
    ("Consistency Models", "iCT", "2.83", "1"), ("", "iCT", "2.46", "2"), ("", "iCT-deep", "2.51", "1"), ("", "iCT-deep", "2.24", "2"),
    ("ECT", "ECM (100k iters)", "4.54", "1"), ("", "ECM (200k iters)", "3.86", "1"), ("", "ECM (400k iters)", "3.60", "1"),
    ("", "ECM (100k iters)", "2.20", "2"), ("", "ECM (200k iters)", "2.15", "2"), ("", "ECM (400k iters)", "2.11", "2"),
]


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"### {title}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("##")), len(lines))
    return lines[start:end]


def _md_rows(section: list[str]) -> list[list[str]]:
    rows = [l for l in section if l.startswith("| ")]
    return [[c.strip() for c in r.strip("|").split(" | ")] for r in rows]


def test_tables_command_prints_ect_cifar10_in_paper_order(capsys):
    assert tables.main(["--paper", "ect"]) == 0
    out = capsys.readouterr().out
    section = _section(out, "ECT Table 1: CIFAR-10 (unconditional)")
    rows = _md_rows(section)
    assert rows[0] == ["Group", "Method", "FID↓", "NFE↓"]
    assert [tuple(r) for r in rows[1:]] == ECT_CIFAR10
    assert any(l.startswith("Generative performance on unconditional CIFAR-10") for l in section)
    assert "- Source: ect_sct.md §3.11 Table E1; seed 003_2a238c466ca303d8.txt" in section
    # the ECT output holds every ECT table, in the paper's order, and nothing of the other papers
    titles = [l[4:] for l in out.splitlines() if l.startswith("### ")]
    assert titles[:3] == ["ECT Table 1: CIFAR-10 (unconditional)", "ECT Table 1: ImageNet 64×64 (class-conditional)", "ECT Table 2"]
    assert len(titles) == 10 and not any(t.startswith(("sCM", "GCM", "SCT", "CM")) for t in titles)


def test_bold_and_footnote_marks_are_printed(capsys):
    assert tables.main(["--paper", "stable_ct"]) == 0
    rows = _md_rows(_section(capsys.readouterr().out, "SCT Table 1"))
    assert rows[-2] == ["", "**SCT**", "1", "**3.11**"]
    assert rows[-1] == ["", "**SCT**", "2", "**2.05**^a"]
    md = tables.render_markdown(TABLES["stable_ct_table1_cifar10"])
    assert "- ^a reconstructed: the text extraction lost the SCT CIFAR-10 2-step row" in md


def test_unknown_paper_is_one_line_exit_2(capsys):
    assert tables.main(["--paper", "edm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "harness.analysis.tables: unknown --paper 'edm'; valid: ect, stable_ct, scm, gcm, cm, all"


def _latex_strip(text: str) -> str:
    return text.replace(r"\{", "").replace(r"\}", "").replace(r"\&", "").replace(r"\\", "")


@pytest.mark.parametrize("paper", PAPERS)
def test_latex_shape_and_same_numbers(paper, tmp_path):
    assert tables.main(["--paper", paper, "--latex", "--out", str(tmp_path / "paper")]) == 0
    tex = (tmp_path / "paper" / f"tables-{paper}.tex").read_text()
    md = tables.render(paper)
    depth = 0
    for ch in _latex_strip(tex):  # braces balance and never close an unopened group
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == md.count("\n### ")
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == tex.count(r"\toprule")
    for table in [t for t in TABLES.values() if t["paper"] == paper]:
        block = tex.split(r"\caption{" + tables.latex_escape(tables._title(table)) + ":", 1)[1].split(r"\bottomrule", 1)[0]
        body = [l for l in block.splitlines() if l.endswith(r" \\")]
        assert len(body) == 1 + len(table["rows"])  # header + the paper's rows
        for line in body:  # one cell per column: unescaped & separators
            assert len(re.findall(r"(?<!\\)&", line)) == len(table["columns"]) - 1
        decimal = re.compile(r"(?<![\d.])-?\d+\.\d+(?![\d.])")
        md_rows = [l for l in _section(md, tables._title(table)) if l.startswith("| ")][1:]
        tex_numbers = decimal.findall("\n".join(body[1:]))
        assert tex_numbers == decimal.findall("\n".join(md_rows))  # same numbers, same order as the Markdown
        cells = Counter(v for r in table["rows"] for c in r["cells"] for v in cell_values(c) if decimal.fullmatch(v))
        assert not cells - Counter(tex_numbers)  # every number cell, digits as printed


def test_latex_marks_bold_with_textbf():
    tex = tables.render_latex(TABLES["stable_ct_table1_cifar10"])
    assert r"\textbf{SCT} & 2 & \textbf{2.05}$^{a}$ \\" in tex
    assert r"FID ($\downarrow$)" in tex


# ---- cmbench columns from the collector's DataFrame
def _score(method, data, nfe, value, *, cond=False, variant=None, step=100, run=None, metric="fid", ema="ema_0.999"):
    row = {"run_dir": run or f"runs/{method}-{data}-{variant}", "status": "completed", "method": method, "data": data,
           "nfe": nfe, "steps": nfe, "metric": metric, "value": value, "ema": ema, "step": step, "train_steps": 100,
           "cfg.data.class_conditional": cond}
    if variant:
        row["cfg.method.variant"] = variant
    return row


def synthetic_df():
    return pd.DataFrame([
        _score("ect", "cifar10", 1, 5.0), _score("ect", "cifar10", 1, 4.0, ema="ema_0.9999"),  # best EMA: 4.00
        _score("ect", "cifar10", 1, 1.0, step=50),  # an intermediate checkpoint: not a final score
        _score("ect", "cifar10", 2, 3.0, run="runs/ect-b"), _score("ect", "cifar10", 2, 3.5),
        _score("gcm", "cifar10", 1, 2.5, variant="cu"), _score("gcm", "cifar10", 2, 2.25, variant="cu"),
        _score("scd", "cifar10", 1, 7.0),  # not in ECT's CIFAR-10 table: an added row
        _score("ict", "imagenet64", 2, 9.0, cond=False),  # unconditional: not ImageNet's class-conditional tables
        _score("ect", "digits", 1, 0.0123, metric="digits_fd"),
    ])


def test_measured_column_beside_ect_cifar10():
    md = tables.render_markdown(TABLES["ect_table1_cifar10"], tables.measure(TABLES["ect_table1_cifar10"], synthetic_df()))
    rows = _md_rows(md.splitlines())
    assert rows[0] == ["Group", "Method", "FID↓", "NFE↓", "cmbench fid"]
    assert [tuple(r[:4]) for r in rows[1:21]] == ECT_CIFAR10  # the paper's rows untouched, in order
    by = {(r[1], r[3]): r[4] for r in rows[1:21]}
    assert by[("ECM (100k iters)", "1")] == by[("ECM (400k iters)", "1")] == "4.00"
    assert by[("ECM (100k iters)", "2")] == "3.00"
    assert by[("iCT", "1")] == "" and by[("Score SDE", "2000")] == ""
    assert rows[21:] == [["", "cmbench: gcm", "", "1", "2.50"], ["", "cmbench: gcm", "", "2", "2.25"],
                         ["", "cmbench: scd", "", "1", "7.00"]]  # measured methods the table does not list
    assert "cmbench: this harness's fid on cifar10 (7 final-checkpoint scores of 4 completed runs)" in md


def test_measured_columns_per_nfe_and_filters():
    df = synthetic_df()
    m = tables.measure(TABLES["gcm_table5_cost"], df)
    assert m.labels == ["cmbench 1-step fid", "cmbench 2-step fid"]
    names = [r["cells"][0] for r in TABLES["gcm_table5_cost"]["rows"]]
    cells = dict(zip(names, m.cells))
    assert cells["CU (Ours)"] == ["2.50", "2.25"] and cells["VU (Ours)"] == ["", ""]  # variant filter
    sc = tables.measure(TABLES["scm_table1_cifar10"], df)
    ect_row = next(i for i, r in enumerate(TABLES["scm_table1_cifar10"]["rows"]) if r.get("method") == "ect")
    assert sc.cells[ect_row] == ["4.00 / 3.00"]  # a '1 / 2' row gets both NFEs
    assert tables.measure(TABLES["gcm_table2_cu"], df).labels == []  # an ablation table names no method
    assert tables.measure(TABLES["ect_table1_imagenet64"], df).labels == []  # class-conditional table, uncond run
    assert tables.measure(TABLES["ect_table5_cifar10_cond"], df).labels == []  # FD_DINOv2 table, FID runs


def test_results_dir_through_a_stub_collector(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("harness.analysis.collect.load_runs", lambda root: (synthetic_df(), []))
    assert tables.main([str(tmp_path), "--paper", "ect"]) == 0
    out = capsys.readouterr().out
    rows = _md_rows(_section(out, "ECT Table 1: CIFAR-10 (unconditional)"))
    assert rows[0][-1] == "cmbench fid" and rows[20][1:] == ["ECM (400k iters)", "2.11", "2", "3.00"]
    assert "_cmbench runs with no matching paper table: digits/digits_fd, imagenet64/fid_" in out  # ECT's ImageNet: cond
    assert tables.main([str(tmp_path / "nope"), "--paper", "ect"]) == 2
    assert capsys.readouterr().err.strip() == (f"harness.analysis.tables: RESULTS_DIR '{tmp_path / 'nope'}' is not "
                                               f"a directory of run directories")


def test_out_is_a_directory_as_for_every_command(tmp_path, capsys):
    assert tables.main(["--paper", "ect", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 't' / 'tables-ect.md'}\n"
    assert (tmp_path / "t" / "tables-ect.md").read_text() == tables.render("ect")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tables-ect.md"]     # no temporary left
    for file_like in (tmp_path / "t" / "tables-ect.md", tmp_path / "paper_tables.tex"):
        assert tables.main(["--paper", "ect", "--out", str(file_like)]) == 2
        assert capsys.readouterr().err.strip() == ("harness.analysis.tables: --out names a directory (tables-<paper>.md "
                                                   f"is written in it), not a file: '{file_like}'")
    assert not (tmp_path / "paper_tables.tex").exists()


def _run_dir(root: Path, name: str, method: str, scores: list[tuple[int, float]], status="completed", variant=None):
    path = root / name
    path.mkdir(parents=True)
    cfg = {"method": {"name": method, **({"variant": variant} if variant else {})}, "model": {"name": "unet"},
           "data": {"name": "cifar10", "class_conditional": False}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    recs = [{"step": 10, "ema": "ema", "steps": n, "nfe": n, "metric": "fid", "value": v, "floor": 0.0,
             "reference": "cifar10-train", "num_samples": 100, "seed": 0, "sample_sec": 0.1} for n, v in scores]
    (path / "result.json").write_text(json.dumps({"status": status, "scores": recs, "nimg": 1280, "steps": 10}))


def test_runs_option_with_the_collector_on_run_directories(tmp_path, capsys):
    _run_dir(tmp_path, "ect-a", "ect", [(1, 4.25), (2, 2.5)])
    _run_dir(tmp_path, "gcm-vu", "gcm", [(1, 3.125), (2, 2.75)], variant="vu")
    _run_dir(tmp_path, "ict-failed", "ict", [(1, 1.0)], status="failed: out of memory")
    assert tables.main([str(tmp_path), "--paper", "gcm"]) == 0
    rows = _md_rows(_section(capsys.readouterr().out, "GCM Table 4"))
    by = {(r[1], r[3]): r[4] for r in rows[1:]}
    assert rows[0][-1] == "cmbench fid"
    assert by[("ECT (Geng et al., 2024)", "1")] == "4.25" and by[("ECT", "2")] == "2.50"
    assert by[("**VU (Ours)**", "1")] == "3.12" and by[("**VU (Ours)**", "2")] == "2.75" and by[("**CU (Ours)**", "1")] == ""
    assert by[("iCT", "2")] == ""  # the failed run is not a score


def test_latex_is_ascii():
    tex = tables.render("all", latex=True)
    assert [ch for ch in tex if ord(ch) > 127] == []  # Unicode symbols mapped, so pdflatex needs no inputenc


def test_scaling_fit_beside_ect_fig4():
    # six ECT budgets on class-conditional CIFAR-10 from FD = K * C^alpha with ECT's own constants (Fig. 4)
    rows = []
    for i, c in enumerate([1, 2, 4, 8, 16, 32]):
        for nfe, k, alpha in ((1, 263.0, -0.060), (2, 164.0, -0.028)):
            rows.append({**_score("ect", "cifar10", nfe, k * c ** alpha, cond=True, metric="fd_dinov2", run=f"r{i}"),
                         "nimg": 12.8e6 * c, "model": "ddpmpp"})
    m = tables.measure(TABLES["ect_fig4_scaling"], pd.DataFrame(rows))
    assert m.labels == ["cmbench K", "cmbench α", "cmbench r"]
    assert m.cells == [["263.0", "-0.060", "-1.0000"], ["164.0", "-0.028", "-1.0000"]]
    assert tables.measure(TABLES["ect_fig4_scaling"], pd.DataFrame(rows[:2])).cells[0] == ["", "", ""]  # one budget
