"""A fast reader for the block YAML that OmegaConf.to_yaml writes (every run's config.yaml).

PyYAML builds each node in Python (about 1 ms per config even with libyaml's parser), which made
reading 10,000 configs the collector's main cost. This reader handles the subset OmegaConf emits
(block mappings, block sequences of scalars, `[]`, `{}`, plain and simple quoted scalars) line by line,
resolving each distinct scalar once through PyYAML itself (cached), so values are exactly what
yaml.safe_load gives. Anything outside the subset (flow collections, sequences of mappings or
sequences, multi-line or escaped scalars, comments, anchors, tags) returns None: the caller then uses
PyYAML. tests/test_collect.py checks both agree on real configs and on the cases that fall back.
"""
from __future__ import annotations

from typing import Any

import yaml

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_SPECIAL_START = set("[]{}&*!|>%@`#,?:-\"'")
_WORDS = {"yes", "no", "true", "false", "on", "off", "null"}   # YAML 1.1 bool/null words PyYAML resolves
_CACHE: dict[str, Any] = {}
_MISS = object()


class _Unsupported(Exception):
    pass


def _plain(text: str) -> Any:
    """A plain scalar as PyYAML resolves it (bool, int, float, null, str, ...), cached per text."""
    if text == "[]":
        return []
    if text == "{}":
        return {}
    value = _CACHE.get(text, _MISS)
    if value is not _MISS:
        return value
    if not text or text != text.strip() or "\t" in text or ": " in text or " #" in text or text.endswith(":"):
        raise _Unsupported(text)
    if text[0] in _SPECIAL_START and not (text[0] == "-" and len(text) > 1 and text[1] != " "):
        raise _Unsupported(text)
    if text[0].isalpha() and text.lower() not in _WORDS:
        value = text                                   # PyYAML resolves no other word starting with a letter
    else:
        value = yaml.load(text, Loader=_LOADER)
        if isinstance(value, (dict, list)):
            raise _Unsupported(text)
    if len(_CACHE) < 200_000:
        _CACHE[text] = value
    return value


def _scalar(text: str) -> Any:
    if text[:1] == "'":
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != "'" or "'" in inner.replace("''", ""):
            raise _Unsupported(text)
        return inner.replace("''", "'")
    if text[:1] == '"':
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != '"' or '"' in inner or "\\" in inner:
            raise _Unsupported(text)
        return inner
    return _plain(text)


def _split(body: str) -> tuple[str, str | None]:
    """'key: value' -> (key, value); 'key:' -> (key, None)."""
    if body[:1] == "'":
        end = body.find("':")
        if end < 1:
            raise _Unsupported(body)
        key, rest = body[: end + 1], body[end + 2:]
    else:
        key, sep, rest = body.partition(":")
        if not sep:
            raise _Unsupported(body)
    if rest and rest[0] != " ":
        raise _Unsupported(body)
    rest = rest[1:] if rest else ""
    return key, (rest if rest else None)


def load(text: str) -> Any | None:
    """The document as yaml.safe_load would give it, or None when it is outside the subset."""
    try:
        return _load(text) or None
    except (_Unsupported, yaml.YAMLError, IndexError):
        return None


_LINES: dict[str, tuple] = {}                        # line -> (indent, is_item, key, value): lines repeat
_EMPTY_LIST, _EMPTY_DICT, _NO_VALUE = object(), object(), object()


def _frozen(value: Any) -> Any:
    if isinstance(value, list):
        return _EMPTY_LIST
    if isinstance(value, dict):
        return _EMPTY_DICT
    return value


def _parse_line(line: str) -> tuple:
    parsed = _LINES.get(line)
    if parsed is not None:
        return parsed
    body = line.lstrip(" ")
    indent = len(line) - len(body)
    if body[0] == "-" and (len(body) == 1 or body[1] == " "):
        if body[2:3] in ("-", ""):
            raise _Unsupported(line)                 # nested sequences, empty items
        parsed = (indent, True, None, _frozen(_scalar(body[2:])))   # a mapping in a sequence raises here
    else:
        raw_key, raw_value = _split(body)
        key = _scalar(raw_key)
        if isinstance(key, (dict, list)):
            raise _Unsupported(line)
        parsed = (indent, False, key, _NO_VALUE if raw_value is None else _frozen(_scalar(raw_value)))
    if len(_LINES) < 500_000:
        _LINES[line] = parsed
    return parsed


def _load(text: str) -> dict:
    root: dict = {}
    frames: list[tuple[int, Any]] = [(0, root)]      # (indent of its lines, dict or list)
    pending: tuple[int, dict, Any] | None = None     # a "key:" whose value comes on the next lines
    for line in text.split("\n"):
        if not line or line.isspace():
            continue
        indent, is_item, key, value = _parse_line(line)
        if value is _EMPTY_LIST:
            value = []
        elif value is _EMPTY_DICT:
            value = {}
        if is_item:
            if pending is not None and indent >= pending[0]:
                seq: list = []
                pending[1][pending[2]] = seq
                frames.append((indent, seq))
            pending = None
            while frames[-1][0] > indent:
                frames.pop()
            top_indent, top = frames[-1]
            if not isinstance(top, list) or top_indent != indent:
                raise _Unsupported(line)
            top.append(value)
            continue
        if pending is not None:
            if indent > pending[0]:
                node: dict = {}
                pending[1][pending[2]] = node
                frames.append((indent, node))
            pending = None
        while frames[-1][0] > indent or (frames[-1][0] == indent and isinstance(frames[-1][1], list)):
            frames.pop()
        top_indent, top = frames[-1]
        if top_indent != indent or not isinstance(top, dict) or key in top:
            raise _Unsupported(line)
        if value is _NO_VALUE:
            top[key] = None
            pending = (indent, top, key)
        else:
            top[key] = value
    return root
