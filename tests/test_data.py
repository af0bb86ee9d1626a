"""The data layer: DigitsMLT preparation, manifest and checksums, Ray Data read-back, views.

The prepared directory comes from the session fixture ``digits_dir`` (tests/conftest.py);
tests that modify a directory work on a ``shutil.copytree`` copy of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy import stats

import tuner.prepare
from tuner.data.cooccurrence import conditional_matrix
from tuner.data.corruption import (
    ViewSpec,
    drop_positives,
    make_view,
    unobserved_positive_share,
)
from tuner.data.digits import DigitsConfig, plateau_profile, scene_affinity
from tuner.data.manifest import SPLITS
from tuner.data.prepared import PreparedData, prepare_digits
from tuner.data.stream import (
    Decoder,
    EpochStream,
    configure_data_context,
    epochs_dataset,
    iter_train_batches,
    load_split,
    plan_epochs,
    sample_repeats,
    task_pool,
    train_dataset,
)
from tuner.errors import ChecksumError, ConfigError, DataError

NUM_CLASSES = 10
IMAGE_SIZE = 24


# ---------------------------------------------------------------- helpers
def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def split_labels(data_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """Image ids and ``(N, C)`` labels of a split, read straight from labels/true.parquet."""
    table = pq.read_table(data_dir / "labels" / "true.parquet").to_pydict()
    rows = [i for i, s in enumerate(table["split"]) if s == split]
    ids = [table["image_id"][i] for i in rows]
    labels = np.array([table["labels"][i] for i in rows], dtype=np.int64).reshape(-1, NUM_CLASSES)
    return ids, labels


def copy_prepared(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def coco_like_labels(
    rng: np.random.Generator, n: int = 4000, c: int = 40, k_range: tuple[int, int] = (3, 5)
) -> np.ndarray:
    """``(n, c)`` 0/1 labels with a long-tailed class frequency and ``k_range`` positives per row."""
    weights = 1.0 / np.arange(1, c + 1) ** 0.8
    weights /= weights.sum()
    labels = np.zeros((n, c), dtype=np.uint8)
    for i, k in enumerate(rng.integers(k_range[0], k_range[1] + 1, size=n)):
        labels[i, rng.choice(c, size=k, replace=False, p=weights)] = 1
    return labels


def keep_one_moments(k: np.ndarray, drop: float) -> tuple[float, float]:
    """Mean and variance of the total kept positives under "drop w.p. ``drop``, keep >= 1".

    Per image with k positives the kept count is B ~ Binomial(k, 1 - drop), replaced by 1
    when B == 0 (exact moments from the binomial pmf).
    """
    mean = var = 0.0
    for kk, n_images in zip(*np.unique(k[k > 0], return_counts=True)):
        b = np.arange(kk + 1)
        pmf = stats.binom.pmf(b, kk, 1.0 - drop)
        kept = np.where(b == 0, 1, b)
        m1 = float((kept * pmf).sum())
        m2 = float((kept**2 * pmf).sum())
        mean += n_images * m1
        var += n_images * (m2 - m1**2)
    return mean, var


# ---------------------------------------------------------------- prepare + manifest
def test_manifest_matches_files(digits_dir: Path) -> None:
    manifest = read_json(digits_dir / "manifest.json")
    assert manifest["num_classes"] == NUM_CLASSES
    assert len(manifest["splits"]["train"]["shards"]) > 1
    for split in SPLITS:
        entry = manifest["splits"][split]
        ids, labels = split_labels(digits_dir, split)
        assert entry["num_images"] == len(ids) > 0
        assert ids == sorted(ids)  # rows are keyed by image id
        assert manifest["class_counts"][split] == labels.sum(0).tolist()
        per_image = labels.sum(1)
        assert per_image.min() >= 1 and per_image.max() <= 9, split  # 3x3 cells
        # shards, read in manifest order, hold the split's rows in label-table order
        shard_ids, shard_index = [], []
        for rel in entry["shards"]:
            table = pq.read_table(digits_dir / rel, columns=["index", "image_id"])
            shard_ids += table.column("image_id").to_pylist()
            shard_index += table.column("index").to_pylist()
        assert shard_ids == ids
        assert shard_index == list(range(len(ids)))


def test_train_split_is_long_tailed_and_eval_splits_balanced(digits_dir: Path) -> None:
    manifest = read_json(digits_dir / "manifest.json")
    train = np.array(manifest["class_counts"]["train"])
    assert train.min() > 0
    config = DigitsConfig()
    np.testing.assert_array_equal(np.sort(train)[::-1], plateau_profile(
        NUM_CLASSES, config.max_count, config.min_count))
    assert 20 <= train.max() / train.min() <= 100
    for split in ("val", "test"):
        counts = np.array(manifest["class_counts"][split])
        assert counts.min() > 0 and counts.max() / counts.min() < 2, (split, counts)


def test_label_sets_follow_the_scenes(digits_dir: Path) -> None:
    """Classes that share a scene co-occur far more often than classes that share none."""
    ring = read_json(digits_dir / "manifest.json")["build"]["scene_ring"]
    core = scene_affinity(np.asarray(ring), 0.0) > 0
    share = (core.T.astype(int) @ core.astype(int)) > 0
    off_diagonal = ~np.eye(NUM_CLASSES, dtype=bool)
    for split in ("train", "val"):
        _, labels = split_labels(digits_dir, split)
        cond, valid = conditional_matrix(labels)
        together = cond[share & off_diagonal & valid]
        apart = cond[~share & valid]
        assert together.size and apart.size
        # the head classes sit in most training images whatever the scene: compare by lift
        lift = cond / labels.mean(0)[None, :]
        assert np.median(lift[share & off_diagonal]) > 2 * np.median(lift[~share]), split


def test_groups_partition_classes_by_thresholds(digits_dir: Path) -> None:
    manifest = read_json(digits_dir / "manifest.json")
    groups = manifest["groups"]
    members = sorted(c for name in ("head", "medium", "tail") for c in groups[name])
    assert members == list(range(NUM_CLASSES))
    counts = manifest["class_counts"]["train"]
    head_min = manifest["group_thresholds"]["head_min"]
    tail_below = manifest["group_thresholds"]["tail_below"]
    assert tail_below < head_min
    assert groups["head"] == [c for c in range(NUM_CLASSES) if counts[c] >= head_min]
    assert groups["tail"] == [c for c in range(NUM_CLASSES) if counts[c] < tail_below]
    assert all(groups[name] for name in ("head", "medium", "tail")), groups


def test_train_split_is_dense_enough_for_forty_percent_left(
    digits_dir: Path, tmp_path: Path
) -> None:
    """Several labels per image, so q=0.6 leaves about 40% of positives (one kept per image)."""
    data = PreparedData(copy_prepared(digits_dir, tmp_path))
    _, labels = data.true_labels("train")
    per_image = labels.sum(1)
    assert per_image.mean() >= 3.0 and (per_image == 1).mean() < 0.05, np.bincount(per_image)
    # sizes of the head / medium / tail groups follow COCO-MLT's 22/33/25 of 80
    assert [len(data.groups()[g]) for g in ("head", "medium", "tail")] == [3, 4, 3]
    observed = data.view_labels(ViewSpec("missing", 0.6, 0))
    kept = observed.sum() / labels.sum()
    assert 0.37 <= kept <= 0.43, kept
    assert observed.sum(1).min() >= 1


@pytest.mark.parametrize("spec", [ViewSpec("missing", 0.6, 0), ViewSpec("candidate", 0.3, 0)])
def test_observed_groups_are_never_empty(digits_dir: Path, tmp_path: Path, spec: ViewSpec) -> None:
    """Corruption shifts every count; groups then follow the observed ranks (recorded)."""
    data = PreparedData(copy_prepared(digits_dir, tmp_path))
    groups = data.groups(spec)
    counts = np.array(data.class_counts(spec))
    assert all(groups[g] for g in ("head", "medium", "tail")), groups
    assert sorted(sum(groups.values(), [])) == list(range(NUM_CLASSES))
    assert counts[groups["head"]].min() >= counts[groups["medium"]].max()
    assert counts[groups["medium"]].min() >= counts[groups["tail"]].max()
    assert data.manifest["views"][spec.name]["group_rule"] in ("thresholds", "rank")


def test_stale_generator_version_is_rebuilt(digits_dir: Path, tmp_path: Path) -> None:
    from tuner.data.manifest import write_manifest
    from tuner.data.prepared import ensure_prepared

    copy = copy_prepared(digits_dir, tmp_path)
    manifest = read_json(copy / "manifest.json")
    manifest["build"]["version"] = 1  # what an older generator wrote (with its own checksum)
    write_manifest(copy, manifest)
    ensure_prepared("digits-mlt", copy)
    assert read_json(copy / "manifest.json")["build"]["version"] == read_json(
        digits_dir / "manifest.json")["build"]["version"]
    PreparedData(copy).verify()


def test_a_stale_variant_is_rebuilt_as_the_same_variant(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``--head-share`` build that goes stale (here: the former manifest schema) is rebuilt
    with the head share its manifest records, not silently as the default build."""
    from tuner.data.digits import DEFAULT_HEAD_SHARE, VERSION, DigitsConfig
    from tuner.data.manifest import SCHEMA_VERSION
    from tuner.data.prepared import ensure_prepared

    assert DEFAULT_HEAD_SHARE[VERSION] == DigitsConfig().head_share  # bump both together
    copy = copy_prepared(digits_dir, tmp_path)
    manifest = read_json(copy / "manifest.json")
    manifest["build"]["head_share"] = 0.5  # as `tuner.prepare --head-share 0.5` records it
    manifest["schema_version"] = SCHEMA_VERSION - 1
    del manifest["manifest_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    ensure_prepared("digits-mlt", copy)
    rebuilt = PreparedData(copy).manifest
    assert rebuilt["schema_version"] == SCHEMA_VERSION and rebuilt["build"]["head_share"] == 0.5
    head = max(rebuilt["class_counts"]["train"])
    assert rebuilt["splits"]["train"]["num_images"] == round(head / 0.5)
    assert "head share 0.5 as its manifest records" in capsys.readouterr().err
    PreparedData(copy).verify()


def test_a_space_head_share_builds_its_variant_in_a_cache_folder_of_its_own(
    digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``data.head_share`` (splc.yaml): the cache builds that variant beside the default build;
    a named folder holding another build runs as named, said in one line."""
    from tuner.data.prepared import default_data_dir, ensure_prepared

    monkeypatch.setenv("MLT_TUNER_DATA", str(tmp_path / "cache"))
    default = default_data_dir("digits-mlt")
    shutil.copytree(digits_dir, default)
    before = {p: p.read_bytes() for p in default.rglob("*") if p.is_file()}
    path = ensure_prepared("digits-mlt", None, head_share=0.5)
    assert path == tmp_path / "cache" / "digits-mlt-s0-h0.5" != default
    built = PreparedData(path).manifest
    assert built["build"]["head_share"] == 0.5
    assert built["splits"]["train"]["num_images"] == round(max(built["class_counts"]["train"]) / 0.5)
    assert ensure_prepared("digits-mlt", None, head_share=0.5) == path  # cached: not rebuilt
    assert ensure_prepared("digits-mlt", None) == default
    assert {p: p.read_bytes() for p in default.rglob("*") if p.is_file()} == before
    capsys.readouterr()
    assert ensure_prepared("digits-mlt", digits_dir, head_share=0.5) == digits_dir
    err = capsys.readouterr().err
    assert "holds DigitsMLT with head share 0.7" in err and err.count("\n") == 1
    with pytest.raises(ConfigError, match="for digits-mlt only"):
        ensure_prepared("voc-mlt", tmp_path / "voc", head_share=0.5)


def test_digits_of_the_former_schema_is_rebuilt_another_benchmark_is_left_alone(
    digits_dir: Path, tmp_path: Path
) -> None:
    from tuner.data.manifest import SCHEMA_VERSION
    from tuner.data.prepared import ensure_prepared

    copy = copy_prepared(digits_dir, tmp_path)
    manifest = read_json(copy / "manifest.json")
    manifest["schema_version"] = SCHEMA_VERSION - 1
    del manifest["manifest_sha256"]  # schema 1 had no checksum of its own
    (copy / "manifest.json").write_text(json.dumps(manifest))
    ensure_prepared("digits-mlt", copy)  # the platform's own cache: rebuilt
    assert read_json(copy / "manifest.json")["schema_version"] == SCHEMA_VERSION
    PreparedData(copy).verify()
    # an old real benchmark passed as --data-dir of a digits-mlt search is never overwritten
    other = tmp_path / "other"
    shutil.copytree(digits_dir, other)
    manifest = {**read_json(other / "manifest.json"), "benchmark": "coco-mlt",
                "schema_version": SCHEMA_VERSION - 1}
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    ensure_prepared("digits-mlt", other)
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match="re-run `python -m tuner.prepare`"):
        PreparedData(other)


def test_checksums_cover_and_match_every_file(digits_dir: Path) -> None:
    manifest = read_json(digits_dir / "manifest.json")
    shards = [rel for split in SPLITS for rel in manifest["splits"][split]["shards"]]
    assert set(manifest["checksums"]) == set(shards) | {manifest["labels"]}
    on_disk = {str(p.relative_to(digits_dir)) for p in (digits_dir / "images").iterdir()}
    assert on_disk == set(shards)
    for rel, expected in manifest["checksums"].items():
        assert hashlib.sha256((digits_dir / rel).read_bytes()).hexdigest() == expected, rel
    PreparedData(digits_dir).verify()  # the platform's own check agrees


# ---------------------------------------------------------------- read-back
@pytest.mark.integration
def test_ray_data_epoch_yields_every_train_image_once(digits_dir: Path, ray_local: None) -> None:
    data = PreparedData(digits_dir)
    num_train = data.manifest["splits"]["train"]["num_images"]
    configure_data_context(1)
    ds = train_dataset(data.shard_files("train"), IMAGE_SIZE, "shift")
    seen = []
    for batch in iter_train_batches(ds, 32):
        images, index = batch["image"], batch["index"]
        assert images.dtype == torch.uint8
        assert images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert 1 <= images.shape[0] <= 32
        assert index.shape == (images.shape[0],)
        assert images.amax() > 0  # decoded digits, not blank canvases
        seen.append(index.numpy())
    seen = np.concatenate(seen)
    assert len(seen) == num_train
    np.testing.assert_array_equal(np.sort(seen), np.arange(num_train))

    # weighted sampling: the same stream yields exactly the drawn multiset
    weights = np.zeros(num_train)
    weights[: num_train // 2] = 1.0  # second half never drawn
    weights[0] = 50.0
    repeats = sample_repeats(weights, seed=3)
    drawn = np.concatenate([b["index"].numpy() for b in iter_train_batches(ds, 32, repeats=repeats)])
    assert len(drawn) == num_train
    np.testing.assert_array_equal(np.bincount(drawn, minlength=num_train), repeats)


@pytest.mark.integration
def test_one_execution_streams_every_epoch_in_full(digits_dir: Path, ray_local: None) -> None:
    """The trial's multi-epoch stream: each epoch holds every train image once, the images
    decode like the per-epoch stream, and a resumed trial can start at a later epoch."""
    data = PreparedData(digits_dir)
    files = data.shard_files("train")
    num_train = data.manifest["splits"]["train"]["num_images"]
    configure_data_context(1)
    datasets = []

    def make(epochs: range):
        datasets.append(list(epochs))
        return epochs_dataset(files, IMAGE_SIZE, "none", epochs, rows_per_task=128)

    stream = EpochStream(make, num_train, last_epoch=4)
    images, positions = load_split(files, IMAGE_SIZE)  # train images without augmentation
    reference = images[torch.argsort(positions)]
    for epoch in range(3):
        batches = list(iter_train_batches(stream.blocks(epoch), 64))
        index = np.concatenate([b["index"].numpy() for b in batches])
        np.testing.assert_array_equal(np.sort(index), np.arange(num_train))
        for b in batches[:3]:
            torch.testing.assert_close(b["image"], reference[b["index"]])
    assert datasets == [[0, 1, 2, 3]]  # one execution for all epochs
    later = np.concatenate([b["index"].numpy() for b in iter_train_batches(stream.blocks(3), 64)])
    np.testing.assert_array_equal(np.sort(later), np.arange(num_train))
    stream.close()
    resumed = EpochStream(make, num_train, last_epoch=4)
    index = np.concatenate([b["index"].numpy() for b in iter_train_batches(resumed.blocks(2), 64)])
    np.testing.assert_array_equal(np.sort(index), np.arange(num_train))
    assert datasets[-1] == [2, 3]
    resumed.close()


@pytest.mark.integration
def test_ranks_stream_disjoint_shares_that_cover_each_epoch(digits_dir: Path,
                                                           ray_local: None) -> None:
    """A multi-worker trial's stream: each rank's execution holds its planned share of every
    epoch, the shares are disjoint and together every train image once, the shares change
    from epoch to epoch, and a rank that resumes later plans the same share."""
    data = PreparedData(digits_dir)
    files = data.shard_files("train")
    num_train = data.manifest["splits"]["train"]["num_images"]
    world, seed = 2, 1234
    configure_data_context(0.5)

    def stream(rank: int) -> EpochStream:
        def rows(epoch: int) -> int:
            return sum(item["rows"] for item in plan_epochs(
                files, IMAGE_SIZE, [epoch], rows_per_task=128, seed=seed, rank=rank,
                world=world))

        return EpochStream(lambda epochs: epochs_dataset(
            files, IMAGE_SIZE, "none", epochs, rows_per_task=128, seed=seed, rank=rank,
            world=world, data_cpus=0.5), rows, last_epoch=3)

    streams = [stream(rank) for rank in range(world)]
    shares = {}
    for epoch in range(3):
        for rank, s in enumerate(streams):
            shares[epoch, rank] = np.concatenate(
                [b["index"].numpy() for b in iter_train_batches(s.blocks(epoch), 64)])
        a, b = shares[epoch, 0], shares[epoch, 1]
        assert len(np.intersect1d(a, b)) == 0
        np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(num_train))
        tasks = len(plan_epochs(files, IMAGE_SIZE, [epoch], rows_per_task=128, seed=seed))
        assert tasks > 1 and abs(len(a) - len(b)) <= tasks  # within a row per task
    assert not np.array_equal(np.sort(shares[0, 0]), np.sort(shares[1, 0]))
    for s in streams:
        s.close()
    resumed = stream(1)
    later = np.concatenate([b["index"].numpy() for b in iter_train_batches(resumed.blocks(2), 64)])
    np.testing.assert_array_equal(np.sort(later), np.sort(shares[2, 1]))
    resumed.close()
    with pytest.raises(ValueError, match="seed shared by all ranks"):
        plan_epochs(files, IMAGE_SIZE, [0], rank=0, world=2)


def test_task_pool_bounds_the_pipeline_below_the_cluster(digits_dir: Path, ray_local: None) -> None:
    """``data_cpus`` bounds a pipeline's concurrent tasks even where the cluster (2 CPUs)
    would run more: a budget of 0.5 CPU never runs two decode tasks at once; both training
    pipelines carry that pool."""
    import ray.data

    def _timed_block(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        start = time.monotonic()
        while time.monotonic() - start < 0.02:  # a short CPU-bound task
            pass
        return {"start": np.array([start]), "end": np.array([time.monotonic()])}

    configure_data_context(0.5)
    ds = ray.data.from_items([{"i": i} for i in range(40)], override_num_blocks=40)
    out = ds.map_batches(_timed_block, batch_size=None, compute=task_pool(0.5)).take_all()
    events = sorted([(r["start"], 1) for r in out] + [(r["end"], -1) for r in out])
    running = np.cumsum([step for _, step in events])
    assert len(out) == 40 and running.max() == 1
    assert task_pool(1.0).size == 2 and task_pool(2.0).size == 4 and task_pool(0.25).size == 1

    files = PreparedData(digits_dir).shard_files("train")
    for ds in (epochs_dataset(files, IMAGE_SIZE, "none", range(2), data_cpus=1.5),
               train_dataset(files, IMAGE_SIZE, "none", data_cpus=1.5)):
        assert ds._logical_plan.dag.compute.size == 3


@pytest.mark.integration
def test_epoch_stream_sorts_out_blocks_of_later_epochs(ray_local: None) -> None:
    """Blocks arrive in completion order: rows of a later epoch (alone or inside a mixed
    block) are kept for that epoch; an epoch ends after exactly its own rows."""
    import ray.data

    rows = [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]  # (epoch, i)
    items = [{"image": np.full((1, 2, 2), 10 * e + i, np.uint8), "index": i, "epoch": e}
             for e, i in rows]
    stream = EpochStream(lambda epochs: ray.data.from_items(items, override_num_blocks=4),
                         rows_per_epoch=3, last_epoch=3)
    for epoch in range(3):
        blocks = list(stream.blocks(epoch))
        index = np.concatenate([b["index"] for b in blocks])
        assert sorted(index.tolist()) == [0, 1, 2]
        image = np.concatenate([b["image"] for b in blocks])
        np.testing.assert_array_equal(image[:, 0, 0, 0], 10 * epoch + index)
    stream.close()

    short = EpochStream(lambda epochs: ray.data.from_items(items[:2]), 3, 1)
    with pytest.raises(RuntimeError, match="ended after 1 of 3 rows of epoch 0"):
        list(short.blocks(0))


def test_sample_repeats_follow_the_weights() -> None:
    weights = np.array([1.0, 2.0, 3.0, 0.0] * 250)
    repeats = sample_repeats(weights, seed=0)
    assert repeats.sum() == len(weights)
    assert repeats[3::4].sum() == 0
    share = np.array([repeats[i::4].sum() for i in range(3)]) / len(weights)
    np.testing.assert_allclose(share, [1 / 6, 2 / 6, 3 / 6], atol=0.04)
    np.testing.assert_array_equal(sample_repeats(weights, seed=0), repeats)  # deterministic
    with pytest.raises(ValueError, match="non-negative"):
        sample_repeats(np.array([1.0, -1.0]), seed=0)


def test_load_split_returns_val_in_order(digits_dir: Path) -> None:
    data = PreparedData(digits_dir)
    num_val = data.manifest["splits"]["val"]["num_images"]
    images, index = load_split(data.shard_files("val"), IMAGE_SIZE)
    assert images.dtype == torch.uint8
    assert images.shape == (num_val, 3, IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_array_equal(index.numpy(), np.arange(num_val))
    # grey PNGs decode to three equal channels holding the PNG's pixels
    torch.testing.assert_close(images[:, 0], images[:, 1])
    torch.testing.assert_close(images[:, 0], images[:, 2])
    first = pq.read_table(data.shard_files("val")[0], columns=["image"])
    for row, png in enumerate(first.column("image").to_pylist()[:8]):
        with Image.open(io.BytesIO(png)) as img:
            reference = torch.from_numpy(np.asarray(img.convert("L"), dtype=np.uint8))
        torch.testing.assert_close(images[row, 0], reference)


@pytest.mark.parametrize("mode", ["L", "RGB", "P"])
@pytest.mark.parametrize("side", [9, 24])
def test_pil_and_libpng_decode_the_same_pixels(mode: str, side: int) -> None:
    """``load_split`` decodes small splits with PIL, the streams with libpng: same pixels,
    resized (side 9 -> 24) or not, and both equal to the PIL ``convert("RGB")`` reference.
    Palette PNGs ("P") are not on the fast path: both decoders give them to PIL."""
    rng = np.random.default_rng(side)
    pngs = []
    for _ in range(6):
        pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    with_pil = Decoder(IMAGE_SIZE, libpng=False).decode(pngs)
    with_libpng = Decoder(IMAGE_SIZE, libpng=True).decode(pngs)
    np.testing.assert_array_equal(with_pil, with_libpng)
    reference = np.stack([Decoder(IMAGE_SIZE).decode_one(png) for png in pngs])
    np.testing.assert_array_equal(np.broadcast_to(with_pil, reference.shape), reference)
    assert with_pil.shape[1] == (1 if mode == "L" else 3)


def test_load_split_of_a_small_split_does_not_import_torchvision(digits_dir: Path) -> None:
    """The driver and trials decode DigitsMLT without torchvision (0.9 s of imports)."""
    files = PreparedData(digits_dir).shard_files("val")
    code = ("import sys; from tuner.data.stream import load_split; "
            f"images, _ = load_split({[str(f) for f in files]!r}, {IMAGE_SIZE}); "
            "print(tuple(images.shape), 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    num_val = PreparedData(digits_dir).manifest["splits"]["val"]["num_images"]
    assert out.stdout.split() == [f"({num_val},", "3,", f"{IMAGE_SIZE},", f"{IMAGE_SIZE})",
                                  "False"]


# ---------------------------------------------------------------- disjoint sources
def test_splits_use_disjoint_source_digits(digits_dir: Path) -> None:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    sources = read_json(digits_dir / "manifest.json")["build"]["sources"]
    pools = {}
    for split in SPLITS:
        _, labels = split_labels(digits_dir, split)
        assert len(sources[split]) == len(labels)
        for row, srcs in zip(labels, sources[split]):
            assert len(srcs) == row.sum()
            # each source digit shows one of the image's labels, one per class
            assert sorted(int(targets[s]) for s in srcs) == np.flatnonzero(row).tolist()
        pools[split] = {s for srcs in sources[split] for s in srcs}
    assert pools["train"].isdisjoint(pools["val"])
    assert pools["train"].isdisjoint(pools["test"])
    assert pools["val"].isdisjoint(pools["test"])


# ---------------------------------------------------------------- corruption refused
def flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_shard_is_refused_by_name(digits_dir: Path, tmp_path: Path) -> None:
    copy = copy_prepared(digits_dir, tmp_path)
    rel = read_json(copy / "manifest.json")["splits"]["train"]["shards"][1]
    flip_byte(copy / rel)
    data = PreparedData(copy)
    with pytest.raises(ChecksumError) as info:
        data.verify()
    assert str(copy / rel) in str(info.value)
    data.verify(splits=("val", "test"))  # the other splits are still fine


def test_verify_cli_reports_corruption_in_one_line(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_prepared(digits_dir, tmp_path)
    assert tuner.prepare.main(["--verify", str(copy)]) == 0
    capsys.readouterr()
    rel = read_json(copy / "manifest.json")["splits"]["train"]["shards"][0]
    flip_byte(copy / rel)
    assert tuner.prepare.main(["--verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert Path(rel).name in err


def test_foreign_schema_version_is_refused(digits_dir: Path, tmp_path: Path) -> None:
    copy = copy_prepared(digits_dir, tmp_path)
    manifest = read_json(copy / "manifest.json")
    manifest["schema_version"] = manifest["schema_version"] + 1000
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="schema"):
        PreparedData(copy)


def test_missing_manifest_says_how_to_prepare(digits_dir: Path, tmp_path: Path) -> None:
    copy = copy_prepared(digits_dir, tmp_path)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="tuner.prepare"):
        PreparedData(copy)


# ---------------------------------------------------------------- corruption generators
def test_candidate_view_adds_rho_of_negatives() -> None:
    rho = 0.3
    labels = coco_like_labels(np.random.default_rng(1))
    observed, info = make_view(labels, ViewSpec("candidate", rho, seed=3))
    assert observed.dtype == np.uint8 and observed.shape == labels.shape
    assert np.all(observed[labels == 1] == 1)  # every true positive kept
    negatives = int((labels == 0).sum())
    added = int(((observed == 1) & (labels == 0)).sum())
    std = np.sqrt(negatives * rho * (1 - rho))
    assert abs(added - rho * negatives) < 5 * std, (added, rho * negatives, std)
    assert info["kept_positive_share"] == 1.0
    assert info["labels_per_image"] == pytest.approx(observed.sum(1).mean())


def test_missing_view_keeps_one_minus_q_of_positives() -> None:
    q = 0.6
    labels = coco_like_labels(np.random.default_rng(2))
    observed, info = make_view(labels, ViewSpec("missing", q, seed=4))
    assert observed.dtype == np.uint8 and observed.shape == labels.shape
    assert np.all(observed <= labels)  # only true positives survive
    assert observed.sum(1).min() >= 1  # every image keeps at least one
    k = labels.sum(1).astype(np.int64)
    drop = info["drop_probability"]
    assert drop >= q  # the keep-one rule only adds back, so calibration drops more
    mean, var = keep_one_moments(k, drop)
    assert mean / k.sum() == pytest.approx(1 - q, abs=1e-6)  # calibrated in expectation
    kept = int(observed.sum())
    assert abs(kept - mean) < 5 * np.sqrt(var), (kept, mean, np.sqrt(var))
    assert info["kept_positive_share"] == pytest.approx(kept / k.sum())


def test_missing_view_never_empties_a_labelled_image() -> None:
    labels = coco_like_labels(np.random.default_rng(5), n=2000, c=20, k_range=(1, 2))
    labels[:50] = 0  # images without labels stay without labels
    observed, _ = make_view(labels, ViewSpec("missing", 0.3, seed=0))
    assert np.all(observed <= labels)
    np.testing.assert_array_equal(observed.sum(1) >= 1, labels.sum(1) >= 1)


@pytest.mark.parametrize("spec", [ViewSpec("missing", 0.6, 7), ViewSpec("candidate", 0.3, 7)])
def test_views_are_deterministic_per_seed(spec: ViewSpec) -> None:
    labels = coco_like_labels(np.random.default_rng(6), n=1000)
    first, _ = make_view(labels, spec)
    again, _ = make_view(labels, ViewSpec(spec.kind, spec.rate, spec.seed))
    np.testing.assert_array_equal(first, again)
    other, _ = make_view(labels, ViewSpec(spec.kind, spec.rate, spec.seed + 1))
    assert not np.array_equal(first, other)


def test_clean_view_is_a_copy() -> None:
    labels = coco_like_labels(np.random.default_rng(8), n=200)
    observed, info = make_view(labels, ViewSpec())
    np.testing.assert_array_equal(observed, labels)
    observed[:] = 0
    assert labels.sum() > 0
    assert info["kept_positive_share"] == 1.0


@pytest.mark.parametrize("q", [0.3, 0.6])
def test_uncalibrated_drop_uses_q_per_label(q: float) -> None:
    labels = coco_like_labels(np.random.default_rng(9), k_range=(1, 5))
    k = labels.sum(1).astype(np.int64)
    observed, drop = drop_positives(labels, q, np.random.default_rng(10), calibrate=False)
    assert drop == q
    assert np.all(observed <= labels) and observed.sum(1).min() >= 1
    expected = float((k * (1 - q) + q**k).sum())
    mean, var = keep_one_moments(k, q)
    assert mean == pytest.approx(expected)
    kept = int(observed.sum())
    assert abs(kept - expected) < 5 * np.sqrt(var), (kept, expected, np.sqrt(var))
    # the keep-one rule makes the literal q keep more than 1 - q
    assert expected / k.sum() > 1 - q


@pytest.mark.parametrize("k_range", [(1, 1), (1, 2)])
def test_unreachable_missing_rate_warns_and_keeps_one_label(k_range: tuple[int, int]) -> None:
    labels = coco_like_labels(np.random.default_rng(11), n=500, c=12, k_range=k_range)
    with pytest.warns(UserWarning, match="unreachable"):
        observed, info = make_view(labels, ViewSpec("missing", 0.9, seed=0))
    assert info["drop_probability"] == 1.0
    assert np.all(observed <= labels)
    np.testing.assert_array_equal(observed.sum(1), np.ones(len(labels)))


def test_reachable_missing_rate_does_not_warn() -> None:
    labels = coco_like_labels(np.random.default_rng(12), n=500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_view(labels, ViewSpec("missing", 0.6, seed=0))


@pytest.mark.parametrize(
    ("kind", "rate"),
    [
        ("noisy", 0.2),
        ("missing", -0.1),
        ("missing", 1.0),
        ("candidate", 1.5),
        ("candidate", float("nan")),
        ("clean", 0.3),
    ],
)
def test_viewspec_rejects_bad_values(kind: str, rate: float) -> None:
    with pytest.raises(ConfigError):
        ViewSpec(kind, rate, 0)


def test_view_names_are_distinct() -> None:
    specs = [
        ViewSpec(),
        ViewSpec("missing", 0.6, 0),
        ViewSpec("missing", 0.6, 1),
        ViewSpec("missing", 0.5, 0),
        ViewSpec("candidate", 0.6, 0),
    ]
    assert len({s.name for s in specs}) == len(specs)


# ---------------------------------------------------------------- cached views
def test_view_is_written_once_and_recorded(digits_dir: Path, tmp_path: Path) -> None:
    copy = copy_prepared(digits_dir, tmp_path)
    # q = 0.4: DigitsMLT has few labels per image, so q = 0.6 is past the keep-one floor
    spec = ViewSpec("missing", 0.4, 0)
    data = PreparedData(copy)
    stale = PreparedData(copy)  # another reader (e.g. a concurrent trial) opened before the write
    entry = data.ensure_view(spec)
    path = copy / entry["file"]
    assert path.is_file()
    sentinel = 1_000_000_000_123_456_789
    os.utime(path, ns=(sentinel, sentinel))
    assert data.ensure_view(spec) == entry
    assert PreparedData(copy).ensure_view(spec) == entry  # a fresh reader finds it on disk
    assert stale.ensure_view(spec) == entry  # a stale reader re-reads the manifest under the lock
    assert path.stat().st_mtime_ns == sentinel  # no call rewrote the file

    manifest = read_json(copy / "manifest.json")
    recorded = manifest["views"][spec.name]
    assert manifest["checksums"][entry["file"]] == hashlib.sha256(path.read_bytes()).hexdigest()
    _, true = split_labels(copy, "train")
    observed = data.view_labels(spec)
    np.testing.assert_array_equal(observed, data.view_labels(spec))
    np.testing.assert_array_equal(observed, PreparedData(copy).view_labels(spec))
    assert observed.shape == true.shape
    assert np.all(observed <= true) and observed.sum(1).min() >= 1
    assert recorded["class_counts"] == observed.sum(0).tolist()
    share = (observed.astype(np.int64) & true).sum() / true.sum()
    assert recorded["kept_positive_share"] == pytest.approx(share)
    mean, var = keep_one_moments(true.sum(1), recorded["drop_probability"])
    assert mean / true.sum() == pytest.approx(1 - spec.rate, abs=1e-6)
    assert abs(observed.sum() - mean) < 5 * np.sqrt(var)
    assert data.class_counts(spec) == recorded["class_counts"]
    PreparedData(copy).verify()  # the view's checksum is checked too


def test_clean_view_reads_true_labels_without_a_file(digits_dir: Path) -> None:
    data = PreparedData(digits_dir)
    _, true = split_labels(digits_dir, "train")
    np.testing.assert_array_equal(data.view_labels(ViewSpec()), true)
    assert data.class_counts(ViewSpec()) == true.sum(0).tolist()


# ---------------------------------------------------------------- build determinism
def image_column(data_dir: Path, rel: str) -> list[bytes]:
    return pq.read_table(data_dir / rel, columns=["image"]).column("image").to_pylist()


def test_build_is_deterministic_per_seed(digits_dir: Path, tmp_path: Path) -> None:
    same = tmp_path / "same"
    other = tmp_path / "other"
    prepare_digits(same, seed=0, progress=False)
    prepare_digits(other, seed=1, progress=False)
    base_labels = pq.read_table(digits_dir / "labels" / "true.parquet")
    assert pq.read_table(same / "labels" / "true.parquet").equals(base_labels)
    assert not pq.read_table(other / "labels" / "true.parquet").equals(base_labels)
    base = read_json(digits_dir / "manifest.json")
    rel = base["splits"]["train"]["shards"][0]
    assert read_json(same / "manifest.json")["splits"]["train"]["shards"][0] == rel
    assert image_column(same, rel) == image_column(digits_dir, rel)
    assert image_column(other, rel) != image_column(digits_dir, rel)


def test_quiet_ray_console_hides_routine_ray_data_lines(ray_local: None) -> None:
    """A console handler of Ray Data's logger (here one over a buffer, beside Ray's own)
    shows "Starting execution" before quiet_ray_console and not after; warnings stay."""
    import io
    import logging

    import ray.data
    from ray.util.debug import log_once

    from tuner.monitoring import quiet_ray_console

    logger = logging.getLogger("ray.data")
    buffer = io.StringIO()
    console = logging.StreamHandler(buffer)
    console.setLevel(logging.INFO)
    saved = [(h, h.level) for h in logger.handlers]
    logger.addHandler(console)
    try:
        ray.data.range(8).materialize()
        assert "Starting execution" in buffer.getvalue()  # the check can see the line
        buffer.seek(0)
        buffer.truncate()
        quiet_ray_console()
        ray.data.range(8).materialize()
        assert "Starting execution" not in buffer.getvalue()
        logger.warning("still shown")
        assert "still shown" in buffer.getvalue()
        assert not log_once("ray_data_progress_manager_disabled")  # notice counts as shown
    finally:
        logger.removeHandler(console)
        for handler, level in saved:
            handler.setLevel(level)


def test_sample_repeats_draws_a_given_epoch_length() -> None:
    weights = np.array([1.0, 3.0, 0.0])
    repeats = sample_repeats(weights, seed=1, draws=4000)
    assert repeats.sum() == 4000 and repeats[2] == 0
    assert repeats[1] / 4000 == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError, match="at least one draw"):
        sample_repeats(weights, seed=1, draws=0)


def _blocks(n: int, per_block: int) -> list[dict[str, np.ndarray]]:
    """Decoded-looking blocks whose every pixel holds the image index (to check pairing)."""
    out = []
    for start in range(0, n, per_block):
        index = np.arange(start, min(n, start + per_block), dtype=np.int64)
        image = np.broadcast_to(index[:, None, None, None] % 251, (len(index), 3, 2, 2))
        out.append({"image": np.ascontiguousarray(image, dtype=np.uint8), "index": index})
    return out


@pytest.mark.parametrize("shuffle_buffer", [0, 16])
def test_batches_carry_dataset_level_views(shuffle_buffer: int) -> None:
    """Each view yields exactly its drawn multiset over the epoch, B rows per batch beside the
    main rows, with images paired to their indices, and draws images the batch lacks."""
    n, b = 90, 8
    head = np.zeros(n, dtype=np.int64)
    head[[3, 77]] = [45, 45]  # a dataset-level sampler: only two images, from two blocks
    tail = sample_repeats(np.linspace(1.0, 2.0, n), seed=4)
    main_rows, counts = [], {"head": np.zeros(n, int), "tail": np.zeros(n, int)}
    missing_from_batch = 0
    for batch in iter_train_batches(_blocks(n, 30), b, shuffle_buffer=shuffle_buffer,
                                    views={"head": head, "tail": tail}):
        main = batch["index"].numpy()
        main_rows.append(main)
        for v in ("head", "tail"):
            idx = batch[f"{v}_index"].numpy()
            assert len(idx) == len(main)  # equal totals on one worker: equal batch sizes
            np.testing.assert_array_equal(batch[f"{v}_image"][:, 0, 0, 0].numpy(), idx % 251)
            np.add.at(counts[v], idx, 1)
            missing_from_batch += int(np.isin(idx, main, invert=True).sum())
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0].numpy(), main % 251)
    np.testing.assert_array_equal(np.sort(np.concatenate(main_rows)), np.arange(n))
    np.testing.assert_array_equal(counts["head"], head)
    np.testing.assert_array_equal(counts["tail"], tail)
    assert missing_from_batch > 0


def test_views_shorter_than_the_epoch_give_what_they_have() -> None:
    n = 20
    short = np.zeros(n, dtype=np.int64)
    short[5] = 3  # 3 view rows for a 20-row epoch (one worker's shard)
    sizes = [len(bt["v_index"]) for bt in iter_train_batches(
        _blocks(n, 10), 8, shuffle_buffer=0, views={"v": short})]
    assert sum(sizes) == 3 and sizes[-1] == 0


def test_unobserved_positive_share_counts_missing_positives_among_unobserved() -> None:
    """Worked by hand: class 0 in 3 of 4 images, one of them unobserved, next to the one image
    without it (1 of 2 unobserved entries is a missing positive); class 1 in 1 image, observed
    (0 of 3); class 2 in 2 images, both unobserved (2 of 4)."""
    labels = np.array([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]])
    observed = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    share = unobserved_positive_share(labels, observed)
    assert share["all"] == pytest.approx(3 / 9)  # 1 + 0 + 2 missing of 2 + 3 + 4 unobserved
    assert share["median_class"] == pytest.approx(1 / 2)  # of 1/2, 0/3, 2/4
    assert share["head_class"] == pytest.approx(1 / 2) and share["head_prevalence"] == 0.75
    with pytest.raises(ValueError, match="subset"):
        unobserved_positive_share(labels, 1 - labels)


def test_prepare_builds_a_sparser_digits_variant_with_head_share(
    digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--head-share``: the same class counts over more training images (fewer labels each),
    recorded in the manifest; a bad value or another benchmark is one line naming the flag."""
    out = tmp_path / "sparse"
    assert tuner.prepare.main(["--benchmark", "digits-mlt", "--out", str(out),
                               "--head-share", "0.35", "--no-progress"]) == 0
    sparse, default = PreparedData(out).manifest, PreparedData(digits_dir).manifest
    assert sparse["build"]["head_share"] == 0.35 and default["build"]["head_share"] == 0.7
    assert sparse["class_counts"]["train"] == default["class_counts"]["train"]
    n_sparse = sparse["splits"]["train"]["num_images"]
    n_default = default["splits"]["train"]["num_images"]
    head = max(sparse["class_counts"]["train"])
    assert n_sparse == pytest.approx(head / 0.35, abs=1) and n_default == pytest.approx(head / 0.7, abs=1)
    per_image = sparse["splits"]["train"]["labels_per_image"]
    assert per_image == pytest.approx(sum(sparse["class_counts"]["train"]) / n_sparse)
    assert per_image < default["splits"]["train"]["labels_per_image"] / 1.9
    capsys.readouterr()
    for argv, words in ((["--head-share", "0"], "head_share must be in (0, 1], got 0.0"),
                        (["--benchmark", "coco-mlt", "--head-share", "0.5"], "digits-mlt only")):
        full = ["--benchmark", "digits-mlt", "--out", str(tmp_path / "bad"), *argv]
        assert tuner.prepare.main(full) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1
