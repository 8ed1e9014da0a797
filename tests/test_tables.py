"""results/reference/ and harness.tables: transcription consistency, the ECT CIFAR-10 table as printed,
LaTeX shape, the schema check, and the cmbench columns from a collector DataFrame."""

import re
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness import tables
from harness.reference import PAPERS, REFERENCE_DIR, ReferenceError, cell_values, load_table, load_tables

TABLES = {t.name: t for t in load_tables()}
S12 = ("1-step", "2-step")


def _row(name: str, sel):
    """A row by index, by its method cell, or by (method cell, another value in the row)."""
    t = TABLES[name]
    if isinstance(sel, int):
        return t["rows"][sel]
    mcol = next(j for j, c in enumerate(t["columns"]) if c.get("role") == "method")
    method, other = (sel, None) if isinstance(sel, str) else sel
    hits = [r for r in t["rows"] if " / ".join(cell_values(r["cells"][mcol])) == method
            and (other is None or any(other in cell_values(c) for c in r["cells"]))]
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
     ("gcm_table5_cost", ("CU (Ours)", "204.8M"), S12), ("gcm_table11_ect", "f) + Time-aware MMD Loss", S12)]),
    ("gcm A.14: Tab. 3 J = Tab. 10 M", [("gcm_table3_vu", "J + Loss Weighting", S12), ("gcm_table10_vu", "M + s-sampling", S12)]),
    ("gcm A.14: Tab. 3 K = Tab. 7d ✗ = Tab. 7e VU = Tab. 7i group 1 = Tab. 7j finite difference (= Tab. 10 K)",
     [("gcm_table3_vu", "K + t-sampling", S12), ("gcm_table7d_cifar10", "✗", S12), ("gcm_table7e_cifar10", "VU (Ours)", S12),
      ("gcm_table7i_cifar10", 0, S12), ("gcm_table7j_cifar10", "Finite Difference", S12), ("gcm_table10_vu", "K + t-sampling", S12)]),
    ("gcm A.14: Tab. 3 L = Tab. 5 VU 512/400K = Tab. 7h DDPM++ = Tab. 7i last row (= Tab. 10 L)",
     [("gcm_table3_vu", "L + Time-aware MMD Loss", S12), ("gcm_table5_cost", ("VU (Ours)", "204.8M"), S12),
      ("gcm_table7h_cifar10", "DDPM++", S12), ("gcm_table7i_cifar10", 2, S12), ("gcm_table10_vu", "L + Time-aware MMD loss", S12)]),
    ("gcm A.14: Tab. 5 VU 1024/400K = Tab. 9 row 2", [("gcm_table5_cost", ("VU (Ours)", "409.6M"), S12), ("gcm_table9_cifar10", 1, S12)]),
    ("gcm A.14: Tab. 2 C = Tab. 7c row 3", [("gcm_table2_cu", "C + Time Preconditioning", S12), ("gcm_table7c_cifar10", 2, S12)]),
    ("gcm A.14: Tab. 2 B ~ Tab. 7c row 1 (1-step; the 2-step is AMBIG-6)",
     [("gcm_table2_cu", "B + Discretization Function", ("1-step",)), ("gcm_table7c_cifar10", 0, ("1-step",))]),
    # gcm A.13 headline claims, App. I figure captions, AMBIG-15 (Tab. 4 is the 1024 x 800K run)
    ("gcm A.13: CU 1024x800K = Tab. 4 = Figs. 5/6", [_nfe("gcm_table4_cifar10", "CU (Ours)", "FID"),
     ("gcm_table5_cost", ("CU (Ours)", "819.2M"), S12), _rows("gcm_figcaptions", ["Fig. 5: CIFAR-10 CU 1-step", "Fig. 6: CU 2-step"], "FID")]),
    ("gcm A.13: VU 1024x800K = Tab. 4 = Figs. 7/8", [_nfe("gcm_table4_cifar10", "VU (Ours)", "FID"),
     ("gcm_table5_cost", ("VU (Ours)", "819.2M"), S12), _rows("gcm_figcaptions", ["Fig. 7: VU 1-step", "Fig. 8: VU 2-step"], "FID")]),
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
    ("ect 4.7: SCT Table 2 ECT-M = Table E7 ECM-M", [_nfe("sct_table2_imagenet64", "ECT-M", "FID (↓)"),
     _rows("ect_table7_configs", F12, "ECM-M")]),
    ("ect §5 A12: ECT's own 400k CIFAR-10 = sCM Table 1 ECT = Guide Tab. 4 ECT", [_nfe("ect_table1_cifar10", "ECM (400k iters)", "FID↓"),
     ("scm_table1_cifar10", "ECT", ("FID",)), [("gcm_table4_cifar10", "ECT (Geng et al., 2024)", ("FID",)), ("gcm_table4_cifar10", "ECT", ("FID",))]]),
    ("gcm part C: ECT ImageNet-64 2.49/1.67 (sCM table) = ECT E1 ECM-XL*", [("scm_table1_imagenet64", "ECT", ("FID",)),
     _nfe("cm_scm_imagenet64", "ECT", "FID"), _nfe("ect_table1_imagenet64", "ECM-XL*", "FID↓")]),
    # gcm_ct_ict_cd.md part C: CIFAR-10 baselines shared by the slides, ECT, SCT, sCM and the Guide
    ("gcm part C: CT (LPIPS) 8.70/5.83 (slides; Guide Tab. 5)", [_nfe("cm_ct_cifar10", "CT", "FID"), ("gcm_table5_cost", "CT", S12),
     _nfe("cm_ict_cifar10", "CT (LPIPS)", "FID"), _nfe("sct_table1_cifar10", "CT (LPIPS)", "FID (↓)")]),
    ("gcm part C: CD (LPIPS) 3.55/2.93 (slides)", [_nfe("cm_cd_cifar10", "CD", "FID"), _nfe("ect_table1_cifar10", "CD (LPIPS)", "FID↓"),
     ("scm_table1_cifar10", "CD (LPIPS)", ("FID",)), _nfe("sct_table1_cifar10", "CD (LPIPS)", "FID (↓)"), _nfe("cm_ict_cifar10", "CD (LPIPS)", "FID")]),
    ("gcm part C: CD 2-step in Guide Tab. 4", [("gcm_table4_cifar10", "CD (Song et al., 2023)", ("FID",)), ("cm_ict_cifar10", ("CD (LPIPS)", "2"), ("FID",))]),
    ("gcm part C: iCT 2.83/2.46 (slides + Guide 1024x400K)", [_nfe("cm_ict_cifar10", "iCT", "FID"), ("gcm_table5_cost", ("iCT", "1024"), S12),
     ("scm_table1_cifar10", "iCT", ("FID",)), _nfe("ect_table1_cifar10", "iCT", "FID↓"), _nfe("sct_table1_cifar10", "iCT", "FID (↓)"),
     [("gcm_table4_cifar10", "iCT (Song & Dhariwal, 2023)", ("FID",)), ("gcm_table4_cifar10", "iCT", ("FID",))]]),
    ("gcm part C: iCT-deep 2.51/2.24 (slides)", [_nfe("cm_ict_cifar10", "iCT-deep", "FID"), ("scm_table1_cifar10", "iCT-deep", ("FID",)),
     _nfe("ect_table1_cifar10", "iCT-deep", "FID↓"), _nfe("sct_table1_cifar10", "iCT-deep", "FID (↓)")]),
    ("gcm part C: sCD CIFAR-10 3.66/2.52 (Guide Tab. 4 = sCM Table 1)", [[("gcm_table4_cifar10", ("sCD (Lu & Song, 2024)", "1"), ("FID",)),
     ("gcm_table4_cifar10", ("sCD", "2"), ("FID",))], ("scm_table1_cifar10", "sCD (ours)", ("FID",))]),
    ("gcm part C + scm 8 headline: sCT CIFAR-10 2-step 2.06", [("gcm_table4_cifar10", ("sCT", "2"), ("FID",)),
     ("scm_text_headline", "CIFAR-10", ("sCM 2-step FID",))]),
    # gcm part C, ImageNet-64: the slides, sCM Table 1, SCT Table 2
    ("gcm part C: CD (LPIPS) ImageNet-64 6.20/4.70", [_nfe("cm_scm_imagenet64", "CD (LPIPS)", "FID"), ("scm_table1_imagenet64", "CD (LPIPS)", ("FID",)),
     ("cm_cd_captions", "ImageNet-64", ("CD 1-step", "CD 2-step")), _nfe("sct_table2_imagenet64", "CD (LPIPS)", "FID (↓)")]),
    ("gcm part C: CT ImageNet-64 13.0/11.1 (slides = SCT Table 2)", [[("cm_ct_imagenet64_lsun", ("CT", "13.0"), ("FID",)),
     ("cm_ct_imagenet64_lsun", ("CT", "11.1"), ("FID",))], _nfe("sct_table2_imagenet64", "CT (LPIPS)", "FID (↓)")]),
    ("gcm part C: iCT ImageNet-64 4.02/3.20", [_nfe("cm_scm_imagenet64", "iCT", "FID"), ("scm_table1_imagenet64", "iCT", ("FID",)),
     _nfe("sct_table2_imagenet64", "iCT", "FID (↓)")]),
    ("gcm part C: iCT-deep ImageNet-64 3.25/2.77", [_nfe("cm_scm_imagenet64", "iCT-deep", "FID"), ("scm_table1_imagenet64", "iCT-deep", ("FID",)),
     _nfe("sct_table2_imagenet64", "iCT-deep", "FID (↓)")]),
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
     ("cm_ct_imagenet64_lsun", ("EDM", "2.44"), ("FID",)), ("sct_table2_imagenet64", "EDM* (Heun)", ("FID (↓)",))]),
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


