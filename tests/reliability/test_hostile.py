"""Hostile and careless input (issue: specs and inputs refused in seconds, in one line, with bounded memory).

Spec cases run ``gradmimic validate`` / ``run`` as a command and measure the child itself (``os.wait4`` for its CPU
seconds, its own ``VmHWM`` for its peak memory: a forked child's ``ru_maxrss`` counts the parent's): exit 2, one line
naming the file and field, under :data:`CPU_BOUND` seconds and :data:`MEMORY_BOUND` bytes (the cases this file is
about ran for minutes and grew to gigabytes before).  Data cases run an ingest and read its rejects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
import typing

import pytest

from pipelines.run.config import SpecError, build_dataclass

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.faults]
CPU_BOUND = 10.0  # seconds of the child's own CPU (user + system): robust to a busy machine, unlike wall time
MEMORY_BOUND = 1 << 30  # bytes of the child's peak resident memory
WALL_GUARD = 120.0  # the child is killed past this (a hang), and the test fails


_PEAK = """
import atexit, runpy, sys
peak_file = sys.argv.pop(1)

def peak():  # this process's own high-water mark (its exec started a new one; ru_maxrss would count the parent's)
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(peak_file, "w") as out:
        out.write(str(kb * 1024))

atexit.register(peak)
sys.argv[0] = "gradmimic"
runpy.run_module("pipelines", run_name="__main__", alter_sys=True)
"""


def command(*args: str, env=None) -> typing.Tuple[int, typing.List[str], float, int]:
    """Run ``gradmimic *args``: ``(exit code, stderr lines, CPU seconds, peak RSS bytes)`` of the child itself."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = os.path.join(tmp, "peak")
        proc = subprocess.Popen([sys.executable, "-c", _PEAK, peak_file, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + WALL_GUARD
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                pytest.fail(f"gradmimic {' '.join(args)[:80]} still running after {WALL_GUARD:.0f}s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        proc.stdout.close()
        proc.stderr.close()
        peak = int(open(peak_file).read()) if os.path.exists(peak_file) else -1
    assert peak > 0, err[-10:]
    return proc.returncode, err, usage.ru_utime + usage.ru_stime, peak


def refused(*args: str, env=None) -> str:
    """A command that must be refused as bad input: exit 2, one line, no traceback, in bounded CPU and memory;
    returns the line without its prefix."""
    code, err, cpu, rss = command(*args, env=env)
    assert code == 2, err[-20:]
    assert len(err) == 1 and err[0].startswith("gradmimic: error: "), err[-20:]
    assert cpu < CPU_BOUND, f"{cpu:.1f} CPU seconds"
    assert rss < MEMORY_BOUND, f"{rss / 2**20:.0f} MiB peak"
    return err[0][len("gradmimic: error: "):]


def write_spec(path: pathlib.Path, text: str) -> str:
    path.write_text(text)
    return str(path)


POOL = "  - {stage: ingest, name: pool, source: {kind: embedded, limit: 20}, shard_size: 10}\n"


def spec_text(tmp_path, stages: str = POOL, name: str = "h") -> str:
    return f"name: {name}\nstorage: {tmp_path / 'runs'}\nstages:\n{stages}"


# ------------------------------------------------------------------------------------------------ parsing


def alias_bomb(levels: int = 10, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_in_the_name_is_refused(tmp_path):
    text = alias_bomb() + f"name: *a9\nstorage: {tmp_path}\nstages:\n{POOL}"
    line = refused("validate", write_spec(tmp_path / "s.yaml", text))
    assert line == "s.yaml: line 5: aliases expand the document to more than 100,000 values"


def test_an_alias_bomb_in_storage_options_is_refused_by_run_before_ray_starts(tmp_path):
    text = alias_bomb() + f"name: h\nstorage: {tmp_path}\nstorage_options: {{x: *a9}}\nstages:\n{POOL}"
    line = refused("run", write_spec(tmp_path / "s.yaml", text))
    assert line == "s.yaml: line 5: aliases expand the document to more than 100,000 values"
    assert not (tmp_path / "h").exists()


def test_an_alias_bomb_in_a_typed_field_is_refused(tmp_path):
    text = alias_bomb() + spec_text(tmp_path, POOL.replace("shard_size: 10", "shard_size: *a9"))
    line = refused("validate", write_spec(tmp_path / "s.yaml", text))
    assert line == "s.yaml: line 5: aliases expand the document to more than 100,000 values"
    # large but within the budget: the message is built from a bounded repr, not the whole value's
    big = "storage_options: {b: &b [" + ", ".join(["y" * 50] * 1000) + "]}\n"
    text = big + spec_text(tmp_path, POOL.replace("shard_size: 10", "shard_size: [" + ", ".join(["*b"] * 40) + "]"))
    line = refused("validate", write_spec(tmp_path / "s.yaml", text))
    assert line.startswith("s.yaml: stage 'pool' (ingest): shard_size: expected an integer, got [[") and len(line) < 150


def test_an_alias_that_contains_itself_and_deep_nesting_are_refused(tmp_path):
    assert refused("validate", write_spec(tmp_path / "s.yaml", "name: &n [*n]\n")) == \
        "s.yaml: line 1: an alias refers to a value that contains it"
    text = "name: " + "[" * 200_000 + "]" * 200_000 + "\n"
    assert refused("validate", write_spec(tmp_path / "s.yaml", text)) == "s.yaml: nested more than 64 levels deep"


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    stages = "  - stage: ingest\n    name: pool\n    shard_size: 50\n    shard_size: 7\n"
    line = refused("validate", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert line == "s.yaml: line 7: duplicate key 'shard_size' (first at line 6)"


def test_merges_still_work_and_a_key_beside_a_merge_overrides_it(tmp_path):
    from pipelines.run.spec import load_spec

    stages = ("  - &base {stage: ingest, name: pool, source: {kind: embedded, limit: 20}, shard_size: 10}\n"
              "  - {<<: *base, name: pool2, shard_size: 5}\n")
    spec = load_spec(write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert [(s.name, s.config.shard_size, s.config.source.limit) for s in spec.stages] == [("pool", 10, 20),
                                                                                         ("pool2", 5, 20)]


def test_a_spec_file_and_an_override_over_their_size_caps_are_refused(tmp_path):
    text = spec_text(tmp_path) + "#" + "x" * (1 << 20) + "\n"
    path = write_spec(tmp_path / "s.yaml", text)
    assert refused("validate", path) == f"{path}: larger than the limit of 1,048,576 bytes"
    path = write_spec(tmp_path / "s.yaml", spec_text(tmp_path))
    line = refused("validate", path, "stages.pool.shard_size=" + "1" * (64 << 10))
    assert line == "override stages.pool.shard_size: larger than the limit of 65,536 bytes"


def test_a_spec_that_is_a_fifo_is_refused_not_read(tmp_path):
    os.mkfifo(tmp_path / "s.yaml")
    assert refused("validate", str(tmp_path / "s.yaml")) == f"{tmp_path / 's.yaml'}: not a regular file"


def test_a_matrix_of_a_hundred_million_stages_is_refused_before_it_is_built(tmp_path):
    matrix = ", ".join(f"v{i}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]" for i in range(8))
    stages = POOL + ("  - {stage: aggregate, name: 'a{v0}{v1}{v2}{v3}{v4}{v5}{v6}{v7}', scores: pool, "
                     f"matrix: {{{matrix}}}}}\n")
    line = refused("validate", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert line == ("s.yaml: stages: 100,000,001 stages after the matrices expand (stages[1]: 100,000,000), more "
                    "than the limit of 10,000")


def test_a_long_name_is_refused(tmp_path):
    line = refused("validate", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, name="n" * 100_000)))
    assert line == f"s.yaml: name: '{'n' * 27}...{'n' * 28}' must be letters, digits, '_' or '-' (at most 100)"


# ------------------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize("template, problem", [
    ("{0.__class__.__mro__}", "a template holds exactly one '{}'"),
    ("{!r}", "a template holds exactly one '{}'"),
    ("{0}", "a template holds exactly one '{}'"),
    ("a {} and a {}", "a template holds exactly one '{}'"),
    ("no placeholder", "a template holds exactly one '{}'"),
    ("a {", "Single '{' encountered"),
    ("x" * 499 + "{}", "501 characters, more than 500"),
])
def test_a_caption_template_is_data_not_code(tmp_path, template, problem):
    from pipelines.run.spec import load_spec

    source = f"{{kind: labelled, path: p, templates: [{json.dumps(template)}]}}"
    stages = f"  - {{stage: ingest, name: pool, source: {source}}}\n"
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert str(info.value).startswith("s.yaml: stage 'pool' (ingest): source.templates[0]: ") and \
        problem in str(info.value), info.value


def test_a_template_with_a_huge_format_spec_is_refused_at_validate(tmp_path):
    stages = "  - {stage: ingest, name: pool, source: {kind: embedded, templates: ['{:>1500000000}']}}\n"
    line = refused("validate", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert line == ("s.yaml: stage 'pool' (ingest): source.templates[0]: '{:>1500000000}': a template holds exactly "
                    "one '{}' (the class name) and no other placeholder, field, conversion or format")


def test_templates_with_literal_braces_pass():
    from pipelines.stages.ingest.sources import check_templates, template

    check_templates(("a {} in {{braces}}",))
    assert template(("a {} in {{braces}}",), "0" * 32, "cat") == "a cat in {braces}"


# ------------------------------------------------------------------------------------------------ numbers


def _configs() -> typing.List[type]:
    from pipelines.run.registry import STAGES
    from pipelines.run.spec import RayConfig

    seen: typing.List[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for arg in typing.get_args(hints[f.name]) or [hints[f.name]]:
                if dataclasses.is_dataclass(arg):
                    walk(arg)

    for definition in STAGES.values():
        walk(definition.config)
    walk(RayConfig)
    return seen


REQUIRED = {  # the required fields of the configs that have them (the value does not matter to a range)
    "CaptionFolderSource": {"kind": "caption_folder", "path": "p"}, "LabelledSource": {"kind": "labelled", "path": "p"},
    "DataCompSource": {"kind": "datacomp", "path": "p"}, "WebDatasetSource": {"kind": "webdataset", "path": "p"},
    "NoiseConfig": {"kind": "caption", "rate": 0.1}, "SplitConfig": {"test_fraction": 0.1},
    "TrainConfig": {"data": "d"}, "ComparisonConfig": {"data": "d"}, "AggregateConfig": {"scores": "s"},
    "LogPath": {"path": "p"}, "FilterConfig": {"data": "d", "keep": {"column": "c", "top": 0.5}},
    "ClipScoreConfig": {"data": "d", "model": "m"}, "FeaturesConfig": {"data": "d"},
    "EvaluateConfig": {"model": "m", "data": "d"},
}


def _numeric_fields():
    for cls in _configs():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = [a for a in typing.get_args(hints[f.name]) or [hints[f.name]] if a is not type(None)]
            if any(a in (int, float) for a in args):
                yield pytest.param(cls, f.name, False, id=f"{cls.__name__}.{f.name}")
            elif any(typing.get_origin(a) is tuple and typing.get_args(a)[0] in (int, float) for a in args):
                yield pytest.param(cls, f.name, True, id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("cls, name, is_tuple", list(_numeric_fields()))
def test_every_number_in_every_config_has_a_range(cls, name, is_tuple):
    """Each numeric field of each stage's config (nested ones too) refuses a huge and a hugely negative value,
    naming the field: what cannot run is refused at validate, before Ray starts."""
    base = REQUIRED.get(cls.__name__, {})
    for bad in (10 ** 18, -10 ** 18, float("inf"), float("nan")):
        value = [bad, 0.5] if is_tuple else bad
        with pytest.raises(SpecError) as info:
            build_dataclass(cls, {**base, name: value}, "")
        assert str(info.value).split(":")[0] in (name, f"{name}[0]"), (bad, str(info.value))


def test_limits_and_cpus_that_cannot_run_are_refused_at_validate(tmp_path):
    path = write_spec(tmp_path / "s.yaml", spec_text(tmp_path))
    assert refused("validate", path, "stages.pool.source.limit=-5") == \
        "s.yaml: stage 'pool' (ingest): source.limit: must be >= 1, got -5"
    assert refused("validate", path, "stages.pool.source.limit=0") == \
        "s.yaml: stage 'pool' (ingest): source.limit: must be >= 1, got 0"
    assert refused("validate", path, "ray.num_cpus=0") == "s.yaml: ray.num_cpus: must be >= 1, got 0"


# ------------------------------------------------------------------------------------------------ storage, cluster


def test_storage_that_is_a_file_or_cannot_be_made_is_refused_before_ray_starts(tmp_path):
    (tmp_path / "afile").write_text("x")
    path = write_spec(tmp_path / "s.yaml", spec_text(tmp_path))
    for storage in (tmp_path / "afile", tmp_path / "afile" / "below"):
        assert refused("run", path, f"storage={storage}") == f"s.yaml: storage: {tmp_path / 'afile'} is a file, " \
                                                               "not a folder"
    assert (tmp_path / "afile").read_text() == "x"
    # a location nothing can be made in (the kernel's own file system): the same, not a run failure
    assert refused("run", path, "storage=/proc/gradmimic-nowhere") == \
        "s.yaml: storage: cannot make /proc/gradmimic-nowhere/h (No such file or directory)"


@pytest.mark.slow
def test_a_stage_needing_more_cpus_than_a_local_ray_has_is_refused_before_any_stage_runs(tmp_path):
    stages = POOL + "  - {stage: train, name: t, data: pool, batch_size: 8, steps: 2, resources: {num_workers: 2}}\n"
    path = write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages))
    code, err, _, rss = command("run", path, "ray.num_cpus=2")
    assert code == 2 and err[-1] == ("gradmimic: error: s.yaml: stage 't' (train): resources: needs 3.5 CPUs and 0 "
                                     "GPUs, the cluster has 2 CPUs and 0 GPUs (ask for less, or for more with "
                                     "ray.num_cpus)"), err
    assert rss < MEMORY_BOUND
    assert not (tmp_path / "runs" / "h" / "pool").exists()  # refused before the first stage started


# ------------------------------------------------------------------------------------------------ files


def hostile_folder(root: pathlib.Path, outside: pathlib.Path) -> dict:
    """A caption folder of 3 good pairs and one of each hostile entry; returns ``{image: its reject reason}``."""
    import socket

    from PIL import Image

    from tests.support.train import bomb_png

    root.mkdir()
    (root / "sub").mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text("root:x:0:0:root:/root:/bin/bash")
    Image.new("RGB", (8, 8)).save(outside / "o.png")

    def pair(name: str, caption: bytes = b"a square") -> None:
        Image.new("RGB", (8, 8), (len(name) * 20 % 255, 0, 0)).save(root / f"{name}.png")
        if caption is not None:
            (root / f"{name}.txt").write_bytes(caption)

    for name in ("good0", "good1", "sub/good2"):
        pair(name)
    pair("fifo_caption", None)
    os.mkfifo(root / "fifo_caption.txt")
    pair("linked_caption", None)
    os.symlink(outside / "secret.txt", root / "linked_caption.txt")
    pair("hard_caption", None)
    os.link(outside / "secret.txt", root / "hard_caption.txt")
    pair("not_utf8", b"caf\xe9 au lait")
    pair("nul", b"a nul\x00 inside")
    pair("huge_caption", b"x" * ((64 << 10) + 1))
    pair("long_caption", b"word " * 2500)
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "bomb.txt").write_text("a bomb")
    os.symlink(outside / "o.png", root / "linked_image.png")
    (root / "linked_image.txt").write_text("a linked image")
    os.mkfifo(root / "fifo_image.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "socket_image.png"))
    sock.close()
    os.symlink(outside, root / "linked_folder")
    return {
        "fifo_caption.png": "caption: not a regular file",
        "linked_caption.png": "caption: a symbolic link, not followed",
        "hard_caption.png": "caption: a hard link (2 names), not read",
        "not_utf8.png": "caption: not UTF-8",
        "nul.png": "caption holds control characters",
        "huge_caption.png": "caption: larger than 65,536 bytes",
        "long_caption.png": "caption longer than 10,000 characters",
        "bomb.png": "unreadable image: too_large",
        "linked_image.png": "image: a symbolic link, not followed",
        "fifo_image.png": "image: not a regular file",
        "socket_image.png": "image: not a regular file",
        "linked_folder": "a symbolic link to a folder, not followed",
    }


@pytest.mark.slow
def test_hostile_files_in_a_caption_folder_are_rejects_never_read(tmp_path):
    """Each hostile entry is one reject with its reason (nothing blocks, nothing outside the folder is read), the
    good pairs are kept, and the rows add up; the run is the command, with its own Ray."""
    import pyarrow.dataset as ds

    from pipelines.run.storage import StageDir, open_storage

    expected = hostile_folder(tmp_path / "cf", tmp_path / "outside")
    stages = (f"  - {{stage: ingest, name: pool, shard_size: 4, source: {{kind: caption_folder, path: "
              f"{tmp_path / 'cf'}, validate_images: true}}}}\n")
    code, err, _, rss = command("run", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages)))
    assert code == 0, err[-10:]
    assert rss < MEMORY_BOUND
    fs, root = open_storage(str(tmp_path / "runs"))
    stage = StageDir(fs, f"{root}/h/pool")
    manifest = stage.manifest()
    assert (manifest["rows_in"], manifest["rows_out"], manifest["rejected"]) == (3 + len(expected), 3, len(expected))
    rejects = ds.dataset(stage.join("rejects"), format="parquet").to_table().to_pylist()
    assert {r["source"]: r["reason"] for r in rejects} == expected
    for path in (tmp_path / "runs").rglob("*"):  # the file outside never reached an output
        assert not path.is_file() or b"root:x:0:0" not in path.read_bytes(), path


def test_an_empty_caption_folder_is_refused_and_nothing_is_committed(tmp_path, ray_local, capsys):
    from pipelines.ops import cli

    (tmp_path / "empty").mkdir()
    stages = f"  - {{stage: ingest, name: pool, source: {{kind: caption_folder, path: {tmp_path / 'empty'}}}}}\n"
    assert cli.main(["run", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gradmimic: error: s.yaml: stage 'pool' (ingest): source.path: {tmp_path / 'empty'}: no samples to keep (0 "
        "found, 0 rejected)")
    pool = tmp_path / "runs" / "h" / "pool"
    assert not (pool / "_MANIFEST.json").exists() and not list(pool.glob("_attempt-*"))


# ------------------------------------------------------------------------------------------------ interrupts


def _process_tree(root: int) -> typing.List[int]:
    children: typing.Dict[int, typing.List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(pathlib.Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_leaves_no_ray_process(tmp_path):
    import signal

    stages = POOL + ("  - {stage: train, name: t, data: pool, batch_size: 8, steps: 100000, checkpoint_every: 50, "
                     "eval_every: 0}\n")
    path = write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages))
    import threading

    # SIGINT as a terminal sends it, even where this test runs with it ignored (a background job inherits that)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines", "run", path], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    guard = threading.Timer(WALL_GUARD, proc.kill)  # a child that hangs is killed, and the checks below fail
    guard.start()
    lines = []
    try:
        for line in proc.stderr:  # until the train stage is under way
            lines.append(line)
            if "train t" in line:
                break
    finally:
        guard.cancel()
    assert any("train t" in line for line in lines), lines[-10:]
    guard = threading.Timer(WALL_GUARD, proc.kill)
    guard.start()
    tree = _process_tree(proc.pid)
    assert len(tree) > 3  # its Ray: the GCS, the raylet, workers
    proc.send_signal(signal.SIGINT)
    try:
        rest = proc.stderr.read().strip().splitlines()
        code = proc.wait(timeout=WALL_GUARD)
    finally:
        guard.cancel()
    assert code == 130, rest[-10:]
    assert rest[-1] == ("gradmimic: interrupted while running 't' (train); a rerun skips the committed stages and "
                        "resumes 't' from the last checkpoint"), rest[-10:]
    assert not [line for line in rest[:-1] if "Traceback" in line or line.startswith("gradmimic:")], rest
    for _ in range(100):  # bounded: 10 s for the processes to be reaped
        if not any(_alive(pid) for pid in tree):
            break
        time.sleep(0.1)
    assert not [pid for pid in tree if _alive(pid)]


def test_hostile_members_of_a_webdataset_tar_are_rejects(tmp_path, ray_local, capsys):
    """The same rules inside a tar: a caption not UTF-8 or holding a NUL, a .json member over the read bound
    (never read), each its sample's reject; the good samples kept."""
    import io
    import json as json_
    import tarfile

    import pyarrow.dataset as ds
    from PIL import Image

    from pipelines.ops import cli
    from pipelines.run.storage import StageDir, open_storage
    from pipelines.stages.ingest.tarscan import MAX_READ

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    samples = {"good0": b"a square", "good1": b"another square", "latin1": b"caf\xe9", "nul": b"a\x00b",
               "bigjson": b"a square with a large json"}
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "000.tar", "w") as tf:
        for key, caption in samples.items():
            meta = json_.dumps({"note": "x" * (MAX_READ + 1) if key == "bigjson" else ""}).encode()
            for ext, data in ((".png", png.getvalue()), (".txt", caption), (".json", meta)):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    stages = f"  - {{stage: ingest, name: pool, source: {{kind: webdataset, path: {tmp_path / 'wds'}}}}}\n"
    assert cli.main(["run", write_spec(tmp_path / "s.yaml", spec_text(tmp_path, stages))]) == 0, capsys.readouterr()
    fs, root = open_storage(str(tmp_path / "runs"))
    stage = StageDir(fs, f"{root}/h/pool")
    assert (stage.manifest()["rows_out"], stage.manifest()["rejected"]) == (2, 3)
    rejects = ds.dataset(stage.join("rejects"), format="parquet").to_table().to_pylist()
    assert {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in rejects} == {
        "latin1": "caption: not UTF-8", "nul": "caption holds control characters",
        "bigjson": f"member 'bigjson.json' larger than {MAX_READ:,} bytes, not read"}
