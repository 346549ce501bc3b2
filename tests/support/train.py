"""Train-stage helpers: the shared 160-digit pool, reference weights, score-log reading and its exactly-once check."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from pipelines.formats.score_log import list_parts, log_files, read_score_log, segment_of
from pipelines.models.build import ModelSpec
from pipelines.run.storage import StageDir, open_storage

POOL = {"stage": "ingest", "name": "pool", "source": {"kind": "embedded", "limit": 160},
        "noise": {"kind": "label", "rate": 0.4, "seed": 0}, "split": {"test_fraction": 0.2, "seed": 0},
        "shard_size": 40}


def stage_dir(storage: str, stage: str, name: str = "t") -> StageDir:
    fs, root = open_storage(storage)
    return StageDir(fs, f"{root}/{name}/{stage}")


def score_log(storage: str, stage: str, name: str = "t"):
    """A committed train stage's log, found as readers find it (its manifest's ``files``), after checking that the
    manifest names every segment there is and that each checkpoint wrote at most one file per rank."""
    d = stage_dir(storage, stage, name)
    m = d.manifest()
    files = log_files(m["files"])
    assert [f.rsplit("/", 1)[1] for f in files] == [p.rsplit("/", 1)[1] for p in list_parts(d.fs, d.join("scores"))]
    per_checkpoint = Counter(segment_of(f)[:2] for f in files)
    assert max(per_checkpoint.values(), default=0) <= m["workers"], per_checkpoint
    log = read_score_log(d.fs, "", files=[d.join(f) for f in files]).to_pandas()
    return log.sort_values(["step", "uid_hi", "uid_lo"]).reset_index(drop=True)


def reference_file(path, task: str, seed: int = 0, scale: float = 0.05) -> str:
    """The student's initialisation (same seed) moved a little: a reference in the same parameter space."""
    from safetensors.torch import save_file

    model = ModelSpec(task, "tiny-clip", num_classes=10).build(seed=seed)
    g = torch.Generator().manual_seed(123)
    state = {k: (v + scale * v.std(correction=0) * torch.randn(v.shape, generator=g)).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return str(path)


def assert_exactly_once(log, batch: int, steps: int, sizes=None):
    assert not log.duplicated(["uid_hi", "uid_lo", "step"]).any()
    per_step = log.groupby("step")
    assert sorted(per_step.groups) == list(range(1, steps + 1))
    assert (per_step.size() == batch).all() and (log.batch_size == batch).all()
    np.testing.assert_allclose(per_step.weight.sum(), 1.0, rtol=0, atol=1e-5)
    for _, rows in log.groupby("epoch"):  # within an epoch no sample comes twice
        assert not rows.duplicated(["uid_hi", "uid_lo"]).any()
    if sizes is not None:
        assert sorted(log.groupby(["step", "rank"]).size().unique().tolist()) == sorted(set(sizes))


# ------------------------------------------------------------------------------------------------ undecodable images


def truncated_jpeg() -> bytes:
    """A JPEG cut short: its header parses, its pixel data ends early."""
    from tests.support.ingest import image_bytes

    data = image_bytes("JPEG", size=(64, 48))
    return data[: len(data) // 2]


def random_bytes(n: int = 600, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _png(width: int, height: int, idat: bytes) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """A PNG declaring 30000 x 30000 pixels that is tiny on disk: a decompression bomb."""
    import zlib

    return _png(30000, 30000, zlib.compress(b"\x00" * 64))


def corrupt_png() -> bytes:
    """A PNG whose header is fine and whose pixel data is not zlib."""
    return _png(10, 10, b"this is not zlib data at all")


def webdataset_pool(root, n: int, bad=None, per_tar: int = 40):
    """A webdataset pool of ``n`` samples (small JPEGs of distinct colours, captions naming them, uids in ``.json``),
    ``per_tar`` samples per tar; ``bad`` maps a sample number to the bytes its image member holds instead.  Returns
    the uids (32 hex chars) by sample number."""
    from tests.support.ingest import image_bytes, sample_members, write_tar

    bad = bad or {}
    uids = [f"{i + 1:032x}" for i in range(n)]
    for t in range(0, n, per_tar):
        members = []
        for i in range(t, min(t + per_tar, n)):
            colour = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
            image = bad.get(i, image_bytes("JPEG", colour, (20, 16)))
            members += sample_members(f"s{i:05d}", uids[i], image, f"a {['red', 'green', 'blue'][i % 3]} patch {i % 7}")
        write_tar(root / f"{t // per_tar:05d}.tar", members)
    return uids
