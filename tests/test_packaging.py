"""pyproject.toml against the code: every third-party import is a declared dependency, every console script
resolves to a main(argv=None) -> int, and the reference tables and sweep specs a wheel carries are found
where harness.analysis.reference looks (or the commands say, on one line, that they are missing)."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from harness.analysis import reference, tables

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = ("harness", "methods", "launchers")
# import name -> distribution name where they differ (the rest: the import name itself)
DIST_OF_IMPORT = {"yaml": "pyyaml", "cleanfid": "clean-fid", "hydra": "hydra-core", "sklearn": "scikit-learn",
                  "PIL": "pillow", "cv2": "opencv-python", "skimage": "scikit-image"}
SCRIPTS = {"cmbench-train": "harness.train.cli:main", "cmbench-sweep": "harness.sweep.driver:main",
           "cmbench-evaluate": "harness.eval.evaluate:main", "cmbench-collect": "harness.analysis.collect:main",
           "cmbench-tables": "harness.analysis.tables:main"}
GOOD = {"paper": "ect", "table": "Table 1", "order": 1, "caption": "c", "dataset": "cifar10", "metric": "fid",
        "source": {"spec": "ect.md", "section": "4"}, "footnotes": [],
        "columns": [{"label": "Method", "kind": "text", "role": "method"}, {"label": "FID", "kind": "number"}],
        "rows": [{"cells": ["iCT", "2.83"]}]}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _canon(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group(0))


def third_party_imports() -> dict[str, set[str]]:
    """Top-level import name -> the files importing it (absolute imports only; stdlib and own packages left out)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    project = PYPROJECT["project"]
    required = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    imports = third_party_imports()
    assert {"torch", "numpy", "yaml", "omegaconf"} <= set(imports)  # the scan sees the imports at all
    missing = {name: sorted(files) for name, files in imports.items()
               if _canon(DIST_OF_IMPORT.get(name, name)) not in required | extras}
    assert not missing, f"imported but not declared in pyproject.toml [project] dependencies: {missing}"
    # the extras are only what the GPU attention backends (gpu: xformers, triton) and the W&B logger import
    assert {_canon(DIST_OF_IMPORT.get(n, n)) for n in imports} - required <= {"xformers", "triton", "wandb"}


def test_console_scripts_are_declared():
    assert PYPROJECT["project"]["scripts"] == SCRIPTS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_target_is_main_returning_an_exit_code(script, monkeypatch, capsys):
    module, _, attr = SCRIPTS[script].partition(":")
    main = getattr(importlib.import_module(module), attr)
    assert callable(main)
    params = list(inspect.signature(main).parameters.values())
    assert [p.name for p in params] == ["argv"] and params[0].default is None  # main() reads sys.argv
    assert inspect.signature(main).return_annotation in (int, "int")
    # as the console-script wrapper calls it: sys.exit(main()), the arguments in sys.argv
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    try:
        rc = main()
    except SystemExit as exc:  # argparse's --help
        rc = exc.code
    assert rc == 0
    assert capsys.readouterr().out.strip()


def test_wheel_data_files_are_where_reference_looks():
    data = PYPROJECT["tool"]["setuptools"]["data-files"]
    assert data == {"share/cmbench/reference": ["results/reference/*.yaml"], "share/cmbench/sweeps": ["sweeps/*.yaml"]}
    assert reference.SOURCE_DIR == ROOT / "results" / "reference"
    assert list(ROOT.glob("sweeps/*.yaml")) and list(ROOT.glob("results/reference/*.yaml"))


def test_reference_tables_found_in_the_checkout(monkeypatch):
    monkeypatch.delenv(reference.ENV_VAR, raising=False)
    assert reference.reference_dir() == reference.SOURCE_DIR == reference.REFERENCE_DIR
    assert reference.installed_data_dir("reference") is None  # an editable install carries no copy
    assert {t["paper"] for t in reference.load_tables()} == set(reference.PAPERS)


def test_env_var_names_the_tables(tmp_path, monkeypatch, capsys):
    (tmp_path / "ect_only.yaml").write_text(yaml.safe_dump(GOOD))
    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path))
    assert reference.reference_dir() == tmp_path
    assert [t.name for t in reference.load_tables("all")] == ["ect_only"]
    assert tables.main(["--paper", "ect"]) == 0
    assert "iCT" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    assert tables.main(["--paper", "ect"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.startswith("harness.analysis.tables: no reference tables")
    return err


def test_missing_env_dir_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path / "nowhere"))
    err = _one_line_error(capsys)
    assert f"{reference.ENV_VAR}={tmp_path / 'nowhere'}" in err


def test_missing_tables_is_a_one_line_error_naming_both_places(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(reference.ENV_VAR, raising=False)
    monkeypatch.setattr(reference, "SOURCE_DIR", tmp_path / "results" / "reference")
    err = _one_line_error(capsys)
    assert str(tmp_path / "results" / "reference") in err and "share/cmbench/reference" in err
    assert reference.ENV_VAR in err
    installed = tmp_path / "share" / "cmbench" / "reference"  # a wheel's copy, found once the checkout's is gone
    installed.mkdir(parents=True)
    (installed / "ect_only.yaml").write_text(yaml.safe_dump(GOOD))
    monkeypatch.setattr(reference, "installed_data_dir", lambda name: installed if name == "reference" else None)
    assert reference.reference_dir() == installed
    assert tables.main(["--paper", "ect"]) == 0


def test_explicit_empty_root_is_an_error(tmp_path):
    with pytest.raises(reference.ReferenceError, match="no reference tables"):
        reference.load_tables("ect", tmp_path)


def _tree_copy(dest: Path) -> Path:
    """The working tree's tracked and untracked-not-ignored files (no stale build/ of the checkout)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_prints_the_ect_tables(tmp_path):
    """Build a wheel, install it (no deps; the project's site-packages lend them) and run it outside the repo."""
    src = _tree_copy(tmp_path / "src")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop(reference.ENV_VAR, None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "whl"), str(src)], check=True, env=env, capture_output=True)
    (wheel,) = (tmp_path / "whl").glob("cmbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.rsplit("/", 1)[-1] for n in names if "/data/share/cmbench/reference/" in n}
    assert shipped == {p.name for p in (ROOT / "results" / "reference").glob("*.yaml")}
    assert {n.rsplit("/", 1)[-1] for n in names if "/data/share/cmbench/sweeps/" in n} == \
        {p.name for p in (ROOT / "sweeps").glob("*.yaml")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    deps = sysconfig.get_path("purelib")  # this interpreter's: torch, numpy, ... for the fresh venv
    Path(purelib, "cmbench_deps.pth").write_text(deps + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, env=env, capture_output=True)
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True)
    where = subprocess.run([str(python), "-c", "import harness; print(harness.__file__)"], check=True, **run)
    assert where.stdout.strip().startswith(purelib)  # the wheel's copy, not the checkout
    out = subprocess.run([str(venv / "bin" / "cmbench-tables"), "--paper", "ect"], check=True, **run).stdout
    assert out.startswith("## ECT: Consistency Models Made Easy") and "### ECT Table 1" in out
    shutil.rmtree(venv / "share" / "cmbench" / "reference")
    gone = subprocess.run([str(python), "-m", "harness.tables", "--paper", "ect"], **run)
    assert gone.returncode == 2 and gone.stdout == "" and len(gone.stderr.strip().splitlines()) == 1
    assert "share/cmbench/reference" in gone.stderr
