"""The YAML spec: a named run, where it stores its outputs, where Ray runs, and an ordered list of stages.

```yaml
name: example
storage: ./runs            # or s3://bucket/prefix
ray: {address: local}      # local | auto | ray://host:10001
stages:
  - {stage: ingest, name: pool, source: {kind: embedded}}
```

A stage with ``matrix:`` stands for one stage per combination of its variables' values (the first variable
outermost); ``{var}`` in its strings is replaced by the value (a string that is only ``{var}`` takes the value with
its type), so names and references differ per copy.  A variable's values may be mappings, which vary together:
``{var.key}`` is one of their entries::

    - stage: train
      matrix: {mode: [plain, mimic], seed: [0, 1, 2], level: [{pct: 40, rate: 0.4}, {pct: 60, rate: 0.6}]}
      name: "{mode}_n{level.pct}_s{seed}"
      mode: "{mode}"
      seed: "{seed}"

Strict: an unknown stage, key or reference, a wrong type, a missing field, is a :class:`SpecError` naming the
file, the stage and the field.  ``key=value`` overrides (``stages.pool.shard_size=64``, ``storage=s3://b/p``)
apply to the YAML before it is checked.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from pipelines.run.config import SpecError, build, build_dataclass, config_refs, require, show, to_plain
from pipelines.run.registry import STAGES
from pipelines.run.yaml_text import MAX_OVERRIDE_BYTES, MAX_SPEC_BYTES, check_size, load_yaml, read_local

MAX_STAGES = 10_000  # in a spec, after its matrices expand
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")  # no '.': names are segments of dotted overrides
# Secrets come from the environment / credential files, never from a spec that gets saved to the run directory.
_SECRET_OPTIONS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                   "aws_session_token", "session_token", "access_key", "secret_key"}


@dataclass(frozen=True)
class RayConfig:
    address: str = field(default="local", metadata={"doc": "local (start Ray here) | auto | host:6379 | ray://host:10001"})
    num_cpus: Optional[int] = field(default=None, metadata={"doc": "CPUs for a local Ray (default: all)"})

    def validate(self) -> None:
        require(self, "num_cpus", 1, allow_none=True, high=1 << 16)
        if not (self.address in ("local", "auto") or self.address.startswith("ray://")
                or re.fullmatch(r"[A-Za-z0-9.\-]+:\d+", self.address)):
            raise SpecError(f"address: expected local, auto, host:port or ray://host:port, got {self.address!r}")


@dataclass(frozen=True)
class StageSpec:
    stage: str
    name: str
    config: Any


@dataclass(frozen=True)
class Spec:
    name: str
    storage: str
    stages: Tuple[StageSpec, ...]
    ray: RayConfig = RayConfig()
    storage_options: Dict[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<spec>"
    report: Optional[bool] = None  # write the run report at the end (null: when the spec has evaluate stages)

    @property
    def writes_report(self) -> bool:
        return self.report if self.report is not None else any(st.stage == "evaluate" for st in self.stages)

    def stage(self, name: str) -> StageSpec:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(name)

    def to_plain(self) -> Dict[str, Any]:
        """The resolved spec as YAML data: every default filled in."""
        return {
            "name": self.name,
            "storage": self.storage,
            "storage_options": dict(self.storage_options),
            "ray": to_plain(self.ray),
            "report": self.report,
            "stages": [{"stage": s.stage, "name": s.name, **to_plain(s.config)} for s in self.stages],
        }


TOP_KEYS = ("name", "storage", "storage_options", "ray", "report", "stages")


def load_spec(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Spec:
    """Read, override and check a spec file (a local path, or a URL such as s3://bucket/specs/run.yaml)."""
    path = os.fspath(path)
    label = os.path.basename(path.rstrip("/"))
    try:
        if "://" in path:
            from pipelines.run.storage import open_storage

            fs, p = open_storage(path)
            with fs.open(p, "rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1)
        else:
            raw = read_local(path)
    except (FileNotFoundError, NotADirectoryError):
        raise SpecError(f"{path}: no such spec file") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise SpecError(f"{path}: cannot read the spec ({type(exc).__name__})") from None
    data = load_yaml(raw, label, path)
    return parse_spec(data, overrides, label)


def parse_spec(data: Any, overrides: Sequence[str] = (), label: str = "<spec>") -> Spec:
    if not isinstance(data, dict):
        raise SpecError(f"{label}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    data = apply_overrides(data, overrides, label)
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(f"{label}: {str(key)[:60]}: unknown key (expected one of {', '.join(TOP_KEYS)})")
    for key in ("name", "storage", "stages"):
        if key not in data:
            raise SpecError(f"{label}: {key}: missing required field")
    try:
        name = build(str, data["name"], "name")
        storage = build(str, data["storage"], "storage")
        ray_cfg = build_dataclass(RayConfig, _or_empty(data, "ray"), "ray")
        options = build(Dict[str, Any], _or_empty(data, "storage_options"), "storage_options")
        report = build(Optional[bool], data.get("report"), "report")
    except SpecError as exc:
        raise SpecError(f"{label}: {exc}") from None
    if not _NAME.match(name):
        raise SpecError(f"{label}: name: {show(name)} must be letters, digits, '_' or '-' (at most 100)")
    secret = _find_secret(options, "storage_options")
    if secret:
        raise SpecError(f"{label}: {secret}: credentials belong in the environment, not the spec")
    raw_stages = data["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise SpecError(f"{label}: stages: expected a non-empty list of stages")
    stages: List[StageSpec] = []
    produced: Dict[str, str] = {}
    for i, entry in enumerate(expand_matrices(raw_stages, label)):
        stages.append(_parse_stage(entry, i, produced, label))
        produced[stages[-1].name] = STAGES[stages[-1].stage].produces
    return Spec(name, storage, tuple(stages), ray_cfg, options, label, report)


_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")
_SCALAR = (str, int, float, bool, type(None))


def expand_matrices(raw_stages: List[Any], label: str) -> List[Any]:
    """Each stage with ``matrix:`` replaced by its copies, one per combination (see the module docstring)."""
    import itertools

    counts = [_copies(entry, f"{label}: stages[{i}]: matrix") for i, entry in enumerate(raw_stages)]
    if sum(counts) > MAX_STAGES:  # counted before any copy is made
        big = max(range(len(counts)), key=counts.__getitem__)
        raise SpecError(f"{label}: stages: {sum(counts):,} stages after the matrices expand (stages[{big}]: "
                        f"{counts[big]:,}), more than the limit of {MAX_STAGES:,}")
    out: List[Any] = []
    for i, entry in enumerate(raw_stages):
        if not isinstance(entry, dict) or "matrix" not in entry:
            out.append(entry)
            continue
        matrix = entry["matrix"]
        body = {k: v for k, v in entry.items() if k != "matrix"}
        for combo in itertools.product(*matrix.values()):
            try:
                out.append(_substitute(body, dict(zip(matrix, combo))))
            except SpecError as exc:
                raise SpecError(f"{label}: stages[{i}]: {exc}") from None
    return out


def _copies(entry: Any, where: str) -> int:
    """How many stages an entry of ``stages:`` stands for (its matrix checked, nothing expanded)."""
    if not isinstance(entry, dict) or "matrix" not in entry:
        return 1
    matrix = entry["matrix"]
    if not isinstance(matrix, dict) or not matrix:
        raise SpecError(f"{where}: expected a mapping of variable -> list of values")
    count = 1
    for var, values in matrix.items():
        if not isinstance(var, str) or not _VAR.fullmatch("{" + var + "}"):
            raise SpecError(f"{where}: {show(var)} is not a variable name (letters, digits, '_')")
        ok = isinstance(values, list) and values and all(
            isinstance(v, _SCALAR) or (isinstance(v, dict) and all(isinstance(x, _SCALAR) for x in v.values()))
            for v in values)
        if not ok:
            raise SpecError(f"{where}.{var}: expected a non-empty list of scalars, or of mappings of scalars")
        count *= len(values)
    return count


def _substitute(value: Any, env: Dict[str, Any]) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, env) for v in value]
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole and whole.group(1) in env:
            return _lookup(whole, env)
        return _VAR.sub(lambda m: str(_lookup(m, env)) if m.group(1) in env else m.group(0), value)
    return value


def _lookup(m: "re.Match[str]", env: Dict[str, Any]) -> Any:
    var, key = m.group(1), m.group(2)
    value = env[var]
    if key is None:
        if isinstance(value, dict):
            raise SpecError(f"matrix: {{{var}}} is a mapping; name one of its keys ({', '.join(map(str, value))})")
        return value
    if not isinstance(value, dict) or key not in value:
        raise SpecError(f"matrix: {{{var}.{key}}}: {var} has no key {key!r}")
    return value[key]


def _or_empty(data: Dict[str, Any], key: str) -> Any:
    """An absent or null section means its defaults; anything else must be a mapping (checked by the caller)."""
    value = data.get(key)
    return {} if value is None else value


def _find_secret(options: Any, where: str) -> Optional[str]:
    if isinstance(options, dict):
        for k, v in options.items():
            if str(k).lower() in _SECRET_OPTIONS:
                return f"{where}.{k}"
            found = _find_secret(v, f"{where}.{k}")
            if found:
                return found
    return None


def _parse_stage(entry: Any, index: int, produced: Dict[str, str], label: str) -> StageSpec:
    where = f"{label}: stages[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: expected a mapping with 'stage' and 'name'")
    kind, name = entry.get("stage"), entry.get("name")
    if kind is None:
        raise SpecError(f"{where}: stage: missing required field (one of {', '.join(STAGES)})")
    if kind not in STAGES:
        raise SpecError(f"{where}: stage: unknown stage {show(kind)} (known: {', '.join(STAGES)})")
    if name is None:
        raise SpecError(f"{where} ({kind}): name: missing required field")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SpecError(f"{where} ({kind}): name: {show(name)} must be letters, digits, '_' or '-' (at most 100)")
    if name in produced:
        raise SpecError(f"{label}: stage {name!r}: name: another stage is already named {name!r}")
    where = f"{label}: stage {name!r} ({kind})"
    definition = STAGES[kind]
    try:
        config = build_dataclass(definition.config, entry, "", skip=("stage", "name"))
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    for path, wants, ref in config_refs(config):
        if ref not in produced:
            raise SpecError(f"{where}: {path}: no earlier stage is named {ref!r}")
        if produced[ref] != wants:
            raise SpecError(f"{where}: {path}: stage {ref!r} produces a {produced[ref]}, not a {wants}")
    return StageSpec(kind, name, config)


def parse_value(text: str, label: str = "override") -> Any:
    """An override's value: YAML scalars and flow collections, plus numbers YAML 1.1 reads as strings (1e-4)."""
    value = load_yaml(text, label, malformed=text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], label: str) -> Dict[str, Any]:
    """``a.b=c`` edits of the raw YAML data; ``stages.<name>.<field>`` addresses a stage by its name."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"override {item!r}: expected key=value")
        check_size(item, MAX_OVERRIDE_BYTES, f"override {item.split('=', 1)[0][:100]}")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise SpecError(f"override {item!r}: empty key segment")
        node: Any = data
        if parts[0] == "stages":
            if len(parts) < 3:
                raise SpecError(f"override {item!r}: expected stages.<stage name>.<field>=value")
            stages = data.get("stages") if isinstance(data.get("stages"), list) else []
            match = [s for s in stages if isinstance(s, dict) and s.get("name") == parts[1]]
            if not match:
                names = ", ".join(str(s.get("name")) for s in stages if isinstance(s, dict))
                raise SpecError(f"{label}: override {key}: no stage named {parts[1]!r} (stages: {names})")
            node, parts = match[0], parts[2:]
        for part in parts[:-1]:
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError(f"{label}: override {key}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = parse_value(text, f"{label}: override {key}")
    return data


def check_spec(spec: Spec) -> None:
    """Every stage's own checks that need only the spec (models, parameter names, references), before anything runs."""
    for st in spec.stages:
        check = STAGES[st.stage].check
        if check is None:
            continue
        try:
            check(st.config, spec)
        except SpecError as exc:
            raise SpecError(f"{spec.source}: stage {st.name!r} ({st.stage}): {exc}") from None


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec.to_plain(), sort_keys=False)
