"""Reading run directories (harness.train.rundir's layout) into one long pandas DataFrame.

A run directory is any directory holding one of RUN_MARKERS; the search does not descend into one.
Its config is read from config.json when present (json.loads), else from config.yaml (PyYAML's safe
loader without aliases; runs written before config.json existed); nothing read can execute code. Only
regular files are opened (a FIFO named result.json cannot block it) and none over MAX_FILE_BYTES; symlinked
directories are followed once. Every run that is unfinished, failed or unreadable, and every directory it
cannot search, is reported as a problem, never dropped silently, and no file content can make the reader
raise or hang.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RUN_MARKERS = ("config.yaml", "result.json", "evaluate.json", "derived.json", "metrics.jsonl")

# Columns first in this order; then any other score-record fields (sorted), then cfg.* (sorted).
BASE_COLUMNS = ["run_dir", "run", "status", "method", "model", "data", "num_params", "nimg", "flops",
                "train_sec", "train_steps", "precision", "world_size", "source", "ema", "steps", "nfe",
                "metric", "value", "floor", "step", "num_samples", "seed", "reference", "sample_sec", "protocol"]
_RUN_LEVEL = set(BASE_COLUMNS[:13]) | {"source"}
MAX_FILE_BYTES = 64 << 20   # a run's config or result is kilobytes; evaluate.json with grids stays far below


def find_run_dirs(root: Path, skip: tuple[Path, ...] = ()) -> tuple[list[Path], list[dict]]:
    """Directories under root (root included) that hold a run marker, sorted by path, and the directories
    it could not search ([{"run_dir", "problem"}]). A symlinked directory is followed once: one whose
    target was already searched (a loop, or a second link to one folder) is reported, not read again."""
    skip_set = {os.path.realpath(p) for p in skip}
    found: list[Path] = []
    problems: list[dict] = []
    seen: dict[str, str] = {}
    stack = [os.fspath(root)]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in seen:
            problems.append({"run_dir": path, "problem": f"symlink to {real}, already read as {seen[real]}; "
                                                          "skipped"})
            continue
        seen[real] = path
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            problems.append({"run_dir": path, "problem": f"unreadable directory: {type(exc).__name__}: "
                                                          f"{_first_line(exc.strerror or exc)}"})
            continue
        if any(e.name in RUN_MARKERS for e in entries):
            found.append(Path(path))
            continue
        for e in entries:
            if e.name.startswith(".") or os.path.realpath(e.path) in skip_set:
                continue
            try:
                is_dir = e.is_dir()   # follows a symlink; `seen` stops loops
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(e.path)
            elif e.is_symlink() and not os.path.exists(e.path):
                problems.append({"run_dir": e.path, "problem": f"symlink to {os.readlink(e.path)}, which does "
                                                               "not exist; skipped"})
    return sorted(found, key=lambda p: p.as_posix()), problems


def flatten(tree: Any, prefix: str = "cfg.") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'cfg.a.b': 1}; lists become their JSON text, so every cell is a scalar."""
    out: dict[str, Any] = {}
    stack = [(prefix, tree)]
    while stack:
        pre, node = stack.pop()
        for key, value in node.items():
            name = f"{pre}{key}"
            if isinstance(value, dict) and value:
                stack.append((name + ".", value))
            elif isinstance(value, (list, dict)):
                out[name] = json.dumps(value, sort_keys=True)
            else:
                out[name] = value
    return out


def _first_line(text: Any, limit: int = 200) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: a self-referencing or nested alias can make a reader loop
    or grow without bound, and the harness never writes one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases are not read (*{event.anchor})",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _read_text(path: Path) -> str | None:
    """A regular file's text (None when absent). Anything else (a FIFO, a device, a directory) or a file
    over MAX_FILE_BYTES is an OSError rather than a read that blocks or fills memory."""
    try:
        fh = _open_regular(path)
    except FileNotFoundError:
        return None
    with fh:
        info = os.fstat(fh.fileno())
        if info.st_size > MAX_FILE_BYTES:
            raise OSError(f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} a run's file may have")
        return fh.read(MAX_FILE_BYTES + 1).decode("utf-8")


class NotRegularFile(OSError):
    """A run's file that is a FIFO, a device, a directory, ...: never read."""


def _open_regular(path: Path):
    """Open for binary reading without blocking (a FIFO would wait for a writer forever); OSError naming
    the kind of anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    fh = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        fh.close()
        raise NotRegularFile(f"not a regular file ({_file_kind(mode)})")
    return fh


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a plain file"


def _read_mapping(path: Path, kind: str) -> tuple[dict | None, str | None]:
    """(mapping, None), (None, None) when the file is absent, or (None, problem)."""
    try:
        text = _read_text(path)
        if text is None:
            return None, None
        if kind == "yaml":
            data = yaml.load(text, Loader=_NoAliasLoader)
        else:
            data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, OSError):
            return None, f"{path.name} unreadable: {_first_line(exc.strerror or exc)}"
        what = "truncated or corrupt" if kind == "json" else "corrupt"
        return None, f"{path.name} unreadable ({what}): {type(exc).__name__}: {_first_line(exc)}"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a mapping (got {type(data).__name__})"
    return data, None


def _read_config(path: Path) -> tuple[dict | None, str | None]:
    """The run's config: config.json when present (a corrupt one is a problem), else config.yaml."""
    cfg, problem = _read_mapping(path / "config.json", "json")
    if cfg is None and problem is None:
        return _read_mapping(path / "config.yaml", "yaml")
    return cfg, problem


def _last_logged_step(path: Path) -> str:
    try:
        with _open_regular(path) as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
        for line in reversed(lines):
            try:
                return f", last logged step {int(json.loads(line)['step'])}"
            except (ValueError, KeyError, TypeError):
                continue
    except NotRegularFile:
        return ", metrics.jsonl is not a regular file"
    except OSError:
        pass
    return ", nothing logged yet"


def _status_problem(path: Path, status: Any, cfg: dict) -> str | None:
    if status == "completed":
        return None
    if status == "running":
        total = (cfg.get("trainer") or {}).get("steps") if isinstance(cfg.get("trainer"), dict) else None
        of = f" of {total}" if total is not None else ""
        return f"unfinished: status running{_last_logged_step(path / 'metrics.jsonl')}{of}"
    if isinstance(status, str) and status.startswith("failed"):
        return _first_line(status)
    return f"unknown status {_first_line(repr(status), 80)} in result.json"


def _number(value: Any) -> float | None:
    """A JSON number, or one of rundir._clean's non-finite strings; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return None


def _score_rows(records: Any, source: str, problems: list[str], protocol: str = "run") -> dict[tuple, dict]:
    """Valid score records keyed by (protocol, ema, steps, metric); bad ones become problems."""
    out: dict[tuple, dict] = {}
    if not isinstance(records, list):
        problems.append(f"{source}: 'scores' is not a list")
        return out
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "metric" not in rec or "value" not in rec:
            problems.append(f"{source}: score {i} is not a record with metric and value; skipped")
            continue
        value = _number(rec["value"])
        if value is None:
            problems.append(f"{source}: score {i} value {_first_line(repr(rec['value']), 40)} "
                            f"is not a number; skipped")
            continue
        if not math.isfinite(value):
            problems.append(f"{source}: score {i} ({rec.get('metric')}, {rec.get('steps')} steps) is {value}")
        row = {("score." + k if k in _RUN_LEVEL else k):
               (json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v) for k, v in rec.items()}
        row["value"], row["source"], row["protocol"] = value, source, protocol
        out[(protocol, str(rec.get("ema")), str(rec.get("steps")), str(rec.get("metric")))] = row
    return out


def read_run(path: Path, run: str, protocol: str = "run") -> tuple[list[dict], list[str]]:
    """Rows (one per score record) of one run directory, and its problems. `protocol`: "run" (the run's
    own: result.json, with evaluate.json's re-scores in their place), a re-score's protocol id (its
    evaluate-<id>.json alone) or "all" (every file, each row naming its protocol)."""
    problems: list[str] = []
    cfg, bad_cfg = _read_config(path)
    result, bad_result = _read_mapping(path / "result.json", "json")
    for problem in (bad_cfg, bad_result):
        if problem:
            problems.append(problem)
    if cfg is None and bad_cfg is None:
        problems.append("no config.yaml" + ("" if result is not None or bad_result else " and no result.json"))
    if result is None and bad_result is None and cfg is not None:
        problems.append("unfinished: config.yaml only, no result.json")
    if cfg is None or result is None:
        return [], problems
    status_problem = _status_problem(path, result.get("status"), cfg)
    if status_problem:
        return [], [status_problem]
    derived, bad = _read_mapping(path / "derived.json", "json")
    if bad:
        problems.append(bad)
    derived = derived or {}
    scores: dict[tuple, dict] = {}
    if protocol in ("run", "all"):
        scores = _score_rows(result.get("scores", []), "result.json", problems)
        evaluated, bad = _read_mapping(path / "evaluate.json", "json")
        if bad:
            problems.append(bad)
        elif evaluated is not None:   # a re-score by the run's own protocol wins
            scores.update(_score_rows(evaluated.get("scores", []), "evaluate.json", problems))
    for other in sorted(path.glob("evaluate-*.json")) if protocol != "run" else []:
        pid = other.name[len("evaluate-"):-len(".json")]
        if protocol in ("all", pid):
            evaluated, bad = _read_mapping(other, "json")
            if bad:
                problems.append(bad)
            elif evaluated is not None:
                scores.update(_score_rows(evaluated.get("scores", []), other.name, problems, pid))
    if not scores:
        problems.append("completed but no score records" if protocol == "run" else
                        f"completed but no score records under protocol {protocol}")
    if not _num(result.get("flops_train")) > 0:
        problems.append("completed but flops_train is missing or zero: not on a FLOPs compute axis")
    base = {"run_dir": str(path), "run": run, "status": "completed",
            "method": _get(cfg, "method", "name"), "model": _get(cfg, "model", "name"),
            "data": _get(cfg, "data", "name"),
            "num_params": _num(result.get("num_params", derived.get("num_params"))),
            "nimg": _num(result.get("nimg")), "flops": _num(result.get("flops_train")),
            "train_sec": _num(result.get("train_sec")), "train_steps": _num(result.get("steps")),
            "precision": derived.get("precision"), "world_size": _num(derived.get("world_size")),
            **flatten(cfg)}
    return [{**base, **scores[k]} for k in sorted(scores)], problems


def _get(cfg: dict, group: str, key: str) -> Any:
    node = cfg.get(group)
    return node.get(key) if isinstance(node, dict) else None


def _num(value: Any) -> float:
    number = _number(value)
    return math.nan if number is None else number


def load_runs(root: str | Path, skip: tuple[Path, ...] = (), protocol: str = "run") -> tuple[pd.DataFrame, list[dict]]:
    """Every run directory under root -> (long DataFrame, one row per score record of every completed
    run, under `protocol` (see read_run); problems: [{"run_dir", "problem"}] for unfinished, failed or
    corrupt runs)."""
    root = Path(root)
    rows: list[dict] = []
    paths, problems = find_run_dirs(root, skip)
    for problem in problems:
        problem["run"] = _relative(Path(problem["run_dir"]), root)
    for path in paths:
        run = _relative(path, root)
        try:
            run_rows, run_problems = read_run(path, run, protocol)
        except Exception as exc:   # the reader must survive anything a file can hold
            run_rows, run_problems = [], [f"unreadable run: {type(exc).__name__}: {_first_line(exc)}"]
        rows.extend(run_rows)
        problems.extend({"run_dir": str(path), "run": run, "problem": p} for p in run_problems)
    return _frame(rows), problems


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _frame(rows: list[dict]) -> pd.DataFrame:
    keys: set[str] = set()
    for row in rows:
        keys.update(row)
    extra = sorted(k for k in keys if k not in BASE_COLUMNS and not k.startswith("cfg."))
    cfg_cols = sorted(k for k in keys if k.startswith("cfg."))
    df = pd.DataFrame.from_records(rows, columns=BASE_COLUMNS + extra + cfg_cols)
    for col in ("num_params", "nimg", "flops", "train_sec", "train_steps", "world_size", "value", "floor",
                "steps", "nfe", "step", "num_samples", "sample_sec"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df
