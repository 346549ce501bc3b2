"""The filter stage on hand-made pools and utilities: exact fractions with ties, every combinator, unscored rows,
conservation, the subset file, a cut-off's bracket bounded on the driver; the index output of a pool indexed in
place equal to the resharded one sample for sample, locally and on S3; the keep-rule parser's errors."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines.bench.scorelog import synthetic_uids
from pipelines.formats.pool import SUBSET, read_pool, read_subset, uid_hex
from pipelines.run.config import SpecError
from pipelines.run.runner import Progress, StageContext, committed_stage, run_spec
from pipelines.run.spec import parse_spec
from pipelines.run.storage import StageDir, open_storage
from pipelines.stages.filter import keep_rule as kr
from pipelines.stages.filter.stage import BRACKET_CAP, run_filter
from tests.support.pools import SAMPLE_COLUMNS, committed, datacomp_pool, samples

pytestmark = pytest.mark.usefixtures("ray_local")
BUCKETS = 4


def make_pool(tmp_path, n=1000, test=100, seed=0, missing_from_utility=0, extra_in_utility=0, skip_bucket=None):
    """A pool of ``n`` rows (the last ``test`` in the test split) with a tied ``clip`` column, and a utility over
    the train rows with a tied ``mean_score`` (``missing_from_utility`` train rows left out, ``extra`` uids added)."""
    rng = np.random.default_rng(seed)
    fs, root = open_storage(str(tmp_path))
    hi, lo = synthetic_uids(n + extra_in_utility, seed)
    clip = np.round(rng.normal(0.3, 0.05, n), 2)  # many ties
    clip[rng.random(n) < 0.02] = np.nan
    pool = pd.DataFrame({"uid": uid_hex(hi[:n], lo[:n]).to_pylist(), "uid_hi": hi[:n], "uid_lo": lo[:n],
                         "text": [f"caption {i}" for i in range(n)], "key": [f"{i:09d}" for i in range(n)],
                         "shard": np.arange(n) // 300, "split": ["train"] * (n - test) + ["test"] * test,
                         "clip": clip})
    shards = {f"shards/shard-{s:05d}.parquet": pa.Table.from_pandas(g, preserve_index=False)
              for s, g in pool.groupby("shard")}
    pool_dir = committed(fs, f"{root}/r/pool", shards, rows_out=n)
    scored = np.arange(n - test - missing_from_utility)
    scored = np.concatenate([scored, np.arange(n, n + extra_in_utility)])
    util = pd.DataFrame({"uid_hi": hi[scored], "uid_lo": lo[scored],
                         "mean_score": np.round(rng.normal(0, 1, len(scored)), 1),
                         "vote_threshold": rng.integers(0, 5, len(scored)) / 4})
    files = {}
    for b in range(BUCKETS):
        part = util[util["uid_lo"] % BUCKETS == b]
        if b == skip_bucket:
            continue
        files[f"utility/bucket={b}/part-00000.parquet"] = pa.Table.from_pandas(part, preserve_index=False)
    util_dir = committed(fs, f"{root}/r/util", files, num_buckets=BUCKETS)
    joined = pool.merge(util, on=["uid_hi", "uid_lo"], how="left")
    return fs, root, pool_dir, util_dir, joined


def run(tmp_path, fs, root, pool_dir, util_dir, keep, **options):
    cfg = parse_spec({"name": "r", "storage": str(tmp_path), "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}},
        {"stage": "aggregate", "name": "util", "scores": {"path": "x"}},
        {"stage": "filter", "name": "kept", "data": "pool", "utility": "util", "keep": keep, **options}]}
    ).stages[2].config
    out = StageDir(fs, f"{root}/r/kept")
    out.begin()
    ctx = StageContext(out, {"pool": pool_dir, "util": util_dir}, "filter kept", Progress(io.StringIO()))
    result = run_filter(cfg, ctx)
    out.commit(result)
    return result, StageDir(fs, f"{root}/r/kept")


def brute(rule, df: pd.DataFrame) -> np.ndarray:
    """The rule's meaning, written directly: ranks by full sort with uid tie-break over the population."""
    if isinstance(rule, kr.Clause):
        v = df[rule.column].to_numpy(np.float64)
        has = ~np.isnan(v)
        if rule.op == "min":
            return has & (v >= rule.value)
        if rule.op == "max":
            return has & (v <= rule.value)
        pop = df[has].assign(_k=-v[has] if rule.op == "top" else v[has])
        k = int(np.floor(rule.value * len(pop) + 0.5))
        chosen = pop.sort_values(["_k", "uid_hi", "uid_lo"]).index[:k]
        return df.index.isin(chosen)
    masks = [brute(c, df) for c in rule.children]
    if rule.op == "and":
        return np.logical_and.reduce(masks)
    if rule.op == "or":
        return np.logical_or.reduce(masks)
    return masks[0] & ~masks[1]


RULES = [
    {"column": "clip", "top": 0.3},
    {"mean_score": {"bottom": 0.25}},
    {"minus": [{"clip": {"top": 0.3}}, {"mean_score": {"bottom": 0.2}}]},  # the paper's combination
    {"and": [{"vote_threshold": {"min": 0.5}}, {"clip": {"max": 0.35}}, {"mean_score": {"top": 0.9}}]},
    {"or": [{"clip": {"top": 0.1}}, {"mean_score": {"top": 0.1}}, {"vote_threshold": {"min": 1.0}}]},
    {"clip": {"top": 1.0}},
]


@pytest.mark.parametrize("sample_rows", [100_000, 40])  # the whole population, or a sample and a bracket pass
@pytest.mark.parametrize("keep", RULES)
def test_kept_rows_equal_the_rule_evaluated_directly(tmp_path, keep, sample_rows):
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path)
    result, out = run(tmp_path, fs, root, pool_dir, util_dir, keep, sample_rows=sample_rows, shard_size=128)
    train = joined[joined["split"] == "train"].reset_index(drop=True)
    want = set(train["uid"][brute(kr.parse_rule(keep), train)]) | set(joined["uid"][joined["split"] == "test"])
    kept = pd.concat([out.read_table(f).to_pandas() for f in result["files"] if f.startswith("shards/")])
    assert set(kept["uid"]) == want and len(kept) == len(want)
    assert result["rows_in"] == 1000 == result["rows_out"] + result["rejected"] and result["conserved"]
    assert result["passed_through"] == 100 and result["kept_in_scope"] == len(want) - 100
    assert list(kept["key"]) == [f"{i:09d}" for i in range(len(kept))]
    assert (kept["shard"].to_numpy() == np.arange(len(kept)) // 128).all()
    assert list(kept["text"]) == list(joined.set_index("uid").loc[kept["uid"], "text"])  # pool order, rows intact
    rejected = pd.concat([out.read_table(f).to_pandas() for f in result["files"] if f.startswith("rejected/")]) \
        if result["rejected"] else pd.DataFrame({"uid": [], "reason": []})
    assert set(rejected["uid"]) == set(train["uid"]) - want and len(rejected) == result["rejected"]
    for clause in kr.clauses(kr.parse_rule(keep)):
        if clause.ranked:
            n = int(train[clause.column].notna().sum())
            found = result["clauses"][clause.label]
            assert found["kept"] == int(np.floor(clause.value * n + 0.5))
            assert found["driver_keys"] <= BRACKET_CAP * sample_rows
    subset = read_subset(fs, out.join(SUBSET))
    assert subset.dtype == np.dtype("u8,u8")
    assert (np.lexsort((subset["f1"], subset["f0"])) == np.arange(len(subset))).all()  # sorted
    in_scope = kept[kept["split"] == "train"]
    assert set(zip(subset["f0"].tolist(), subset["f1"].tolist())) == set(zip(in_scope["uid_hi"], in_scope["uid_lo"]))


@pytest.mark.parametrize("sample_rows", [2, 5, 12])
def test_a_bracket_over_its_cap_is_narrowed_and_the_cut_off_stays_exact(tmp_path, sample_rows):
    """A sample so small that its bracket holds far more than ``4 x sample_rows`` rows: the driver never holds
    more keys than that, fresh samples narrow the bracket, and the kept set is exactly the oracle's."""
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path, n=1500, test=50)
    keep = {"minus": [{"clip": {"top": 0.3}}, {"mean_score": {"bottom": 0.2}}]}
    result, out = run(tmp_path, fs, root, pool_dir, util_dir, keep, sample_rows=sample_rows, shard_size=200)
    train = joined[joined["split"] == "train"].reset_index(drop=True)
    want = set(train["uid"][brute(kr.parse_rule(keep), train)]) | set(joined["uid"][joined["split"] == "test"])
    kept = pd.concat([out.read_table(f).to_pandas() for f in result["files"] if f.startswith("shards/")])
    assert set(kept["uid"]) == want and len(kept) == len(want) == result["rows_out"]
    assert result["rows_in"] == 1500 == result["rows_out"] + result["rejected"]
    for label in ("clip top 30%", "mean_score bottom 20%"):
        found = result["clauses"][label]
        assert found["driver_keys"] <= BRACKET_CAP * sample_rows and found["passes"] >= 3, found
    top = train.assign(_k=-train["clip"]).dropna(subset=["clip"]).sort_values(["_k", "uid_hi", "uid_lo"])
    assert result["clauses"]["clip top 30%"]["cutoff_value"] == top["clip"].iloc[int(np.floor(0.3 * len(top) + .5)) - 1]


def test_reasons_name_the_clause_that_dropped_each_row(tmp_path):
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path)
    keep = {"minus": [{"clip": {"top": 0.3}}, {"mean_score": {"bottom": 0.2}}]}
    result, out = run(tmp_path, fs, root, pool_dir, util_dir, keep)
    rejected = pd.concat([out.read_table(f).to_pandas() for f in result["files"] if f.startswith("rejected/")])
    train = joined[joined["split"] == "train"].reset_index(drop=True)
    rule = kr.parse_rule(keep)
    top, bottom = brute(rule.children[0], train), brute(rule.children[1], train)
    why = dict(zip(rejected["uid"], rejected["reason"]))
    for uid, t, b in zip(train["uid"], top, bottom):
        if not t:
            assert why[uid] == "not clip top 30%"
        elif b:
            assert why[uid] == "removed by mean_score bottom 20%"
    assert result["reasons"] == {"not clip top 30%": int((~top).sum()),
                                 "removed by mean_score bottom 20%": int((top & bottom).sum())}


@pytest.mark.parametrize("policy", ["keep", "drop", "error"])
def test_unscored_rows_are_never_dropped_silently(tmp_path, policy):
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path, missing_from_utility=30, extra_in_utility=7)
    keep = {"mean_score": {"top": 0.5}}
    if policy == "error":
        with pytest.raises(SpecError, match=r"^unscored: 30 rows of the pool's train split have no utility row in "
                                            r"stage 'util' and 7 utility rows are not in the pool; set unscored: "
                                            r"keep or drop$"):
            run(tmp_path, fs, root, pool_dir, util_dir, keep)
        return
    result, out = run(tmp_path, fs, root, pool_dir, util_dir, keep, unscored=policy)
    assert result["unscored"] == {"pool_rows": 30, "utility_rows_not_in_pool": 7, "policy": policy}
    scored = 900 - 30
    assert result["clauses"]["mean_score top 50%"]["population"] == scored
    assert result["rows_out"] == 100 + scored // 2 + (30 if policy == "keep" else 0)
    assert result["rows_in"] == result["rows_out"] + result["rejected"]
    assert result["reasons"].get("unscored", 0) == (30 if policy == "drop" else 0)


def test_an_empty_utility_bucket_means_unscored(tmp_path):
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path, skip_bucket=3)
    result, _ = run(tmp_path, fs, root, pool_dir, util_dir, {"mean_score": {"top": 0.5}}, unscored="drop")
    train = joined[joined["split"] == "train"]
    missing = int((train["uid_lo"] % BUCKETS == 3).sum())
    assert missing > 100 and result["unscored"]["pool_rows"] == missing == result["reasons"]["unscored"]
    assert result["clauses"]["mean_score top 50%"]["population"] == 900 - missing


def test_apply_to_every_split(tmp_path):
    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path, test=0)
    result, _ = run(tmp_path, fs, root, pool_dir, util_dir, {"clip": {"bottom": 0.5}}, apply_to=["train", "test"])
    n = int(joined["clip"].notna().sum())
    assert result["passed_through"] == 0 and result["rows_out"] == int(np.floor(0.5 * n + 0.5))


def test_a_column_nobody_has_is_one_line(tmp_path):
    fs, root, pool_dir, util_dir, _ = make_pool(tmp_path, n=50, test=5)
    with pytest.raises(SpecError, match=r"^keep: no column 'clip_score' in the pool \(stage 'pool'\) nor the utility "
                                        r"\(stage 'util'\); the pool has clip, key, shard, split, text, uid, uid_hi, "
                                        r"uid_lo$"):
        run(tmp_path, fs, root, pool_dir, util_dir, {"clip_score": {"top": 0.3}})


@pytest.mark.parametrize("keep, message", [
    ({"clip": {"top": 1.5}}, "keep.clip.top: a fraction must be in (0, 1], got 1.5"),
    ({"minus": [{"clip": {"top": 0.3}}, {"column": "m", "bottom": 0}]}, "keep.minus[1].bottom: a fraction must be in "
                                                                        "(0, 1], got 0"),
    ({"minus": [{"clip": {"top": 0.3}}]}, "keep.minus: expected two rules: [kept, removed]"),
    ({"and": {"clip": {"min": 1}}}, "keep.and: expected a list of at least two rules"),
    ({"column": "clip", "top": 0.1, "min": 2}, "keep: a clause has 'column' and exactly one of min, max, top, bottom"),
    ({"clip": {"above": 1}}, "keep.clip: expected clauses (min, max, top, bottom)"),
    ({"clip": {"min": "high"}}, "keep.clip.min: expected a number, got 'high'"),
    ("clip > 3", "keep: expected a rule (a mapping: a column clause, and, or, minus)"),
])
def test_bad_rules_name_the_field(keep, message):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "r", "storage": "x", "stages": [
            {"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}},
            {"stage": "filter", "name": "f", "data": "pool", "keep": keep}]}, label="s.yaml")
    assert str(err.value).startswith(f"s.yaml: stage 'f' (filter): {message}"), str(err.value)


def test_utility_must_name_an_aggregate_stage():
    with pytest.raises(SpecError, match=r"^s.yaml: stage 'f' \(filter\): utility: stage 'pool' produces a dataset, "
                                        r"not a utility"):
        parse_spec({"name": "r", "storage": "x", "stages": [
            {"stage": "ingest", "name": "pool", "source": {"kind": "embedded"}},
            {"stage": "filter", "name": "f", "data": "pool", "utility": "pool", "keep": {"clip": {"min": 0}}}]},
            label="s.yaml")


@pytest.mark.parametrize("keep", [{"random": {"top": 0.3}}, {"minus": [{"random": {"top": 0.6}},
                                                                        {"mean_score": {"bottom": 0.2}}]}])
def test_the_virtual_random_column_is_a_seeded_uniform_per_uid(tmp_path, keep):
    """``random``: the baseline for a utility's top p%: an exact fraction, a function of uid and seed only."""
    from pipelines.stages.filter.tasks import uid_uniform

    fs, root, pool_dir, util_dir, joined = make_pool(tmp_path)
    train = joined[joined["split"] == "train"].reset_index(drop=True)
    kept_sets = []
    for seed in (1, 2):
        result, out = run(tmp_path / f"s{seed}", fs, f"{root}/s{seed}", pool_dir, util_dir, keep, seed=seed,
                          sample_rows=50)
        u = uid_uniform(train["uid_hi"].to_numpy(np.uint64), train["uid_lo"].to_numpy(np.uint64), seed)
        assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.05
        want = set(train["uid"][brute(kr.parse_rule(keep), train.assign(random=u))])
        kept = pd.concat([out.read_table(f).to_pandas() for f in result["files"] if f.startswith("shards/")])
        got = set(kept["uid"][kept["split"] == "train"])
        assert got == want and result["rows_in"] == result["rows_out"] + result["rejected"]
        kept_sets.append(got)
    assert kept_sets[0] != kept_sets[1]  # another seed, another draw


# ------------------------------------------------------------------------------------------------ a pool in place


def in_place_spec(storage: str, pool: str) -> dict:
    """A DataComp pool indexed in place, then the same rule twice: the default index and ``reshard: true``."""
    keep = {"clip_b32_similarity_score": {"top": 0.5}}
    return parse_spec({"name": "p", "storage": storage, "stages": [
        {"stage": "ingest", "name": "pool", "source": {"kind": "datacomp", "path": pool}, "shard_size": 7,
         "split": {"test_fraction": 0.2, "seed": 1}},
        {"stage": "filter", "name": "index", "data": "pool", "keep": keep, "shard_size": 5, "sample_rows": 4},
        {"stage": "filter", "name": "copied", "data": "pool", "keep": keep, "shard_size": 5, "sample_rows": 4,
         "reshard": True}]})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_index_output_equals_the_resharded_one_sample_for_sample(tmp_path, request, where):
    """Filtering a pool indexed in place (absolute tar URLs) writes no tar by default: each kept row points at
    its image in the source tar; ``reshard: true`` copies the same samples, in the same order, into the stage's
    tars.  Both read back as the train stage reads them (``read_pool``, the ``Decoder``) give the same bytes."""
    from pipelines.training.data import Decoder

    datacomp_pool(tmp_path / "pool", n=40, per_tar=12)
    if where == "s3":
        request.getfixturevalue("s3_endpoint")
        fs, _ = open_storage("s3://gm-filter")
        fs.mkdir("gm-filter")
        fs.put(str(tmp_path / "pool"), "gm-filter/pool", recursive=True)
        spec = in_place_spec("s3://gm-filter/runs", "s3://gm-filter/pool")
    else:
        spec = in_place_spec(str(tmp_path / "runs"), str(tmp_path / "pool"))
    manifests = run_spec(spec, stream=io.StringIO())
    pool, index, copied = (committed_stage(spec, name) for name in ("pool", "index", "copied"))
    m_index, m_copied = manifests["index"], manifests["copied"]
    assert not [f for f in m_index["files"] if f.endswith(".tar")]
    assert sorted(f for f in m_copied["files"] if f.endswith(".tar")) == \
        [f"shards/shard-{j:05d}.tar" for j in range(m_copied["shards"])]
    # the oracle: the pool's train rows ranked by score, ties by uid; the test split passes; pool order kept
    source = read_pool(pool, ["uid", "uid_hi", "uid_lo", "split", "clip_b32_similarity_score", *SAMPLE_COLUMNS[4:]])
    rows = source.to_pandas()
    train = rows[rows["split"] == "train"].assign(_k=lambda d: -d["clip_b32_similarity_score"])
    top = train.sort_values(["_k", "uid_hi", "uid_lo"])["uid"][:int(np.floor(0.5 * len(train) + 0.5))]
    want = [u for u, split in zip(rows["uid"], rows["split"]) if split == "test" or u in set(top)]
    a, b = samples(index), samples(copied)
    assert [r["uid"] for r in a] == [r["uid"] for r in b] == want
    for m in (m_index, m_copied):
        assert m["rows_in"] == len(rows) == m["rows_out"] + m["rejected"] and m["rows_out"] == len(want)
    by_uid = rows.set_index("uid")
    for j, (x, y) in enumerate(zip(a, b)):
        assert (x["key"], x["shard"]) == (y["key"], y["shard"]) == (f"{j:09d}", j // 5)
        assert (x["split"], x["text"], x["caption"], x["image_bytes"]) == \
            (y["split"], y["text"], y["caption"], y["image_bytes"])
        assert x["caption"] == x["text"] == by_uid.loc[x["uid"], "text"]
        original = by_uid.loc[x["uid"]]  # the index points where the image already is: the source tar
        assert (x["tar"], x["image_offset"], x["image_size"]) == \
            (original["tar"], original["image_offset"], original["image_size"])
        assert "://" in x["tar"] and x["tar"].rsplit("/", 2)[-2:] != ["shards", f"shard-{j // 5:05d}.tar"]
        assert y["tar"].endswith(f"/shards/shard-{j // 5:05d}.tar") and y["text_offset"] >= 0
    decoder = Decoder(image_size=8)
    (images, reason), (images2, reason2) = [decoder.images(read_pool(d, ["tar", "image_offset", "image_size"]))
                                            for d in (index, copied)]
    assert images.shape == (len(want), 3, 8, 8) and np.array_equal(images, images2)
    assert not reason.any() and not reason2.any()  # every image decoded


def test_reshard_needs_images_in_tars(tmp_path):
    fs, root, pool_dir, util_dir, _ = make_pool(tmp_path, n=50, test=5)
    with pytest.raises(SpecError, match=r"^reshard: the pool \(stage 'pool'\) has no images in tars to copy$"):
        run(tmp_path, fs, root, pool_dir, util_dir, {"clip": {"top": 0.3}}, reshard=True)
