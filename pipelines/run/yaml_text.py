"""YAML as data, within bounds: the one loader for specs and overrides.

``yaml.safe_load`` builds no objects but has no limits: ten levels of ten aliases expand to 10^10 values, a
duplicate key silently takes the last value, and a megabyte of ``[`` nests past the recursion limit.  Here the
text is size-capped by the caller, the composed graph is checked before anything is built (every alias counted
where it is used, :data:`MAX_VALUES` in all; nesting at most :data:`MAX_DEPTH`; no alias that contains itself),
and a key given twice in one mapping is an error naming both lines.  The ``<<: *anchor`` merges of the shipped
specs are ordinary here: small, counted like any alias, and a key set beside a merge overrides it as YAML says.
"""

from __future__ import annotations

import os
import stat
from typing import Any, Dict

import yaml

from pipelines.run.config import SpecError

MAX_SPEC_BYTES = 1 << 20  # a spec file
MAX_OVERRIDE_BYTES = 64 << 10  # one key=value override
MAX_VALUES = 100_000  # scalars, lists and mappings after aliases are expanded (the shipped specs: under 2,000)
MAX_DEPTH = 64  # nesting of lists and mappings


_RAISE = object()


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` that checks the composed document (:func:`_check`) before constructing it."""

    def compose_document(self):  # noqa: D102 - PyYAML's hook
        node = super().compose_document()
        _check(node)
        return node


def read_local(path: str) -> bytes:
    """A local YAML file's bytes, at most :data:`MAX_SPEC_BYTES` + 1 of them (:func:`load_yaml` refuses more);
    anything but a regular file is refused unread (a FIFO would block, a device never end)."""
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise SpecError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        return f.read(MAX_SPEC_BYTES + 1)


def load_yaml(text: str | bytes, label: str, path: str = "", malformed: Any = _RAISE) -> Any:
    """The data of one YAML document, or a :class:`SpecError` naming ``label`` and the line (for text that is not
    YAML at all, ``malformed`` instead where it is given).  Bytes (a file's, ``path``) are size-capped and must be
    UTF-8."""
    if isinstance(text, bytes):
        check_size(text, MAX_SPEC_BYTES, path or label)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError(f"{path or label}: not UTF-8 text") from None
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise SpecError(f"{label}: nested more than {MAX_DEPTH} levels deep") from None
    except _Refused as exc:
        raise SpecError(f"{label}: {exc}") from None
    except yaml.YAMLError as exc:
        if malformed is not _RAISE:
            return malformed
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{label}: malformed YAML{at}: {problem}") from None
    finally:
        loader.dispose()


def check_size(data: bytes | str, limit: int, what: str) -> None:
    if len(data) > limit:
        raise SpecError(f"{what}: larger than the limit of {limit:,} bytes")


class _Refused(Exception):
    pass


def _check(root: Any) -> None:
    """Refuse a document that expands past :data:`MAX_VALUES` values, nests past :data:`MAX_DEPTH`, holds an alias
    inside itself, or repeats a key in one mapping.  Linear in the document's own nodes: a node's expanded size is
    computed once however many aliases use it."""
    sizes: Dict[int, int] = {}
    open_nodes: set = set()

    def size(node: Any, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _Refused(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it")
        if depth > MAX_DEPTH:
            raise _Refused(f"line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        total = 1
        if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
            open_nodes.add(key)
            if isinstance(node, yaml.MappingNode):
                _no_duplicate_keys(node)
                children = [n for pair in node.value for n in pair]
            else:
                children = node.value
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_VALUES:
                    raise _Refused(f"line {node.start_mark.line + 1}: aliases expand the document to more than "
                                   f"{MAX_VALUES:,} values")
            open_nodes.discard(key)
        sizes[key] = total
        return total

    if root is not None:
        size(root, 0)


def _no_duplicate_keys(node: "yaml.MappingNode") -> None:
    seen: Dict[tuple, int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line, ident = key.start_mark.line + 1, (key.tag, key.value)
        if ident in seen:
            raise _Refused(f"line {line}: duplicate key {key.value[:60]!r} (first at line {seen[ident]})")
        seen[ident] = line
