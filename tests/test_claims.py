"""The claims report (harness.analysis.claims): each rule on synthetic fit points with a known truth, its
interval against a hand computation, and the verdicts a reader would expect."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from harness.analysis.claims import claims_table, teacher_gaps, verdict

BUDGETS = [960, 1920, 3840, 7680, 15360]
SEEDS = [0, 1, 2]


def _points(spec, noise=0.03, seed=0):
    """Fit points for methods given as {method: (score at the smallest budget, alpha, 2-step / 1-step)}, one
    per budget x seed x NFE, multiplicative log-normal noise; plus an EDM and a TrigFlow teacher run."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, (k, alpha, ratio) in spec.items():
        source = {"ect": "edm", "stable_ct": "edm", "cd": "edm", "sct": "trigflow", "scd": "trigflow"}.get(method)
        for b in BUDGETS:
            for s in SEEDS:
                one = k * (b / BUDGETS[0]) ** alpha * math.exp(noise * rng.standard_normal())
                for nfe, v in ((1, one), (2, one * ratio * math.exp(noise * rng.standard_normal()))):
                    rows.append({"data": "digits", "metric": "digits_fd", "method": method, "nfe": nfe, "value": v,
                                 "nimg": b, "flops": b * 1e6, "cfg.seed": s, "run_dir": f"runs/{method}-{b}-{s}",
                                 "cfg.init_from": f"/abs/path/{source}-run" if source else "",
                                 "cfg.teacher": f"runs/{source}-run" if method in ("cd", "scd") else ""})
    for teacher, score in (("edm", 20.0), ("trigflow", 25.0)):
        for nfe, v in ((1, 900.0), (35, score)):
            rows.append({"data": "digits", "metric": "digits_fd", "method": teacher, "nfe": nfe, "value": v,
                         "nimg": 38400, "flops": 3.84e10, "cfg.seed": 0, "run_dir": f"results/x/{teacher}-run",
                         "cfg.init_from": "", "cfg.teacher": ""})
    return pd.DataFrame(rows)


def _claim(table, text):
    (row,) = [r for r in table.to_dict("records") if r["claim"] == text]
    return row


def test_verdicts_follow_the_interval_against_the_threshold():
    assert verdict(0.5, 0.9, 1.0) == "holds"
    assert verdict(1.1, 1.4, 1.0) == "fails"
    assert verdict(0.9, 1.1, 1.0) == "inconclusive"
    assert verdict(math.nan, 0.5, 1.0) == "inconclusive"


def test_each_claim_reads_the_truth_of_synthetic_runs():
    pts = _points({"ect": (300.0, -0.5, 0.8), "ict": (900.0, -0.5, 0.8), "ct": (1000.0, 0.0, 1.3),
                   "cd": (250.0, -0.3, 0.9), "sct": (26.0, 0.0, 0.9), "scd": (40.0, 0.0, 0.9)})
    claims, gaps = claims_table(pts)
    assert _claim(claims, "ECT 2-step score falls with compute as a power law")["verdict"] == "holds"
    assert _claim(claims, "ECT 2-step score falls with compute as a power law")["effect"] == pytest.approx(-0.5, abs=0.05)
    assert _claim(claims, "CT 1-step score falls with compute as a power law")["verdict"] == "inconclusive"
    assert _claim(claims, "ECT: 2 steps beat 1")["verdict"] == "holds"
    assert _claim(claims, "CT: 2 steps beat 1")["verdict"] == "fails"                 # 2 steps 30% worse
    ect_ict = _claim(claims, "Tuning from a diffusion model beats training from scratch at equal compute (ECT vs iCT)")
    assert ect_ict["verdict"] == "holds" and ect_ict["effect"] == pytest.approx(1 / 3, rel=0.1)
    cd_ct = _claim(claims, "Distillation beats training at equal compute (CD vs CT)")
    assert cd_ct["verdict"] == "holds" and cd_ct["n"] == 3
    # sCT: 2-step 26 * 0.9 = 23.4 vs its teacher's 25: within 10%; sCD 40 * 0.9 = 36 vs 25: 44% worse
    assert _claim(claims, "sCT 2-step within 10% of its teacher")["verdict"] == "holds"
    scd = _claim(claims, "sCD 2-step within 10% of its teacher")
    assert scd["verdict"] == "fails" and scd["effect"] == pytest.approx(36 / 25, rel=0.05)
    # a teacher's own scores make no claim rows, and every student's gap is listed per budget and NFE
    assert not claims["method"].isin(["edm", "trigflow"]).any()
    assert len(gaps) == 4 * 2 * len(BUDGETS)          # ECT, CD (EDM) and sCT, sCD (TrigFlow); CT/iCT have none
    assert set(gaps["teacher_score"]) == {20.0, 25.0}


def test_two_step_interval_is_the_t_interval_of_the_per_seed_log_ratios():
    pts = _points({"ect": (300.0, -0.5, 0.8)}, noise=0.1, seed=3)
    claims, _ = claims_table(pts)
    row = _claim(claims, "ECT: 2 steps beat 1")
    top = pts[(pts["method"] == "ect") & (pts["nimg"] == BUDGETS[-1])]
    v1 = top[top["nfe"] == 1].sort_values("cfg.seed")["value"].to_numpy()
    v2 = top[top["nfe"] == 2].sort_values("cfg.seed")["value"].to_numpy()
    d = np.log(v2 / v1)
    half = 4.302652729911275 * d.std(ddof=1) / math.sqrt(3)          # t_{0.975, 2 dof}
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729911275)
    assert row["effect"] == pytest.approx(math.exp(d.mean()), rel=1e-12)
    assert (row["lo"], row["hi"]) == pytest.approx((math.exp(d.mean() - half), math.exp(d.mean() + half)), rel=1e-9)
    assert row["n"] == 3


def test_one_seed_gives_no_interval_and_no_verdict():
    pts = _points({"ect": (300.0, -0.5, 0.5)})
    pts = pts[pts["cfg.seed"] == 0]
    claims, _ = claims_table(pts)
    row = _claim(claims, "ECT: 2 steps beat 1")
    assert row["n"] == 1 and math.isnan(row["lo"]) and row["verdict"] == "inconclusive"


def test_gaps_match_students_to_their_own_teacher_by_run_directory():
    gaps = teacher_gaps(_points({"cd": (250.0, -0.3, 0.9), "scd": (40.0, 0.0, 0.9)}), "nimg", 0.95)
    cd = gaps[(gaps["method"] == "CD") & (gaps["nfe"] == 2)]
    scd = gaps[(gaps["method"] == "sCD") & (gaps["nfe"] == 2)]
    assert set(cd["teacher_score"]) == {20.0} and set(scd["teacher_score"]) == {25.0}


def test_collector_writes_claims_gaps_alphas_and_the_per_method_figure(tmp_path):
    from harness.analysis.collect import collect
    from synthetic_runs import score, write_run
    rng = np.random.default_rng(0)
    teacher = write_run(tmp_path / "edm", method="edm", steps=600,
                        scores=[score(900.0, 1, step=600), score(20.0, 35, steps=18, step=600)])
    for method, k, source in (("ect", 300.0, str(teacher)), ("ict", 900.0, "")):
        for steps in (15, 30, 60, 120):
            for seed in SEEDS:
                one = k * (steps / 15) ** -0.5 * math.exp(0.05 * rng.standard_normal())
                write_run(tmp_path / f"{method}-{steps}-{seed}", method=method, steps=steps, seed=seed,
                          init_from=source, scores=[score(one, 1, step=steps), score(0.8 * one, 2, step=steps)])
    files = collect(tmp_path, plots=True)
    for name in ("claims.md", "claims.csv", "gaps.md", "alphas.md", "plots/methods_digits_pixel_fd_unet-xs.png"):
        assert name in files, name
    claims = pd.read_csv(files["claims.csv"])
    assert set(claims["verdict"]) <= {"holds", "fails", "inconclusive"} and claims["verdict"].notna().all()
    row = claims[claims["claim"].str.startswith("Tuning from a diffusion model")].iloc[0]
    assert row["verdict"] == "holds" and row["effect"] == pytest.approx(1 / 3, rel=0.1)
    assert (claims["claim"] == "ECT: 2 steps beat 1").sum() == 1
    gaps = pd.read_csv(files["gaps.csv"])
    assert set(gaps["method"]) == {"ECT"} and set(gaps["teacher_score"]) == {20.0}
    assert "ECT" in files["alphas.md"].read_text()
