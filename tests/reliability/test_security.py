"""Security: one loader for weights that never runs code, no unsafe YAML, tar members that would escape their
directory rejected and recorded, credentials kept out of every output (and refused in a spec)."""

from __future__ import annotations

import io
import os
import pathlib
import re
import tarfile

import pytest
import torch

from gradmimic import load_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults


class Planted:
    """Unpickling this runs ``os.system``: what a hostile checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def hostile_checkpoint(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Planted(str(marker))}, str(path))
    return path


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(ValueError, match=r"evil\.pt: refused: not a safetensors file nor a weights-only torch"):
        load_state_dict(evil)
    with pytest.raises(ValueError, match=r"^s3://b/evil\.pt: refused"):
        load_state_dict(evil.read_bytes(), name="s3://b/evil.pt")
    with pytest.raises(ValueError, match="refused"):
        load_state_dict(evil, flat=False)  # the checkpoint path (optimiser state) goes through the same gate
    assert not marker.exists()
    # the same loader reads honest files, by content whatever their name
    torch.save({"model": {"module.w": torch.ones(3)}}, str(tmp_path / "ok.bin"))
    assert torch.equal(load_state_dict(tmp_path / "ok.bin")["w"], torch.ones(3))
    from safetensors.torch import save

    data = save({"w": torch.arange(4.0)})
    (tmp_path / "named.pt").write_bytes(data)
    assert torch.equal(load_state_dict(tmp_path / "named.pt")["w"], torch.arange(4.0))
    assert torch.equal(load_state_dict(data)["w"], torch.arange(4.0))


@pytest.mark.slow
def test_a_hostile_init_file_stops_the_run_with_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    import yaml

    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker)
    spec = {"name": "s", "storage": str(tmp_path / "runs"), "ray": {"address": "local", "num_cpus": 2},
            "stages": [{"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 40}},
                       {"stage": "train", "name": "t", "data": "pool", "init": {"path": str(evil)},
                        "batch_size": 8, "steps": 1}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    res = subprocess.run([sys.executable, "-m", "pipelines", "run", str(tmp_path / "s.yaml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("gradmimic: error: s.yaml: stage 't' (train): init.path: ") and f"{evil}: refused" in last
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    assert not (tmp_path / "runs/s/t/_MANIFEST.json").exists()


def test_weights_are_read_in_one_place_only():
    """Every read of weights goes through gradmimic.load_state_dict: no other torch.load or safetensors load."""
    pattern = re.compile(r"torch\.load\(|torch\.jit\.load\(|safetensors\.torch import (load|load_file)\b|pickle\.load")
    hits = []
    for path in list((ROOT / "gradmimic").rglob("*.py")) + list((ROOT / "pipelines").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}")
    assert hits and {h.rsplit(":", 1)[0] for h in hits} == {"gradmimic/task_vector.py"}, hits


def test_yaml_is_only_ever_safe_loaded(tmp_path):
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.Loader|UnsafeLoader|FullLoader")
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in list((ROOT / "pipelines").rglob("*.py")) +
            list((ROOT / "gradmimic").rglob("*.py")) for n, line in enumerate(p.read_text().splitlines(), 1)
            if unsafe.search(line)]
    assert hits == []
    from pipelines.run.config import SpecError
    from pipelines.run.spec import load_spec

    marker = tmp_path / "ran"
    (tmp_path / "s.yaml").write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nstages: []\n")
    with pytest.raises(SpecError, match=r"^s\.yaml: malformed YAML at line 1, column 7: "):
        load_spec(tmp_path / "s.yaml")
    assert not marker.exists()


def test_tar_members_that_would_escape_are_rejected_and_recorded(tmp_path, ray_local):
    """``../../x``, absolute names and links in a source tar: never read nor followed, each a recorded reject."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.support.ingest import check_index, image_bytes, read_output, run_ingest

    root = tmp_path / "src" / "pool"
    (root / "metadata").mkdir(parents=True)
    (root / "shards").mkdir()
    uids = [f"{i:032x}" for i in range(1, 6)]
    pq.write_table(pa.table({"uid": uids, "text": [f"caption {i}" for i in range(5)]}), root / "metadata/m.parquet")
    names = ["000000000", "../../escaped", "/abs/olute", "sub/../../../up", "000000004"]
    with tarfile.open(root / "shards/00000000.tar", "w") as tf:
        for key, uid in zip(names, uids):
            for name, data in ((f"{key}.jpg", image_bytes("JPEG")), (f"{key}.json", json.dumps({"uid": uid}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        for kind, name, target in ((tarfile.SYMTYPE, "000000009.jpg", "/etc/passwd"),
                                   (tarfile.LNKTYPE, "000000008.jpg", "000000000.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    before = {p for p in tmp_path.rglob("*")}
    manifest, out = run_ingest(tmp_path, {"source": {"kind": "datacomp", "path": str(root)}})
    rows, members, rejects = read_output(out, manifest)
    with tarfile.open(root / "shards/00000000.tar") as tf:
        originals = {f"00000000.tar/{k}": (tf.extractfile(f"{k}.jpg").read(), f"caption {i}")
                     for i, k in ((0, "000000000"), (4, "000000004"))}
    check_index(manifest, rows, rejects, originals)
    assert sorted(r["uid"] for r in rows) == [uids[0], uids[4]]
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons == sorted([
        "unsafe member name '../../escaped.jpg'", "unsafe member name '../../escaped.json'",
        "unsafe member name '/abs/olute.jpg'", "unsafe member name '/abs/olute.json'",
        "unsafe member name 'sub/../../../up.jpg'", "unsafe member name 'sub/../../../up.json'",
        "link member '000000009.jpg' -> '/etc/passwd'", "link member '000000008.jpg' -> '000000000.jpg'"]
        + ["no image in the shards"] * 3)  # the metadata rows of the samples whose members were unsafe
    # nothing was written outside the run's storage
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(str(p).startswith(str(tmp_path / "runs")) for p in created), sorted(created)[:5]
    assert not (tmp_path / "escaped.jpg").exists() and not pathlib.Path("/abs").exists()


@pytest.mark.slow
@pytest.mark.cluster
def test_a_local_ray_serves_its_dashboard_and_job_api_on_loopback_only():
    import subprocess
    import sys

    code = """
import json, time, psutil, ray
from pipelines.run.runner import init_ray
from pipelines.run.spec import parse_spec
init_ray(parse_spec({"name": "l", "storage": "/tmp/x", "ray": {"num_cpus": 1},
                     "stages": [{"stage": "ingest", "name": "p", "source": {"kind": "embedded"}}]}))
port = int(ray._private.worker.global_worker.node.address_info["webui_url"].rsplit(":", 1)[1])
time.sleep(2)
me = psutil.Process()
listen = sorted({c.laddr.ip for p in [me] + me.children(recursive=True) for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
print(json.dumps({"port": port, "listen": listen}))
ray.shutdown()
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert out["listen"] == ["127.0.0.1"], out  # the dashboard, which also serves the job submission API
