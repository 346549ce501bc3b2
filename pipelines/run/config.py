"""Strict conversion of plain YAML data into typed, frozen config dataclasses.

Every error is a :class:`SpecError` that names the field by its dotted path, so the CLI can print one line.
Supported field types: ``str``, ``int``, ``float``, ``bool``, ``Optional[...]``, ``Literal[...]``, ``list[...]``,
``dict[str, ...]``, nested dataclasses, and tagged unions of dataclasses (chosen by their ``kind`` field).
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import typing
from typing import Any, Dict, Literal, Optional, Union, get_args, get_origin

from pipelines.run.errors import InputError

_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class SpecError(InputError):
    """A problem with a spec, already phrased as one line for the user (bad input: exit 2)."""


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) > 1 and all(dataclasses.is_dataclass(a) for a in args):
            return "a mapping with kind: " + " | ".join(_kind_of(a) for a in args)
        return " or ".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Any: "a mapping (a rule)"}
    return names.get(tp, str(tp))


def _kind_of(cls: type) -> str:
    hints = typing.get_type_hints(cls)
    return get_args(hints["kind"])[0]


def field_docs(cls: type) -> Dict[str, str]:
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def build(tp: Any, value: Any, where: str) -> Any:
    """``value`` converted to ``tp``, or a :class:`SpecError` naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in options) and len(options) > 1:
            if not isinstance(value, dict):
                raise SpecError(f"{where}: expected {type_name(tp)}, got {show(value)}")
            kinds = {_kind_of(a): a for a in options}
            kind = value.get("kind")
            if kind not in kinds:
                raise SpecError(f"{join(where, 'kind')}: expected one of {', '.join(map(repr, kinds))}, got {show(kind)}")
            return build(kinds[kind], value, where)
        if isinstance(value, dict):  # a mapping can only be a mapping type: report its own errors
            mappings = [o for o in options if dataclasses.is_dataclass(o) or get_origin(o) is dict]
            options = mappings if len(mappings) == 1 else options
        if len(options) == 1:
            return build(options[0], value, where)
        for option in options:
            try:
                return build(option, value, where)
            except SpecError:
                continue
        raise SpecError(f"{where}: expected {type_name(tp)}, got {show(value)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise SpecError(f"{where}: expected {type_name(tp)}, got {show(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected {type_name(tp)}, got {show(value)}")
        items = [build(get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {show(value)}")
        return {str(k): build(get_args(tp)[1], v, join(where, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{where}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def build_dataclass(cls: type, value: Any, where: str, skip: tuple = ()) -> Any:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping, got {show(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields and k not in skip]
    if unknown:
        raise SpecError(f"{join(where, str(unknown[0])[:60])}: unknown key (expected one of {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = join(where, name)
        if name in value:
            kwargs[name] = build(hints[name], value[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"{sub}: missing required field ({type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except SpecError as exc:
            msg = str(exc)  # "field: problem" names one of the fields; anything else is about the mapping itself
            names_field = re.split(r"[.\[]", msg.split(":", 1)[0])[0] in fields
            raise SpecError(join(where, msg) if names_field or not where else f"{where}: {msg}") from None
    return obj


def ref_name(value: Any) -> Any:
    """The stage a reference field names: the string itself, or a mapping's ``stage`` (``{stage: ref}``)."""
    if isinstance(value, str):
        return value
    return getattr(value, "stage", None) if dataclasses.is_dataclass(value) else None


def config_refs(config: Any, where: str = "") -> list:
    """``(field path, wanted kind, stage name)`` for every reference to another stage, nested configs included."""
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        wants = f.metadata.get("ref")
        if wants and ref_name(value) is not None:
            out.append((join(where, f.name), wants, ref_name(value)))
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.extend(config_refs(value, join(where, f.name)))
    return out


def doc(text: str, ref: Optional[str] = None, **kw: Any) -> Any:
    """A config field with its documentation (shown by ``gradmimic list-stages``) and, for a field naming another
    stage, the kind of stage it must name (``ref="dataset"``)."""
    return dataclasses.field(metadata={"doc": text, **({"ref": ref} if ref else {})}, **kw)


# Upper bounds for the numbers of a spec: far above any real run, low enough that what cannot run is refused at
# validate rather than found out by the cluster (an allocation, a fan-out, a loop).
MAX_SEED = 2 ** 32 - 1
MAX_COUNT = 1 << 40  # rows, samples, steps
MAX_BATCH = 1 << 20  # rows in one batch, shard or chunk held in memory
MAX_CPUS = 4096.0  # CPUs of one task or actor, and actors or workers of one stage
MAX_WORKERS = 4096


def require(obj: Any, names: str, low: float, strict: bool = False, allow_none: bool = False,
            high: Optional[float] = None) -> None:
    """Raise ``"<field>: must be >= low, got v"`` (``> low`` when strict; ``<= high`` where given) for the first of
    ``names`` (space separated) out of bounds; ``None`` passes when ``allow_none``."""
    for name in names.split():
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if not (value > low if strict else value >= low):
            raise SpecError(f"{name}: must be {'>' if strict else '>='} {low:g}, got {value}")
        if high is not None and not value <= high:
            raise SpecError(f"{name}: must be <= {high:,}, got {show(value)}")


def join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def to_plain(obj: Any) -> Any:
    """A dataclass config back to plain YAML/JSON data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def show(value: Any) -> str:
    """A user's value for an error line: at most 60 characters, built without the whole ``repr`` (a value can be
    huge)."""
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
