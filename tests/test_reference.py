"""results/reference/: the transcribed tables against the specs' cross-table identities, their listed
discrepancies and quick-reference numbers; the schema check at load."""

import re

import pytest
import yaml

from harness.analysis import tables
from harness.analysis.reference import PAPERS, REFERENCE_DIR, ReferenceError, cell_values, load_table, load_tables

TABLES = {t.name: t for t in load_tables()}
S12 = ("1-step", "2-step")


def _row(name: str, sel):
    """A row by index, by its method cell, or by (method cell, other values in the row)."""
    t = TABLES[name]
    if isinstance(sel, int):
        return t["rows"][sel]
    mcol = next(j for j, c in enumerate(t["columns"]) if c.get("role") == "method")
    method, *others = (sel,) if isinstance(sel, str) else sel
    hits = [r for r in t["rows"] if " / ".join(cell_values(r["cells"][mcol])) == method
            and all(any(o in cell_values(c) for c in r["cells"]) for o in others)]
    assert len(hits) == 1, f"{name}: {sel!r} matches {len(hits)} rows"
    return hits[0]


def vals(name: str, sel, cols) -> list[str]:
    """The printed values of row `sel` in columns `cols` (labels) of table `name`."""
    t = TABLES[name]
    labels = [c["label"] for c in t["columns"]]
    row = _row(name, sel)
    return [v for col in cols for v in cell_values(row["cells"][labels.index(col)])]


# Cross-table identities: every side of one must give the same printed values. A side is one
# (table, row, columns) item or a list of items whose values are concatenated. Each names its spec reference.
def _nfe(name, method, col):  # the 1-step then 2-step rows of a row-per-NFE table
    return [(name, (method, "1"), (col,)), (name, (method, "2"), (col,))]


def _rows(name, rows, col):  # the same column of several rows (transposed tables: one row per metric)
    return [(name, r, (col,)) for r in rows]


F12 = ("1-step FID", "2-step FID")
E12 = ("1-step FID↓", "2-step FID↓")
IDENTITIES = [
    # gcm_ct_ict_cd.md A.14 (Guide)
    ("gcm A.14: Tab. 2 A = Tab. 8 row 3", [("gcm_table2_cu", "A Baseline", S12), ("gcm_table8_cifar10", 2, S12)]),
    ("gcm A.14: Tab. 2 D = Tab. 7g Uniform = Tab. 10 D", [("gcm_table2_cu", "D + Loss Weighting", S12),
     ("gcm_table7g_cifar10", "Uniform", S12), ("gcm_table10_vu", "D Baseline", S12)]),
    ("gcm A.14: Tab. 2 E = Tab. 7g p_sine(1, 0.01) = Tab. 7e CU = Tab. 11 e", [("gcm_table2_cu", "E + t-sampling", S12),
     ("gcm_table7g_cifar10", "p_sine(t; 1, 0.01)", S12), ("gcm_table7e_cifar10", "CU (Ours)", S12),
     ("gcm_table11_ect", "e) − ECT Loss Weighting & Time Sampling + Ours", S12)]),
    ("gcm A.14: Tab. 2 F = Tab. 5 CU 512/400K = Tab. 11 f", [("gcm_table2_cu", "F + Time-aware MMD Loss", S12),
     ("gcm_table5_cost", ("CU (Ours)", "512"), S12), ("gcm_table11_ect", "f) + Time-aware MMD Loss", S12)]),
    ("gcm A.14: Tab. 3 J = Tab. 10 M", [("gcm_table3_vu", "J + Loss Weighting", S12), ("gcm_table10_vu", "M + s-sampling", S12)]),
    ("gcm A.14: Tab. 3 K = Tab. 7d ✗ = Tab. 7e VU = Tab. 7i group 1 = Tab. 7j finite difference (= Tab. 10 K)",
     [("gcm_table3_vu", "K + t-sampling", S12), ("gcm_table7d_cifar10", "✗", S12), ("gcm_table7e_cifar10", "VU (Ours)", S12),
      ("gcm_table7i_cifar10", 0, S12), ("gcm_table7j_cifar10", "Finite Difference", S12), ("gcm_table10_vu", "K + t-sampling", S12)]),
    ("gcm A.14: Tab. 3 L = Tab. 5 VU 512/400K = Tab. 7h DDPM++ = Tab. 7i last row (= Tab. 10 L)",
     [("gcm_table3_vu", "L + Time-aware MMD Loss", S12), ("gcm_table5_cost", ("VU (Ours)", "512"), S12),
      ("gcm_table7h_cifar10", "DDPM++", S12), ("gcm_table7i_cifar10", 2, S12), ("gcm_table10_vu", "L + Time-aware MMD loss", S12)]),
    ("gcm A.14: Tab. 5 VU 1024/400K = Tab. 9 row 2", [("gcm_table5_cost", ("VU (Ours)", "1024", "400K"), S12), ("gcm_table9_cifar10", 1, S12)]),
    ("gcm A.14: Tab. 2 C = Tab. 7c row 3", [("gcm_table2_cu", "C + Time Preconditioning", S12), ("gcm_table7c_cifar10", 2, S12)]),
    ("gcm A.14: Tab. 2 B ~ Tab. 7c row 1 (1-step; the 2-step is AMBIG-6)",
     [("gcm_table2_cu", "B + Discretization Function", ("1-step",)), ("gcm_table7c_cifar10", 0, ("1-step",))]),
    # gcm A.13 headline claims, App. I figure captions, AMBIG-15 (Tab. 4 is the 1024 x 800K run)
    ("gcm A.13: CU 1024x800K = Tab. 4 = Figs. 5/6", [_nfe("gcm_table4_cifar10", "CU (Ours)", "FID"),
     ("gcm_table5_cost", ("CU (Ours)", "800K"), S12), _rows("gcm_figcaptions", ["Fig. 5: CIFAR-10 CU 1-step", "Fig. 6: CU 2-step"], "FID")]),
    ("gcm A.13: VU 1024x800K = Tab. 4 = Figs. 7/8", [_nfe("gcm_table4_cifar10", "VU (Ours)", "FID"),
     ("gcm_table5_cost", ("VU (Ours)", "800K"), S12), _rows("gcm_figcaptions", ["Fig. 7: VU 1-step", "Fig. 8: VU 2-step"], "FID")]),
    ("gcm A.13: Figs. 9/10 = Tab. 6a CU-XL", [("gcm_table6a_imagenet64", "CU-XL (Ours)", S12), _rows("gcm_figcaptions",
     ["Fig. 9: conditional ImageNet-64 CU (EDM2-XL) 1-step", "Fig. 10: ImageNet-64 CU 2-step"], "FID")]),
    ("gcm part C: IMM 3.20/1.98 Tab. 4 = Tab. 5", [[("gcm_table4_cifar10", ("IMM (Zhou et al., 2025)", "1"), ("FID",)),
     ("gcm_table4_cifar10", ("IMM", "2"), ("FID",))], ("gcm_table5_cost", "IMM", S12)]),
    ("gcm part C: MeanFlow 2.92 Tab. 4 = Tab. 5", [("gcm_table4_cifar10", "MeanFlow (Geng et al., 2025)", ("FID",)),
     ("gcm_table5_cost", "MeanFlow", ("1-step",))]),
    # ect_sct.md (ECT, SCT)
    ("ect 3.10/3.11: Table E7 uncond CIFAR-10 = Table E1 ECM (100k)", [_rows("ect_table7_configs", F12, "Uncond CIFAR-10"),
     _nfe("ect_table1_cifar10", "ECM (100k iters)", "FID↓")]),
    *[(f"ect 3.12(b): Table E7 {m} 2-step = Table E1 ImageNet {m} (100k)",
       [("ect_table7_configs", "2-step FID", (m,)), ("ect_table1_imagenet64", (f"{m} (100k iters)", "2"), ("FID↓",))])
      for m in ("ECM-S", "ECM-M", "ECM-L", "ECM-XL")],
    ("ect 3.11/3.12(b): ECM-S = E2 last row = E3 1/t²+1/σ² = E4 row 3 = Guide Tab. 6a ECT-S",
     [_rows("ect_table7_configs", F12, "ECM-S"), ("ect_table2_imagenet64", "+ w̄(t) = 1/t² + 1/σ_data²", F12),
      ("ect_table3_imagenet64", "1/t² + 1/σ_data²", E12), ("ect_table4_imagenet64", ("1/t² + 1/σ_data²", "5.51"), E12),
      ("gcm_table6a_imagenet64", "ECT-S", S12)]),
    ("ect §5 A7: E2 dropout 0.40 = E3 1/(t−r)", [("ect_table2_imagenet64", "+ Dropout = 0.40", F12),
     ("ect_table3_imagenet64", "1/(t−r)", E12)]),
    ("ect 3.11: E4 last row (w̄ = 1) = E3 w̄ = 1", [("ect_table4_imagenet64", "1", E12), ("ect_table3_imagenet64", "1", E12)]),
    ("ect 3.12(b) + gcm Tab. 6a: ECM-XL = ECT-XL", [_rows("ect_table7_configs", F12, "ECM-XL"), ("gcm_table6a_imagenet64", "ECT-XL", S12)]),
    ("ect 3.11 text numbers: ECT-pretrained EDM cond = Table E5", [("ect_table5_cifar10_cond", "ECM (ECT Pretrained)", ("FD_DINOv2↓",)),
     ("ect_text_numbers", ("ECT-pretrained EDM", "CIFAR-10 cond"), ("Value",))]),
    ("ect 4.7: SCT Table 2 ECT-M = Table E7 ECM-M", [_nfe("stable_ct_table2_imagenet64", "ECT-M", "FID (↓)"),
     _rows("ect_table7_configs", F12, "ECM-M")]),
    ("ect §5 A12: ECT's own 400k CIFAR-10 = sCM Table 1 ECT = Guide Tab. 4 ECT", [_nfe("ect_table1_cifar10", "ECM (400k iters)", "FID↓"),
     ("scm_table1_cifar10", "ECT", ("FID",)), [("gcm_table4_cifar10", "ECT (Geng et al., 2024)", ("FID",)), ("gcm_table4_cifar10", "ECT", ("FID",))]]),
    ("gcm part C: ECT ImageNet-64 2.49/1.67 (sCM table) = ECT E1 ECM-XL*", [("scm_table1_imagenet64", "ECT", ("FID",)),
     _nfe("cm_scm_imagenet64", "ECT", "FID"), _nfe("ect_table1_imagenet64", "ECM-XL*", "FID↓")]),
    # gcm_ct_ict_cd.md part C: CIFAR-10 baselines shared by the slides, ECT, SCT, sCM and the Guide
    ("gcm part C: CT (LPIPS) 8.70/5.83 (slides; Guide Tab. 5)", [_nfe("cm_ct_cifar10", "CT", "FID"), ("gcm_table5_cost", "CT", S12),
     _nfe("cm_ict_cifar10", "CT (LPIPS)", "FID"), _nfe("stable_ct_table1_cifar10", "CT (LPIPS)", "FID (↓)")]),
    ("gcm part C: CD (LPIPS) 3.55/2.93 (slides)", [_nfe("cm_cd_cifar10", "CD", "FID"), _nfe("ect_table1_cifar10", "CD (LPIPS)", "FID↓"),
     ("scm_table1_cifar10", "CD (LPIPS)", ("FID",)), _nfe("stable_ct_table1_cifar10", "CD (LPIPS)", "FID (↓)"), _nfe("cm_ict_cifar10", "CD (LPIPS)", "FID")]),
    ("gcm part C: CD 2-step in Guide Tab. 4", [("gcm_table4_cifar10", "CD (Song et al., 2023)", ("FID",)), ("cm_ict_cifar10", ("CD (LPIPS)", "2"), ("FID",))]),
    ("gcm part C: iCT 2.83/2.46 (slides + Guide 1024x400K)", [_nfe("cm_ict_cifar10", "iCT", "FID"), ("gcm_table5_cost", ("iCT", "1024"), S12),
     ("scm_table1_cifar10", "iCT", ("FID",)), _nfe("ect_table1_cifar10", "iCT", "FID↓"), _nfe("stable_ct_table1_cifar10", "iCT", "FID (↓)"),
     [("gcm_table4_cifar10", "iCT (Song & Dhariwal, 2023)", ("FID",)), ("gcm_table4_cifar10", "iCT", ("FID",))]]),
    ("gcm part C: iCT-deep 2.51/2.24 (slides)", [_nfe("cm_ict_cifar10", "iCT-deep", "FID"), ("scm_table1_cifar10", "iCT-deep", ("FID",)),
     _nfe("ect_table1_cifar10", "iCT-deep", "FID↓"), _nfe("stable_ct_table1_cifar10", "iCT-deep", "FID (↓)")]),
    ("gcm part C: sCD CIFAR-10 3.66/2.52 (Guide Tab. 4 = sCM Table 1)", [[("gcm_table4_cifar10", ("sCD (Lu & Song, 2024)", "1"), ("FID",)),
     ("gcm_table4_cifar10", ("sCD", "2"), ("FID",))], ("scm_table1_cifar10", "sCD (ours)", ("FID",))]),
    ("gcm part C + scm 8 headline: sCT CIFAR-10 2-step 2.06", [("gcm_table4_cifar10", ("sCT", "2"), ("FID",)),
     ("scm_text_headline", "CIFAR-10", ("sCM 2-step FID",))]),
    # gcm part C, ImageNet-64: the slides, sCM Table 1, SCT Table 2
    ("gcm part C: CD (LPIPS) ImageNet-64 6.20/4.70", [_nfe("cm_scm_imagenet64", "CD (LPIPS)", "FID"), ("scm_table1_imagenet64", "CD (LPIPS)", ("FID",)),
     ("cm_cd_captions", "ImageNet-64", ("CD 1-step", "CD 2-step")), _nfe("stable_ct_table2_imagenet64", "CD (LPIPS)", "FID (↓)")]),
    ("gcm part C: CT ImageNet-64 13.0/11.1 (slides = SCT Table 2)", [[("cm_ct_imagenet64_lsun", ("CT", "13.0"), ("FID",)),
     ("cm_ct_imagenet64_lsun", ("CT", "11.1"), ("FID",))], _nfe("stable_ct_table2_imagenet64", "CT (LPIPS)", "FID (↓)")]),
    ("gcm part C: iCT ImageNet-64 4.02/3.20", [_nfe("cm_scm_imagenet64", "iCT", "FID"), ("scm_table1_imagenet64", "iCT", ("FID",)),
     _nfe("stable_ct_table2_imagenet64", "iCT", "FID (↓)")]),
    ("gcm part C: iCT-deep ImageNet-64 3.25/2.77", [_nfe("cm_scm_imagenet64", "iCT-deep", "FID"), ("scm_table1_imagenet64", "iCT-deep", ("FID",)),
     _nfe("stable_ct_table2_imagenet64", "iCT-deep", "FID (↓)")]),
    ("gcm part C + scm 8 (Table 1 rows are the XL models): sCD ImageNet-64", [_nfe("cm_scm_imagenet64", "sCD", "FID"),
     ("scm_table1_imagenet64", "sCD (ours)", ("FID",)), _rows("scm_table7_imagenet64", ["sCD 1-step FID", "sCD 2-step FID"], "XL")]),
    ("gcm part C + scm 8: sCT ImageNet-64", [_nfe("cm_scm_imagenet64", "sCT", "FID"),
     ("scm_table1_imagenet64", "sCT (ours)", ("FID",)), _rows("scm_table7_imagenet64", ["sCT 1-step FID", "sCT 2-step FID"], "XL")]),
    # scm.md section 8
    ("scm 8: headline ImageNet-64 1.48 = Table 7 sCT-XL", [("scm_text_headline", "ImageNet 64×64", ("sCM 2-step FID",)),
     ("scm_table7_imagenet64", "sCT 2-step FID", ("XL",))]),
    ("scm 8: headline ImageNet-512 1.88 = Table 5 sCD-XXL 2-step", [("scm_text_headline", "ImageNet 512×512", ("sCM 2-step FID",)),
     ("scm_table5_imagenet512_scd", "2-step FID", ("XXL",))]),
    ("scm 8: own TrigFlow teacher ImageNet-64 XL 1.38 = Table 7", [("scm_text_headline", "ImageNet 64×64", ("Own TrigFlow teacher FID",)),
     ("scm_table7_imagenet64", "FID (TrigFlow)", ("XL",))]),
    ("scm 8: TrigFlow XXL 1.73 = Table 5 = Table 2 teacher", [("scm_text_headline", "ImageNet 512×512", ("Teacher FID",)),
     ("scm_table5_imagenet512_diffusion", "FID (TrigFlow)", ("XXL",)), ("scm_table2_imagenet512_ours", "EDM2-XXL", ("FID",))]),
    ("scm 8: EDM 2.01 teacher = Table 1", [("scm_text_headline", "CIFAR-10", ("Teacher FID",)), ("scm_table1_cifar10", "EDM", ("FID",))]),
    ("scm 8: EDM2 (Heun) 1.33 = Table 1 ImageNet-64 = ECT E1 EDM2-XL", [("scm_text_headline", "ImageNet 64×64", ("Teacher FID",)),
     ("scm_table1_imagenet64", "EDM2 (Heun)", ("FID",)), ("ect_table1_imagenet64", "EDM2-XL", ("FID↓",))]),
    ("scm 8 Table 2 notes: Table 2 teachers = Table 5 FID (TrigFlow)", [[("scm_table2_imagenet512_ours", f"EDM2-{s}", ("FID",))
     for s in ("S", "M", "L", "XL", "XXL")], ("scm_table5_imagenet512_diffusion", "FID (TrigFlow)", ("S", "M", "L", "XL", "XXL"))]),
    ("scm 8 / 12: Table 2 EDM2 baselines = Table 5 FID (EDM2)", [[("scm_table2_imagenet512_baselines", f"EDM2-{s}", ("FID",))
     for s in ("S", "M", "L", "XL", "XXL")], ("scm_table5_imagenet512_diffusion", "FID (EDM2)", ("S", "M", "L", "XL", "XXL"))]),
    *[(f"scm 8 Table 2 notes: Table 2 {m}-{s} = Table 5 {m}", [("scm_table2_imagenet512_ours", f"{m}-{s}", ("FID",)),
       _rows(f"scm_table5_imagenet512_{m.lower()}", F12, s), ("cm_scm_imagenet512_cm", s, (f"{m} 1-step", f"{m} 2-step"))])
      for m in ("sCT", "sCD") for s in ("S", "M", "L", "XL", "XXL")],
    ("scm 8 Table 6 [derived]: sCD column = Table 5 sCD, size M", [
     _rows("scm_table6_imagenet512", ["1-step FID", "2-step FID", "1-step FD_DINOv2", "2-step FD_DINOv2"], "sCD"),
     _rows("scm_table5_imagenet512_scd", ["1-step FID", "2-step FID", "1-step FD_DINOv2", "2-step FD_DINOv2"], "M")]),
    ("scm 8 Table 6 [derived]: sCD + VSD column = Table 5 sCD + adaptive VSD, size M", [
     _rows("scm_table6_imagenet512", ["1-step FID", "2-step FID", "1-step FD_DINOv2", "2-step FD_DINOv2"], "sCD + VSD"),
     _rows("scm_table5_imagenet512_scd_avsd", ["1-step FID", "2-step FID", "1-step FD_DINOv2", "2-step FD_DINOv2"], "M")]),
    # gcm_ct_ict_cd.md B.9: captions and tables of the slides
    ("gcm B.9: CD captions EDM ImageNet-64 2.44 = CT table EDM", [("cm_cd_captions", "ImageNet-64", ("EDM (NFE 79)",)),
     ("cm_ct_imagenet64_lsun", ("EDM", "2.44"), ("FID",)), ("stable_ct_table2_imagenet64", "EDM* (Heun)", ("FID (↓)",))]),
    ("gcm B.9: CD captions EDM LSUN Bedroom 3.57 = CT table EDM", [("cm_cd_captions", "LSUN Bedroom-256", ("EDM (NFE 79)",)),
     ("cm_ct_imagenet64_lsun", ("EDM", "3.57"), ("FID",))]),
]


def _side(side) -> list[str]:
    items = side if isinstance(side, list) else [side]
    return [v for name, sel, cols in items for v in vals(name, sel, cols)]


@pytest.mark.parametrize("ref,sides", IDENTITIES, ids=[i[0][:70] for i in IDENTITIES])
def test_cross_table_identity(ref, sides):
    first = _side(sides[0])
    assert first and all(re.match(r"^\d+\.\d+$", v) for v in first), f"{ref}: {first}"
    for side in sides[1:]:
        assert _side(side) == first, f"{ref}: {side} gives {_side(side)}, {sides[0]} gives {first}"


# Numbers the specs list as disagreeing between tables: both values stay as printed (never reconciled).
DISCREPANCIES = [
    ("ect §5 A7: dropout 0.40, 2-step: text 3.24 vs Table E2 3.22",
     [("ect_text_numbers", "Dropout 0.10 → 0.40 (ECM-S)", ("Value",), ["4.53", "3.24"]),
      ("ect_table2_imagenet64", "+ Dropout = 0.40", ("2-step FID",), ["3.22"])]),
    ("ect §5 A10: EDM FD_DINOv2 168.16 (Table E6) vs 168.17 (text)",
     [("ect_table6_cifar10", "EDM", ("FD_DINOv2",), ["168.16"]), ("ect_text_numbers", ("ECT-pretrained EDM", "CIFAR-10 uncond"), ("Compared with",), ["EDM 168.17"])]),
    ("ect §5 A11: EDM CIFAR-10 2.01 (ECT) vs 2.04 (SCT); ImageNet 2.22 vs EDM* (Heun) 2.44",
     [("ect_table1_cifar10", "EDM", ("FID↓",), ["2.01"]), ("stable_ct_table1_cifar10", "EDM", ("FID (↓)",), ["2.04"]),
      ("ect_table1_imagenet64", "EDM", ("FID↓", "NFE↓"), ["2.22", "79"]), ("stable_ct_table2_imagenet64", "EDM* (Heun)", ("FID (↓)", "NFE (↓)"), ["2.44", "79"])]),
    ("ect §5 A12: SCT's ECT CIFAR-10 3.78/2.13 is none of ECT's own rows",
     [("stable_ct_table1_cifar10", ("ECT", "1"), ("FID (↓)",), ["3.78"]), ("stable_ct_table1_cifar10", ("ECT", "2"), ("FID (↓)",), ["2.13"])]),
    ("ect §5 B8: SCT CIFAR-10 2-step 2.05 is reconstructed", [("stable_ct_table1_cifar10", ("SCT", "2"), ("FID (↓)",), ["2.05"])]),
    ("gcm A.15 AMBIG-6: Tab. 2 B 2-step 4.40 vs Tab. 7c 4.42",
     [("gcm_table2_cu", "B + Discretization Function", ("2-step",), ["4.40"]), ("gcm_table7c_cifar10", 0, ("2-step",), ["4.42"])]),
    ("gcm B.10 S-AMBIG-1: LSUN Bedroom CT 2-step 7.85 (table) vs 7.80 (caption)",
     [("cm_ct_imagenet64_lsun", ("CT", "7.85"), ("FID",), ["7.85"]), ("cm_ct_captions", "LSUN Bedroom", ("CT 2-step",), ["7.80"])]),
    ("gcm B.10 S-AMBIG-6: EDM 2.04 (slides) vs 1.97 (Guide); DFNO 4.12 vs 3.78; PD 2-step 5.58 vs 4.51",
     [("cm_ct_cifar10", "EDM", ("FID",), ["2.04"]), ("gcm_table4_cifar10", "EDM (Karras et al., 2022)", ("FID",), ["1.97"]),
      ("cm_cd_cifar10", "DFNO*", ("FID",), ["4.12"]), ("cm_ict_cifar10", "DFNO (LPIPS)", ("FID",), ["3.78"]),
      ("cm_cd_cifar10", ("PD", "2"), ("FID",), ["5.58"]), ("gcm_table4_cifar10", "PD (Salimans & Ho, 2022)", ("FID",), ["4.51"])]),
    ("scm 8 notes on Table 1: CIFAR-10 StyleGAN-XL 1.52 as printed (= the ImageNet-64 entry)",
     [("scm_table1_cifar10", "StyleGAN-XL", ("FID",), ["1.52"]), ("scm_table1_imagenet64", "StyleGAN-XL", ("FID",), ["1.52"])]),
    ("found here, not in the specs: sCT CIFAR-10 1-step 2.97 (sCM Table 1) vs 2.85 (Guide Tab. 4)",
     [("scm_table1_cifar10", "sCT (ours)", ("FID",), ["2.97", "2.06"]), ("gcm_table4_cifar10", ("sCT (Lu & Song, 2024)", "1"), ("FID",), ["2.85"])]),
    ("found here, not in the specs: CTM CIFAR-10 at NFE 1 is 1.87 in sCM Table 1, 5.19 in SCT (whose +GAN row is 1.98 / 1.87 at NFE 1 / 2)",
     [("scm_table1_cifar10", "CTM", ("NFE", "FID"), ["1", "1.87"]), ("stable_ct_table1_cifar10", ("CTM", "1"), ("FID (↓)",), ["5.19"]),
      ("stable_ct_table1_cifar10", ("CTM (+GAN +CRJ)", "2"), ("FID (↓)",), ["1.87"])]),
    ("found here, not in the specs: the CT slide's 'Score SDE' 2.20 / IS 9.89 is the iCT slide's Score SDE (deep)",
     [("cm_ct_cifar10", "Score SDE", ("FID", "IS"), ["2.20", "9.89"]), ("cm_ict_cifar10", "Score SDE", ("FID", "IS"), ["2.38", "9.83"]),
      ("cm_ict_cifar10", "Score SDE (deep)", ("FID", "IS"), ["2.20", "9.89"])]),
    ("found here, not in the specs: DDIM NFE 10 is 8.23 in the CD slide, 13.36 in the iCT slide and SCT Table 1",
     [("cm_cd_cifar10", ("DDIM", "10"), ("FID",), ["8.23"]), ("cm_ict_cifar10", "DDIM", ("FID",), ["13.36"]),
      ("stable_ct_table1_cifar10", "DDIM", ("FID (↓)",), ["13.36"])]),
    ("scm 8 note vs the CT slide: CIFAR-10 StyleGAN-XL 1.52 (sCM) vs 1.85 (slides)",
     [("cm_ct_cifar10", "StyleGAN-XL", ("FID",), ["1.85"])]),
]


@pytest.mark.parametrize("ref,items", DISCREPANCIES, ids=[d[0][:70] for d in DISCREPANCIES])
def test_known_discrepancies_kept_as_printed(ref, items):
    for name, sel, cols, expected in items:
        assert vals(name, sel, cols) == expected, f"{ref}: {name} {sel!r}"


# Every number the specs' quick-reference sections list (ect_sct.md §6 reference_results and §4.8;
# gcm_ct_ict_cd.md part C; scm.md has none, so its §8 'Teacher FIDs' headline list) must be in a table
# of that dataset (or a dataset-less text table), all numbers of one entry in the same table.
QUICK_REFERENCE = [
    ("ect §6 cifar10_uncond_fid 100k", "cifar10", ["4.54", "2.20"]), ("ect §6 200k", "cifar10", ["3.86", "2.15"]),
    ("ect §6 400k", "cifar10", ["3.60", "2.11"]), ("ect §6 cifar10_cond_fid_100k", "cifar10", ["3.81", "2.02"]),
    ("ect §6 cifar10_1gpu_hour_2step_fid", "cifar10", ["2.73"]),
    ("ect §6 imagenet64_fid_12.8M S", "imagenet64", ["5.51", "3.18"]), ("ect §6 M", "imagenet64", ["3.67", "2.35"]),
    ("ect §6 L", "imagenet64", ["3.55", "2.14"]), ("ect §6 XL", "imagenet64", ["3.35", "1.96"]),
    ("ect §6 imagenet64_fid_102.4M S", "imagenet64", ["4.05", "2.79"]), ("ect §6 102.4M XL", "imagenet64", ["2.49", "1.67"]),
    ("ect §6 cifar10_cond_fd_dinov2", "cifar10", ["121.05", "198.51", "128.63"]),
    ("ect §6 tuned_from_edm_204.8M", "cifar10", ["152.21"]),
    ("ect §6 cifar10_uncond_fd_dinov2_pretrain", "cifar10", ["150.39", "168.17"]),
    ("ect §6 compute_scaling_fit one_step", "cifar10", ["263", "-0.060", "-0.9940"]),
    ("ect §6 compute_scaling_fit two_step", "cifar10", ["164", "-0.028", "-0.9996"]),
    ("ect §6 imagenet512_latent_ecm_m_2step_fid", "imagenet512", ["6.88"]),
    ("ect §6/§4.8 SCT cifar10_uncond_fid_200k", "cifar10", ["3.11", "2.05"]),
    ("ect §6/§4.8 SCT imagenet64_M_fid_100k", "imagenet64", ["3.30", "2.13"]),
    ("ect §6/§4.8 SCT vr_ablation_cifar10_16k_1step", "cifar10", ["5.61", "4.56"]),
    ("gcm C: CT (LPIPS)", "cifar10", ["8.70", "5.83"]), ("gcm C: CD (LPIPS)", "cifar10", ["3.55", "2.93"]),
    ("gcm C: iCT", "cifar10", ["2.83", "2.46"]), ("gcm C: iCT (512 x 400K)", "cifar10", ["3.18"]),
    ("gcm C: iCT-deep", "cifar10", ["2.51", "2.24"]), ("gcm C: ECT", "cifar10", ["3.60", "2.11"]),
    ("gcm C: sCT", "cifar10", ["2.85", "2.06"]), ("gcm C: sCD", "cifar10", ["3.66", "2.52"]),
    ("gcm C: IMM", "cifar10", ["3.20", "1.98"]), ("gcm C: MeanFlow", "cifar10", ["2.92"]),
    ("gcm C: FACM", "cifar10", ["2.69", "1.87"]), ("gcm C: GCM-CU 1024 x 800K", "cifar10", ["2.59", "2.05"]),
    ("gcm C: GCM-VU 1024 x 800K", "cifar10", ["2.53", "1.92"]), ("gcm C: GCM-CU 512 x 400K", "cifar10", ["2.91", "2.19"]),
    ("gcm C: GCM-VU 512 x 400K", "cifar10", ["2.86", "2.11"]), ("gcm C: EDM (Guide)", "cifar10", ["1.97"]),
    ("gcm C: EDM (slides)", "cifar10", ["2.04"]),
    ("gcm C: CD (LPIPS) ImageNet-64", "imagenet64", ["6.20", "4.70"]), ("gcm C: CT ImageNet-64", "imagenet64", ["13.0", "11.1"]),
    ("gcm C: iCT ImageNet-64", "imagenet64", ["4.02", "3.20"]), ("gcm C: iCT-deep ImageNet-64", "imagenet64", ["3.25", "2.77"]),
    ("gcm C: ECT ImageNet-64", "imagenet64", ["2.49", "1.67"]), ("gcm C: sCD ImageNet-64", "imagenet64", ["2.44", "1.66"]),
    ("gcm C: sCT ImageNet-64", "imagenet64", ["2.04", "1.48"]),
    ("gcm C: ECT-S / ECT-S* / CU-S", "imagenet64", ["5.51", "5.83", "5.25", "3.18", "3.47", "3.45"]),
    ("gcm C: ECT-XL / ECT-XL* / CU-XL", "imagenet64", ["3.35", "3.56", "3.44", "1.96", "2.10", "1.98"]),
    ("scm 8 headline 2-step: CIFAR-10, ImageNet-64, ImageNet-512", None, ["2.06", "1.48", "1.88"]),
    ("scm 8 teachers compared in the text", None, ["2.01", "1.33", "1.73"]), ("scm 8 own TrigFlow teachers", None, ["2.15", "1.38"]),
    ("scm 8 headline ImageNet-64 in Table 1", "imagenet64", ["2.04", "1.48"]), ("scm 8 headline ImageNet-512", "imagenet512", ["1.88", "1.73"]),
]
_NUM_TOKEN = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def _numbers(table) -> set[str]:
    """Every number printed in the table, also those inside text cells ('EDM 168.17')."""
    out = set()
    for row in table["rows"]:
        for cell in row["cells"]:
            for v in cell_values(cell):
                out.update(_NUM_TOKEN.findall(v))
    return out


@pytest.mark.parametrize("ref,dataset,numbers", QUICK_REFERENCE, ids=[q[0][:70] for q in QUICK_REFERENCE])
def test_quick_reference_numbers_are_transcribed(ref, dataset, numbers):
    candidates = [t for t in TABLES.values() if dataset is None or t["dataset"] in (dataset, None)]
    assert any(set(numbers) <= _numbers(t) for t in candidates), f"{ref}: {numbers} not all in one table"


def test_transcription_counts_per_paper():
    counts = {p: sum(t["paper"] == p for t in TABLES.values()) for p in PAPERS}
    assert counts == {"ect": 10, "stable_ct": 3, "scm": 12, "gcm": 19, "cm": 11}


# ---- the schema check at load: one line naming the file and the field
GOOD = {"paper": "ect", "table": "1", "order": 1, "caption": "c", "dataset": "cifar10", "metric": "fid",
        "source": {"spec": "ect_sct.md", "section": "3.11"},
        "columns": [{"label": "Method", "kind": "text", "role": "method"}, {"label": "FID", "kind": "number", "metric": "fid"}],
        "rows": [{"cells": ["iCT", "2.83"], "method": "ict"}], "footnotes": [{"mark": "a", "text": "note"}]}


def _bad(tmp_path, **change):
    doc = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in change.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    path = tmp_path / "ect_bad.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    with pytest.raises(ReferenceError) as err:
        load_table(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ect_bad.yaml: ")
    return msg


def test_schema_accepts_the_good_table(tmp_path):
    path = tmp_path / "ect_good.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert load_table(path).name == "ect_good"


def test_schema_errors_name_file_and_field(tmp_path):
    assert _bad(tmp_path, caption=None) == "ect_bad.yaml: caption: missing"
    assert _bad(tmp_path, paper="edm").startswith("ect_bad.yaml: paper: 'edm' is not one of ect, stable_ct, scm, gcm, cm")
    assert _bad(tmp_path, rows=[{"cells": ["iCT", 2.83]}]).startswith("ect_bad.yaml: rows[0].cells[1]: cell values are strings")
    assert _bad(tmp_path, rows=[{"cells": ["iCT", "2.8x"]}]).startswith("ect_bad.yaml: rows[0].cells[1]: '2.8x' is not a number")
    assert _bad(tmp_path, rows=[{"cells": ["iCT"]}]).startswith("ect_bad.yaml: rows[0].cells: needs 2 cells")
    assert _bad(tmp_path, rows=[{"cells": ["iCT", {"v": "2.83", "mark": "z"}]}]).startswith(
        "ect_bad.yaml: rows[0].cells[1]: footnote mark 'z' has no footnote")
    assert _bad(tmp_path, columns=[{"label": "Method", "kind": "text"}, {"label": "FID", "kind": "float"}]).startswith(
        "ect_bad.yaml: columns[1].kind: 'float' is not one of number, text")
    assert _bad(tmp_path, colour="red").startswith("ect_bad.yaml: colour: unknown field")


def test_bad_reference_file_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "ect_x.yaml").write_text(yaml.safe_dump({**GOOD, "order": "first"}))
    monkeypatch.setattr(tables, "load_tables", lambda paper: load_tables(paper, tmp_path))
    assert tables.main(["--paper", "ect"]) == 2
    assert capsys.readouterr().err.strip() == "harness.analysis.tables: ect_x.yaml: order: must be an integer (position of the table in its paper)"


def test_every_reference_file_loads_and_is_named_by_paper():
    files = sorted(REFERENCE_DIR.glob("*.yaml"))
    assert len(files) == len(TABLES) == 55
    for path in files:
        assert path.stem.startswith(load_table(path)["paper"] + "_"), path.name
