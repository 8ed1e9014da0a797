"""Mutation check: plant one known bug at a time in a copy of the code and run the fast tests that guard it.

    .venv/bin/python scripts/mutation_check.py                 # every mutant, its own tests (~5 min)
    .venv/bin/python scripts/mutation_check.py --only scm-     # mutants whose name starts with scm-
    .venv/bin/python scripts/mutation_check.py --fast-suite    # each mutant against the whole fast suite
    .venv/bin/python scripts/mutation_check.py --list          # the table, nothing run

Each mutant replaces one exact source string (it must occur exactly once, or the check stops: a mutant
that no longer applies is a stale table, not a pass). The copy holds the tracked files of this checkout
(`git ls-files`) with the working tree's contents, so an uncommitted test counts. A mutant is `caught`
when pytest reports failing tests (exit code 1), `survived` when the tests pass, and `error` for any
other outcome (collection error, timeout). Before the mutants, the same tests run on the unmutated copy
and must pass. Writes results/mutation_check.json (mutant, file, outcome, failing tests, seconds) and
exits 1 when any mutant survived or errored.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAST = "not slow and not distributed and not slurm"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str = ""


MUTANTS: tuple[Mutant, ...] = (
    # --- issue 18's table ---------------------------------------------------------------------------
    Mutant("scm-jvp-sign", "methods/scm.py", "- r * (cos * sin * x_t + jvp_out)", "+ r * (cos * sin * x_t + jvp_out)",
           ("tests/test_scm_reference.py",), "sign of the r (cos t sin t x_t + JVP) term flipped"),
    Mutant("scm-time-tangent-sigma-d", "methods/scm.py", "sd * torch.cos(t) * torch.sin(t)", "torch.cos(t) * torch.sin(t)",
           ("tests/test_scm_reference.py",), "time tangent sigma_d cos t sin t without sigma_d"),
    Mutant("scm-adaptive-weight-sign", "methods/scm.py", "torch.exp(w) * per", "torch.exp(-w) * per",
           ("tests/test_scm_reference.py",), "adaptive weight exp(w) replaced by exp(-w)"),
    Mutant("gcm-mmd-row-weight", "methods/gcm.py", "omega / dt", "omega * dt",
           ("tests/test_gcm_reference.py",), "MMD row weight omega / dt replaced by omega * dt"),
    Mutant("cm-sampler-clamp", "methods/cm.py", "return x0.clamp(-1, 1) if c.clip_denoised else x0", "return x0",
           ("tests/test_sampler_reference.py",), "the CT/iCT/CD sampler's clamp to [-1, 1] removed"),
    Mutant("fit-t-dof", "harness/analysis/fit.py", "stats.t.ppf((1.0 + level) / 2.0, n - 2)", "stats.t.ppf((1.0 + level) / 2.0, n)",
           ("tests/test_fit.py",), "the t-interval with n instead of n - 2 degrees of freedom"),
    Mutant("checkpoint-keeps-one-more", "harness/train/checkpoint.py", "list_checkpoints(run_dir)[keep:]",
           "list_checkpoints(run_dir)[keep + 1:]", ("tests/test_trainer_wiring.py",),
           "retention keeps one checkpoint more than configured"),
    Mutant("trainer-ema-never-updated", "harness/train/trainer.py", "e.update(self.engine.module, step)", "(lambda *a: None)(self.engine.module, step)",
           ("tests/test_trainer_wiring.py",), "the EMAs are never updated"),
    Mutant("ect-target-at-xt", "methods/ect.py", "return x0 + as_column(r, x0) * eps, x0, {}", "return x0 + as_column(t, x0) * eps, x0, {}",
           ("tests/test_ect.py",), "ECT's target at x_t instead of x_r"),
    Mutant("stable-ct-one-minus-r-over-t", "methods/stable_ct.py", "as_column(1 - r / t, x0)", "as_column(r / t, x0)",
           ("tests/test_stable_ct.py",), "SCT's (1 - r/t) replaced by r/t"),
    Mutant("fit-90-percent", "harness/analysis/fit.py", "(1.0 + level) / 2.0", "level",
           ("tests/test_fit.py",), "a 90% interval where 95% is asked (level used as the quantile)"),
    # --- beyond the table: the EMA formula, GCM's weight, the sampler protocol ------------------------
    Mutant("ema-power-exponent", "harness/train/ema.py", "** (self.gamma + 1.0)", "** self.gamma",
           ("tests/test_trainer_wiring.py",), "power EMA beta = (1 - 1/t)^gamma instead of ^(gamma + 1) [EDM2 eq. 2]"),
    Mutant("gcm-gamma-weight", "methods/gcm_schedules.py", "t.pow(gamma) * torch.exp(-lam * t)",
           "t.pow(gamma + 1) * torch.exp(-lam * t)", ("tests/test_gcm_reference.py",),
           "GCM's Gamma loss weight t^gamma e^(-lambda t) with the wrong power"),
    Mutant("search-picks-worst", "harness/eval/score.py", "min(tried, key=lambda r: finite_or_inf(r[2]))",
           "max(tried, key=lambda r: finite_or_inf(r[2]))", ("tests/test_sampler_search.py",),
           "the mid-point search keeps the worst grid point"),
    Mutant("selection-uses-reported-noise", "harness/eval/score.py", "sel_seed = ecfg.seed + SELECTION_SEED_OFFSET",
           "sel_seed = ecfg.seed", ("tests/test_sampler_search.py",),
           "selection samples reuse the reported score's noise"),
    Mutant("selection-scored-on-heldout", "harness/eval/score.py", "sel_value = value_of(selection, sample(net, steps, sel_seed, sel_num)[0])",
           "sel_value = value_of(metric, sample(net, steps, sel_seed, sel_num)[0])", ("tests/test_sampler_search.py",),
           "the selection score of a 1-step sampler computed on the held-out set"),
)


@dataclass
class Outcome:
    name: str
    file: str
    why: str
    outcome: str                       # caught | survived | error | baseline-failed
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    detail: str = ""


def copy_tree(dest: Path) -> None:
    """The tracked files of this checkout, with the working tree's contents, into dest."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(tree: Path, m: Mutant) -> str:
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: {m.old!r} occurs {count} times in {m.file} (must be exactly once); "
                         f"update MUTANTS in {Path(__file__).name}")
    path.write_text(text.replace(m.old, m.new))
    return text


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, list[str], str]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", FAST, "-rf", *tests]
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, [], f"timed out after {timeout:.0f} s"
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return proc.returncode, failed, proc.stdout[-2000:]


def check_imports_copy(tree: Path) -> None:
    """The copy, not this checkout (installed in editable mode), must be what the tests import."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", "import methods, harness; print(methods.__file__); "
                          "print(harness.__file__)"], cwd=tree, env=env, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        if not Path(line).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the copy imports {line}, not the mutated tree {tree}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="run only mutants whose name starts with this prefix")
    ap.add_argument("--fast-suite", action="store_true", help="run the whole fast suite for every mutant")
    ap.add_argument("--list", action="store_true", help="print the mutants and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    ap.add_argument("--out", default=str(ROOT / "results" / "mutation_check.json"), help="JSON written here")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if m.name.startswith(args.only)]
    if not mutants:
        names = ", ".join(m.name for m in MUTANTS)
        print(f"error: no mutant name starts with {args.only!r}; known: {names}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.file:24s} {m.why}  [{' '.join(m.tests)}]")
        return 0
    results: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cmbench-mutants-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        check_imports_copy(tree)
        for m in mutants:                       # every mutant must apply before anything runs
            original = apply(tree, m)
            (tree / m.file).write_text(original)
        suites = {("tests",) if args.fast_suite else m.tests for m in mutants}
        for tests in sorted(suites):
            rc, failed, tail = run_tests(tree, tests, args.timeout)
            if rc != 0:
                print(f"baseline: {' '.join(tests)} fail unmutated (exit {rc}); fix them first\n{tail}")
                return 1
            print(f"baseline  passed  {' '.join(tests)}")
        for m in mutants:
            original = apply(tree, m)
            start = time.perf_counter()
            rc, failed, tail = run_tests(tree, ("tests",) if args.fast_suite else m.tests, args.timeout)
            (tree / m.file).write_text(original)
            outcome = {0: "survived", 1: "caught"}.get(rc, "error")
            results.append(Outcome(m.name, m.file, m.why, outcome, failed, round(time.perf_counter() - start, 1),
                                   "" if outcome == "caught" else tail))
            print(f"{outcome:9s} {m.name:32s} {results[-1].seconds:6.1f} s  {' '.join(failed[:2])}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": " ".join(["scripts/mutation_check.py", *(argv if argv is not None else sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "suite": "fast suite" if args.fast_suite else "each mutant's tests",
               "caught": sum(r.outcome == "caught" for r in results), "total": len(results),
               "mutants": [asdict(r) for r in results]}
    tmp_out = out.with_name(f".{out.name}.tmp")
    tmp_out.write_text(json.dumps(payload, indent=2) + "\n")
    tmp_out.replace(out)
    print(f"{payload['caught']}/{payload['total']} caught; wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if payload["caught"] == payload["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
