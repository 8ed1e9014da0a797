"""The papers' results tables as data: load results/reference/*.yaml and check each against one schema.

A table file holds one table (or one panel of a multi-panel table) transcribed from the specs:

    paper, table, order, caption, dataset, metric, source{spec, section, seed}, columns, rows, footnotes
    [panel, conditional, kind]

Numbers stay strings ('2.20', not 2.2) so printing reproduces the paper's digits. A cell is null (empty),
a string, a list of strings (printed 'a / b', the sCM tables' '1 / 2' cells), or a mapping
{v: <string or list>, bold, underline, italic: bool, mark: <footnote mark>}.

Where the tables are (reference_dir): $CMBENCH_REFERENCE_DIR when set (then only there); else the checkout's
results/reference/ (a source tree or an editable install); else the copy an installed wheel carries as data
files, <prefix>/share/cmbench/reference/ (pyproject.toml [tool.setuptools.data-files]; found through the
installed distribution's file list, so a venv, --user or --prefix install alike). None of them holding a
*.yaml is a one-line ReferenceError naming the places looked at. The wheel puts the sweep specs (sweeps/*.yaml)
beside them, in <prefix>/share/cmbench/sweeps/ (installed_data_dir("sweeps")).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

PAPERS = ("ect", "stable_ct", "scm", "gcm", "cm")  # ect: ECT; stable_ct: SCT (Stable CT, as method=stable_ct); scm: sCM; gcm: the Guide; cm: the slides
ENV_VAR = "CMBENCH_REFERENCE_DIR"  # a directory of reference *.yaml; overrides every other place
SOURCE_DIR = Path(__file__).resolve().parents[2] / "results" / "reference"  # in a checkout
NUMBER = re.compile(r"^~?-?\d+(\.\d+)?(×\d+)?$")  # as printed: '2.20', '-0.060', '250×2', '~7.8'
DASHES = frozenset({"–", "-", "—"})  # a printed dash: no entry
_TABLE_KEYS = {"paper", "table", "order", "caption", "dataset", "metric", "source", "columns", "rows", "footnotes",
               "panel", "conditional", "kind"}
_REQUIRED = ("paper", "table", "order", "caption", "dataset", "metric", "source", "columns", "rows", "footnotes")
_COLUMN_KEYS = {"label", "kind", "role", "nfe", "metric"}
_ROW_KEYS = {"cells", "method", "where", "dataset", "nfe"}  # nfe: the row's NFE where no column gives it
_CELL_KEYS = {"v", "bold", "underline", "italic", "mark"}
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: several times faster
_CACHE: dict[tuple[str, int, int], Table] = {}  # (path, mtime_ns, size) -> checked table (read-only)


class ReferenceError(ValueError):
    """A reference table file that does not match the schema; the message names the file and the field."""


@dataclass(frozen=True)
class Table:
    """One checked reference table; `doc` is the YAML mapping as loaded."""

    name: str  # file stem, e.g. ect_table1_cifar10 (the file name while checking)
    doc: dict

    def __getitem__(self, key: str):
        return self.doc[key]

    def get(self, key: str, default=None):
        return self.doc.get(key, default)


def cell_values(cell) -> list[str]:
    """The printed values of a cell (empty for an empty cell)."""
    v = cell.get("v") if isinstance(cell, dict) else cell
    if v is None:
        return []
    return list(v) if isinstance(v, list) else [v]


def _fail(name: str, field: str, problem: str) -> None:
    raise ReferenceError(f"{name}: {field}: {problem}")


def _check_cell(name: str, where: str, cell, numeric: bool, marks: set[str]) -> None:
    if isinstance(cell, dict):
        extra = set(cell) - _CELL_KEYS
        if extra or "v" not in cell:
            _fail(name, where, f"cell mapping needs 'v' and only {sorted(_CELL_KEYS)}; got {sorted(cell)}")
        for flag in ("bold", "underline", "italic"):
            if not isinstance(cell.get(flag, False), bool):
                _fail(name, where, f"'{flag}' must be true or false")
        if "mark" in cell and str(cell["mark"]) not in marks:
            _fail(name, where, f"footnote mark '{cell['mark']}' has no footnote; marks: {sorted(marks)}")
        value = cell["v"]
    else:
        value = cell
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is not None and not isinstance(item, str):
            _fail(name, where, f"cell values are strings as printed (quote numbers: '2.20'); got {item!r}")
        if numeric and item is not None and item not in DASHES and not NUMBER.match(item):
            _fail(name, where, f"'{item}' is not a number as printed (e.g. '2.20', '250×2') nor a dash")


def _check_columns(name: str, columns) -> None:
    if not isinstance(columns, list) or not columns:
        _fail(name, "columns", "must be a non-empty list")
    for j, col in enumerate(columns):
        where = f"columns[{j}]"
        if not isinstance(col, dict) or set(col) - _COLUMN_KEYS or "label" not in col:
            _fail(name, where, f"a mapping with 'label', 'kind' and optional role/nfe/metric; got {col!r}")
        if col.get("kind") not in ("number", "text"):
            _fail(name, where + ".kind", f"'{col.get('kind')}' is not one of number, text")
        if col.get("role") not in (None, "group", "method", "nfe"):
            _fail(name, where + ".role", f"'{col.get('role')}' is not one of group, method, nfe")
        if "nfe" in col and not (isinstance(col["nfe"], int) and col["nfe"] > 0):
            _fail(name, where + ".nfe", f"must be a positive integer; got {col['nfe']!r}")


def _check_rows(name: str, rows, columns, marks: set[str]) -> None:
    if not isinstance(rows, list) or not rows:
        _fail(name, "rows", "must be a non-empty list")
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict) or "cells" not in row or set(row) - _ROW_KEYS:
            _fail(name, where, f"a mapping with 'cells' and optional method/where/dataset/nfe; got {row!r}")
        if not isinstance(row["cells"], list) or len(row["cells"]) != len(columns):
            _fail(name, where + ".cells", f"needs {len(columns)} cells (one per column); got {len(row['cells'])}")
        if "nfe" in row and not (isinstance(row["nfe"], int) and row["nfe"] > 0):
            _fail(name, where + ".nfe", f"must be a positive integer; got {row['nfe']!r}")
        if "where" in row and not isinstance(row["where"], dict):
            _fail(name, where + ".where", "must map collector columns to values")
        for j, cell in enumerate(row["cells"]):
            _check_cell(name, f"{where}.cells[{j}]", cell, columns[j]["kind"] == "number", marks)


def check_table(name: str, doc) -> Table:
    """Validate one loaded YAML document; raises ReferenceError naming the file and field."""
    if not isinstance(doc, dict):
        _fail(name, "(top level)", "must be a mapping")
    for key in _REQUIRED:
        if key not in doc:
            _fail(name, key, "missing")
    extra = set(doc) - _TABLE_KEYS
    if extra:
        _fail(name, sorted(extra)[0], f"unknown field; valid: {', '.join(sorted(_TABLE_KEYS))}")
    if doc["paper"] not in PAPERS:
        _fail(name, "paper", f"'{doc['paper']}' is not one of {', '.join(PAPERS)}")
    for key in ("table", "caption"):
        if not isinstance(doc[key], str) or not doc[key]:
            _fail(name, key, "must be a non-empty string")
    if not isinstance(doc["order"], int):
        _fail(name, "order", "must be an integer (position of the table in its paper)")
    source = doc["source"]
    if not isinstance(source, dict) or not source.get("spec") or not source.get("section"):
        _fail(name, "source", "must give 'spec' (file) and 'section'")
    footnotes = doc["footnotes"]
    if not isinstance(footnotes, list) or any(not isinstance(f, dict) or "text" not in f for f in footnotes):
        _fail(name, "footnotes", "must be a list of {mark, text}")
    marks = {str(f.get("mark", "")) for f in footnotes} - {""}
    _check_columns(name, doc["columns"])
    _check_rows(name, doc["rows"], doc["columns"], marks)
    return Table(name, doc)


def load_table(path: Path) -> Table:
    """Read and check one reference YAML file (cached while the file is unchanged)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _CACHE:
        _CACHE[key] = _read_table(path)
    return _CACHE[key]


def _read_table(path: Path) -> Table:
    try:
        doc = yaml.load(path.read_text(), Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise ReferenceError(f"{Path(path).name}: (yaml): {str(exc).splitlines()[0]}") from None
    table = check_table(Path(path).name, doc)
    return Table(Path(path).stem, table.doc)


def installed_data_dir(name: str) -> Path | None:
    """<prefix>/share/cmbench/<name> (reference, sweeps) as installed from a wheel, or None (a checkout, an
    editable install): read from the file list of the installed cmbench distribution that holds this module."""
    here = Path(__file__).resolve()
    for dist in importlib.metadata.distributions(name="cmbench"):
        files = dist.files or []
        if not any(f.as_posix() == "harness/analysis/reference.py" and Path(dist.locate_file(f)).resolve() == here
                   for f in files):
            continue  # another cmbench on sys.path (e.g. an editable install seen through a .pth file)
        for f in files:
            if f.parts[-4:-1] == ("share", "cmbench", name):
                return Path(dist.locate_file(f)).resolve().parent
    return None


def _has_tables(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.yaml"))


def reference_dir() -> Path:
    """The directory of the reference tables (see the module docstring for the order the places are tried)."""
    env = os.environ.get(ENV_VAR)
    if env:
        places = [Path(env).expanduser()]
    else:
        installed = installed_data_dir("reference")
        places = [SOURCE_DIR] + ([installed] if installed else [])
    for place in places:
        if _has_tables(place):
            return place
    if env:
        where = f"{ENV_VAR}={places[0]}"
    else:
        where = f"{SOURCE_DIR} nor {installed or 'an installed wheel (<prefix>/share/cmbench/reference)'}"
    raise ReferenceError(f"no reference tables (*.yaml) in {where}; set {ENV_VAR} to a directory holding "
                         f"results/reference/*.yaml, or install cmbench from a wheel built from the repository")


def _reference_dir_at_import() -> Path:
    try:
        return reference_dir()
    except ReferenceError:
        return SOURCE_DIR


REFERENCE_DIR = _reference_dir_at_import()  # where the tables were at import; load_tables looks again each call


def load_tables(paper: str = "all", root: Path | str | None = None) -> list[Table]:
    """Every table of `paper` (or of all papers), in paper order then the order the tables appear; `root`
    defaults to reference_dir(). A root without a *.yaml is a one-line ReferenceError (never an empty list)."""
    if paper != "all" and paper not in PAPERS:
        raise ReferenceError(f"unknown paper '{paper}'; valid: {', '.join(PAPERS)}, all")
    root = reference_dir() if root is None else Path(root)
    files = sorted(root.glob("*.yaml"))
    if not files:
        raise ReferenceError(f"no reference tables (*.yaml) in {root}")
    tables = [load_table(p) for p in files]
    if paper != "all":
        tables = [t for t in tables if t["paper"] == paper]
    return sorted(tables, key=lambda t: (PAPERS.index(t["paper"]), t["order"], t.name))
