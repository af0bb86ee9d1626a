"""Real-benchmark preparation: list / COCO / VOC importers, validation split, robustness, facts.

Fixture datasets (generated JPEGs in the test's temp dir) are prepared through the CLI
(``tuner.prepare.main``) and read back with :class:`tuner.data.PreparedData`; expected counts
and labels come from the fixture's own definition, never from the code under test. The facts
test reads the real split files in ``../shared/benchmarks`` (or ``$MLT_TUNER_BENCHMARK_FILES``)
and skips with a reason when they are absent.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
from PIL import Image

import tuner.prepare
from tuner.data import PreparedData, ViewSpec
from tuner.data.benchmarks import COCO2014_VIEWS, SPLITS_DIR, read_class_split, read_partial_labels
from tuner.data.importers import VOC_CLASSES, read_class_names, read_comma_list, read_space_list
from tuner.data.manifest import SCHEMA_VERSION
from tuner.data.resize import ResizeSpec, encode_chunks, plan_chunks
from tuner.data.safe_pickle import load_npy, load_pickle, loads
from tuner.data.stratify import stratified_holdout
from tuner.data.stream import load_split
from tuner.errors import ConfigError, DataError

SIZE = 32  # stored image side of the fixtures
#: stratified_holdout(random_labels(40, 4, 5, density=0.3), 0.5, seed=0), iterative-stratification 0.1.9
PINNED_HELD = [0, 4, 5, 6, 9, 10, 13, 14, 24, 25, 26, 27, 28, 29, 32, 33, 34, 36, 38, 39]
COMMON = ["--image-size", str(SIZE), "--workers", "1", "--no-progress", "--rows-per-shard", "8"]


def make_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "JPEG")


def random_labels(n: int, c: int, seed: int, density: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < density).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, c, n)] = 1  # every image labelled
    return labels


def prepare(*args: str) -> int:
    return tuner.prepare.main([*args, *COMMON])


def split_table(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """``{split: {image_id: labels}}`` read straight from labels/true.parquet."""
    table = pq.read_table(out / "labels" / "true.parquet").to_pylist()
    result: dict[str, dict[str, np.ndarray]] = {}
    for row in table:
        result.setdefault(row["split"], {})[row["image_id"]] = np.asarray(row["labels"])
    return result


def write_list(path: Path, rels: list[str], labels: np.ndarray, sep: str = " ") -> None:
    lines = [rel + sep + " ".join(str(c) for c in np.flatnonzero(row)) + " " for rel, row in zip(rels, labels)]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- DBL / LMPT list format


@pytest.fixture()
def dbl_fixture(tmp_path: Path) -> dict[str, Any]:
    """A 6-class COCO-MLT-style release: lists, names, class_split.pkl, captions + images."""
    c, n_train, n_test = 6, 30, 24
    train = random_labels(n_train, c, 1)
    test = random_labels(n_test, c, 2)
    train_rels = [f"train2017/{i:012d}.jpg" for i in range(100, 100 + n_train)]
    test_rels = [f"val2017/{i:012d}.jpg" for i in range(500, 500 + n_test)]
    images = tmp_path / "coco"
    for k, rel in enumerate(train_rels + test_rels):
        make_jpeg(images / rel, k)
    release = tmp_path / "release"
    release.mkdir()
    write_list(release / "coco_lt_train.txt", train_rels, train)
    write_list(release / "coco_lt_test.txt", test_rels, test)
    (release / "coco_labels.txt").write_text("\r\n".join(f"class {k} {k}" for k in range(c)))
    groups = {"head": {np.int64(0), np.int64(1)}, "middle": {np.int64(2), np.int64(3)},
              "tail": {np.int64(4), np.int64(5)}}
    (release / "class_split.pkl").write_bytes(pickle.dumps(groups, protocol=2))
    (release / "coco_lt_captions.txt").write_text(
        "\n".join(f"{rel} caption of {k}" for k, rel in enumerate(train_rels)) + "\n")
    return {"images": images, "release": release, "train": dict(zip(train_rels, train)),
            "test": dict(zip(test_rels, test)), "groups": groups}


def test_dbl_lists_prepare_with_counts_labels_groups_and_val(dbl_fixture: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert prepare("--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
                   "--split-files", str(dbl_fixture["release"]), "--out", str(out), "--captions") == 0
    data = PreparedData(out)
    data.verify()
    table = split_table(out)
    assert set(table["train"]) == set(dbl_fixture["train"])
    for image_id, labels in table["train"].items():
        np.testing.assert_array_equal(labels, dbl_fixture["train"][image_id])
    # validation: a disjoint half of the test list; together they are the whole test list
    assert set(table["val"]).isdisjoint(table["test"])
    assert set(table["val"]) | set(table["test"]) == set(dbl_fixture["test"])
    ids, labels = list(dbl_fixture["test"]), np.array(list(dbl_fixture["test"].values()))
    held = stratified_holdout(labels, 0.5, seed=0)  # the list's rows in file order
    assert set(table["val"]) == {i for i, h in zip(ids, held) if h}
    assert abs(len(table["val"]) - len(ids) / 2) <= 2
    for image_id, labels in {**table["val"], **table["test"]}.items():
        np.testing.assert_array_equal(labels, dbl_fixture["test"][image_id])
    expected_groups = {"head": [0, 1], "medium": [2, 3], "tail": [4, 5]}
    assert data.groups() == expected_groups
    assert data.manifest["build"]["validation"]["source"] == "test"
    assert data.manifest["class_names"] == [f"class {k}" for k in range(6)]
    captions = pq.read_table(out / data.manifest["captions"]).to_pylist()
    assert {r["image_id"]: r["caption"] for r in captions}["train2017/000000000100.jpg"] == "caption of 0"
    # the shards decode to the stored size through the training stream's decoder
    images, index = load_split(data.shard_files("val"), SIZE)
    assert images.shape == (len(table["val"]), 3, SIZE, SIZE)
    assert sorted(index.tolist()) == list(range(len(table["val"])))


def test_a_directory_of_the_former_schema_is_refused_and_replaced_with_overwrite(
    dbl_fixture: dict, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = ["--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
            "--split-files", str(dbl_fixture["release"]), "--out", str(out)]
    assert prepare(*args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "iterative-stratification" in manifest["build"]["validation"]["method"]
    manifest["schema_version"] = SCHEMA_VERSION - 1  # a directory of the hand-written stratifier
    del manifest["manifest_sha256"]  # schema 1 had no checksum of its own
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"schema_version=1, this tuner reads 2 \(validation "
                                        r"splits now come from the iterative-stratification"):
        PreparedData(out)
    capsys.readouterr()
    assert prepare(*args) == 2  # not silently re-used, not silently replaced
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --overwrite" in err
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION - 1
    assert prepare(*args, "--overwrite") == 0
    assert PreparedData(out).manifest["schema_version"] == SCHEMA_VERSION


def test_rerun_is_up_to_date_and_val_from_train(dbl_fixture: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
            "--split-files", str(dbl_fixture["release"]), "--out", str(out)]
    assert prepare(*args, "--val-from-train", "0.2") == 0
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(*args, "--val-from-train", "0.2") == 0  # same request: nothing rewritten
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    table = split_table(out)
    assert set(table["test"]) == set(dbl_fixture["test"])
    assert set(table["val"]) | set(table["train"]) == set(dbl_fixture["train"])
    assert abs(len(table["val"]) - 0.2 * len(dbl_fixture["train"])) <= 2
    assert prepare(*args) == 2  # a different request into a full directory needs --overwrite
    assert prepare(*args, "--overwrite") == 0
    assert PreparedData(out).manifest["build"]["validation"]["source"] == "test"
    # issue 20: --overwrite never deletes a file the platform did not write; refused before
    # any encoding, the benchmark and the user's file are left as they were
    (out / "labels" / "my-split.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert prepare(*args, "--val-from-train", "0.2", "--overwrite") == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (tmp_path / ".out.parts").exists() and not (tmp_path / ".out.staging").exists()


# ---------------------------------------------------------------- COCO format


def coco_json(path: Path, files: list[str], labels: np.ndarray, cat_ids: list[int]) -> None:
    images = [{"id": 1000 + i, "file_name": f, "height": 30, "width": 40} for i, f in enumerate(files)]
    anns = [{"id": i * 100 + int(c), "image_id": 1000 + i, "category_id": cat_ids[c],
             "bbox": [0, 0, 1, 1], "iscrowd": 0}
            for i in range(len(files)) for c in np.flatnonzero(labels[i])]
    cats = [{"id": cid, "name": f"cat{cid}", "supercategory": "x"} for cid in reversed(cat_ids)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_format_import_with_missing_view(tmp_path: Path) -> None:
    cat_ids = [1, 3, 7, 90]  # sparse COCO ids -> columns in id order
    train = random_labels(20, 4, 3)
    test = random_labels(16, 4, 4)
    test[0] = 0  # an image without annotations is left out
    root = tmp_path / "imgs"
    train_files = [f"tr/{i}.jpg" for i in range(20)]
    test_files = [f"te/{i}.jpg" for i in range(16)]
    for k, f in enumerate(train_files + test_files):
        make_jpeg(root / f, 100 + k)
    coco_json(tmp_path / "train.json", train_files, train, cat_ids)
    coco_json(tmp_path / "test.json", test_files, test, cat_ids)
    out = tmp_path / "out"
    assert prepare("--benchmark", "coco", "--images", str(root), "--annotations",
                   str(tmp_path / "train.json"), "--test-annotations", str(tmp_path / "test.json"),
                   "--out", str(out), "--view", "missing:0.5") == 0
    data = PreparedData(out)
    assert data.class_names == ["cat1", "cat3", "cat7", "cat90"]
    table = split_table(out)
    for k, f in enumerate(train_files):
        np.testing.assert_array_equal(table["train"][f], train[k])
    assert "te/0.jpg" not in {**table["val"], **table["test"]}
    assert len(table["val"]) + len(table["test"]) == 15
    observed = data.view_labels(ViewSpec("missing", 0.5, 0))
    ids, true = data.true_labels("train")
    assert ((observed == 1) <= (true == 1)).all() and (observed.sum(1) >= 1).all()


# ---------------------------------------------------------------- VOC format


def voc_folder(root: Path, sets: dict[str, dict[str, list[tuple[str, bool]]]]) -> None:
    """VOC year folder: ``sets[name][image_id] = [(class, difficult), ...]``."""
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for k, (name, images) in enumerate(sets.items()):
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(images) + "\n")
        for j, (image_id, objects) in enumerate(images.items()):
            make_jpeg(root / "JPEGImages" / f"{image_id}.jpg", 1000 * k + j)
            objs = "".join(f"<object><name>{c}</name><difficult>{int(d)}</difficult></object>"
                           for c, d in objects)
            (root / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename>{objs}</annotation>")


def voc_sets(n_train: int, n_test: int, seed: int) -> dict[str, dict[str, list[tuple[str, bool]]]]:
    rng = np.random.default_rng(seed)
    sets: dict[str, dict[str, list[tuple[str, bool]]]] = {}
    for name, n, start in (("trainval", n_train, 0), ("test", n_test, 5000)):
        sets[name] = {}
        for i in range(n):
            classes = rng.choice(20, size=int(rng.integers(1, 4)), replace=False)
            sets[name][f"{start + i:06d}"] = [(VOC_CLASSES[c], bool(rng.random() < 0.2)) for c in classes]
    return sets


def expected_voc(objects: list[tuple[str, bool]], difficult: bool) -> np.ndarray:
    row = np.zeros(20, dtype=np.uint8)
    for name, is_difficult in objects:
        if difficult or not is_difficult:
            row[VOC_CLASSES.index(name)] = 1
    return row


@pytest.mark.parametrize("difficult", ["positive", "negative"])
def test_voc_format_import(tmp_path: Path, difficult: str) -> None:
    sets = voc_sets(24, 20, 5)
    voc_folder(tmp_path / "VOC2007", sets)
    out = tmp_path / "out"
    assert prepare("--benchmark", "voc", "--images", str(tmp_path / "VOC2007"), "--out", str(out),
                   "--voc-difficult", difficult, "--view", "candidate:0.2") == 0
    table = split_table(out)
    for image_id, objects in sets["trainval"].items():
        np.testing.assert_array_equal(table["train"][image_id], expected_voc(objects, difficult == "positive"))
    assert set(table["val"]) | set(table["test"]) == set(sets["test"])
    data = PreparedData(out)
    assert data.manifest["views"]["candidate-rho0.2-s0"]["labels_per_image"] > 0


def test_voc_difficult_ignore_state_is_carried_to_evaluation(tmp_path: Path) -> None:
    """``--voc-difficult ignore``: difficult-only classes are negatives in training, and in the
    ignore state (excluded from AP) in val/test; an image with a non-difficult object of the
    class keeps it as a plain positive."""
    sets = voc_sets(24, 20, 5)
    first = next(iter(sets["test"]))
    sets["test"][first] = [("cat", True), ("dog", True), ("dog", False)]
    voc_folder(tmp_path / "VOC2007", sets)
    out = tmp_path / "out"
    assert prepare("--benchmark", "voc", "--images", str(tmp_path / "VOC2007"), "--out", str(out),
                   "--voc-difficult", "ignore", "--view", "clean") == 0
    table = split_table(out)
    for image_id, objects in sets["trainval"].items():
        np.testing.assert_array_equal(table["train"][image_id], expected_voc(objects, False))
    data = PreparedData(out)
    data.verify()
    assert data.manifest["ignore"]["file"] == "labels/ignore.parquet"
    for split in ("val", "test"):
        ids, labels = data.true_labels(split)
        mask = data.ignore_mask(split)
        for i, image_id in enumerate(ids):
            objects = sets["test"][image_id]
            plain = expected_voc(objects, False)
            hard = expected_voc(objects, True) & (1 - plain)
            np.testing.assert_array_equal(labels[i], plain)
            np.testing.assert_array_equal(mask[i], hard.astype(bool))
        if first in ids:
            row = mask[ids.index(first)]
            assert row[VOC_CLASSES.index("cat")] and not row[VOC_CLASSES.index("dog")]
    assert sum(int(data.ignore_mask(s).sum()) for s in ("val", "test")) == sum(
        data.manifest["ignore"]["entries"].values()) > 0
    plain = tmp_path / "plain"
    assert prepare("--benchmark", "voc", "--images", str(tmp_path / "VOC2007"), "--out",
                   str(plain), "--view", "clean") == 0
    assert PreparedData(plain).ignore_mask("test") is None


def test_voc2007_partial_reads_cones_npy_through_restricted_loader(tmp_path: Path) -> None:
    sets = voc_sets(16, 12, 6)
    voc_folder(tmp_path / "VOC2007", sets)
    true = np.stack([expected_voc(o, True) for o in sets["trainval"].values()])
    release = tmp_path / "release"
    release.mkdir()
    rng = np.random.default_rng(7)
    candidates = {}
    for rho in (0.1, 0.2, 0.4):
        cand = (true | (rng.random(true.shape) < rho)).astype(np.int32)
        candidates[rho] = cand
        np.save(release / f"voc07_{rho}.npy", np.array({"partial_labels": cand}, dtype=object),
                allow_pickle=True)
    out = tmp_path / "out"
    assert prepare("--benchmark", "voc2007-partial", "--images", str(tmp_path / "VOC2007"),
                   "--split-files", str(release), "--out", str(out)) == 0
    data = PreparedData(out)
    ids, _ = data.true_labels("train")
    row = {image_id: k for k, image_id in enumerate(sets["trainval"])}
    for rho, cand in candidates.items():
        observed = data.view_labels(ViewSpec("candidate", rho, 0))
        np.testing.assert_array_equal(observed, cand[[row[i] for i in ids]])
        assert data.manifest["views"][ViewSpec("candidate", rho, 0).name]["true_positives_not_observed"] == 0


# ---------------------------------------------------------------- Hill / SPLC list format


def test_coco2014_missing_official_views(tmp_path: Path) -> None:
    names = read_class_names(SPLITS_DIR / "coco_mlt" / "coco_labels.txt")
    full = random_labels(24, 80, 8, density=0.05)
    rng = np.random.default_rng(9)
    files = [f"COCO_train2014_{i:012d}.jpg" for i in range(24)]
    release = tmp_path / "release"
    release.mkdir()
    write_list(release / "coco_train_full.txt", files, full, sep=",")
    variants = {}
    for variant in COCO2014_VIEWS:
        part = full.copy()
        for i in range(len(part)):
            pos = np.flatnonzero(part[i])
            keep = rng.choice(pos) if variant == "singlelabel" else None
            part[i, [p for p in pos if (p != keep if keep is not None else rng.random() < 0.5)]] = 0
            if part[i].sum() == 0:
                part[i, pos[0]] = 1
        variants[variant] = part
        write_list(release / f"coco_train_{variant}.txt", files, part, sep=",")
    root = tmp_path / "coco"
    for k, f in enumerate(files):
        make_jpeg(root / "train2014" / f, k)
    val_files = [f"COCO_val2014_{i:012d}.jpg" for i in range(12)]
    for k, f in enumerate(val_files):
        make_jpeg(root / "val2014" / f, 50 + k)
    (root / "annotations").mkdir()
    coco_json(root / "annotations" / "instances_val2014.json", val_files,
              random_labels(12, 80, 10, density=0.05), list(range(1, 81)))
    data_json = json.loads((root / "annotations" / "instances_val2014.json").read_text())
    for cat in data_json["categories"]:
        cat["name"] = names[cat["id"] - 1]
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data_json))
    out = tmp_path / "out"
    assert prepare("--benchmark", "coco2014-missing", "--images", str(root),
                   "--split-files", str(release), "--out", str(out)) == 0
    data = PreparedData(out)
    ids, true = data.true_labels("train")
    row = {f: k for k, f in enumerate(files)}
    np.testing.assert_array_equal(true, full[[row[i] for i in ids]])
    for variant, rate in COCO2014_VIEWS.items():
        observed = data.view_labels(ViewSpec("missing", rate, 0))
        np.testing.assert_array_equal(observed, variants[variant][[row[i] for i in ids]])
    assert (data.view_labels(ViewSpec("missing", 0.66, 0)).sum(1) == 1).all()
    assert abs(len(split_table(out)["val"]) - 6) <= 1  # about half of the 12 val2014 images


# ---------------------------------------------------------------- bad input


def test_missing_images_are_counted_and_named(dbl_fixture: dict, tmp_path: Path, capsys) -> None:
    for rel in list(dbl_fixture["train"])[:4]:
        (dbl_fixture["images"] / rel).unlink()
    args = ["--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
            "--split-files", str(dbl_fixture["release"]), "--out", str(tmp_path / "out")]
    assert prepare(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "4 of 30 images missing" in err and "000000000100.jpg" in err
    assert prepare(*args, "--skip-missing") == 0
    assert PreparedData(tmp_path / "out").manifest["splits"]["train"]["num_images"] == 26


def test_truncated_jpeg_is_skipped_or_fails_with_strict(dbl_fixture: dict, tmp_path: Path, capsys) -> None:
    bad = dbl_fixture["images"] / list(dbl_fixture["test"])[3]
    bad.write_bytes(bad.read_bytes()[:200])
    args = ["--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
            "--split-files", str(dbl_fixture["release"])]
    assert prepare(*args, "--out", str(tmp_path / "strict"), "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 images could not be decoded" in err
    assert prepare(*args, "--out", str(tmp_path / "skip")) == 0
    data = PreparedData(tmp_path / "skip")
    assert data.manifest["build"]["failed_images"] == 1
    table = split_table(tmp_path / "skip")
    assert len(table["val"]) + len(table["test"]) == len(dbl_fixture["test"]) - 1


def test_out_of_range_class_id_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("a.jpg 0 1\nb.jpg 2 7\n")
    with pytest.raises(DataError, match=r"list.txt:2: class id 7 out of range 0..5"):
        read_space_list(path, 6)
    path.write_text("a.jpg,0 1\nb.jpg, 6\n")
    with pytest.raises(DataError, match=r"list.txt:2: class id 6 out of range 0..5"):
        read_comma_list(path, 6)


def test_class_name_file_must_match_class_count(dbl_fixture: dict, tmp_path: Path, capsys) -> None:
    names = dbl_fixture["release"] / "coco_labels.txt"
    names.write_text("\n".join(f"class {k} {k}" for k in range(5)))
    assert prepare("--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
                   "--split-files", str(dbl_fixture["release"]), "--out", str(tmp_path / "o")) == 2
    assert "names 5 classes but the split has 6" in capsys.readouterr().err


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"head": _RunsCode(str(marker))})
    assert b"system" in evil
    with pytest.raises(DataError, match="refused"):
        loads(evil, "evil.pkl")
    (tmp_path / "class_split.pkl").write_bytes(evil)
    with pytest.raises(DataError, match="class_split.pkl.*refused"):
        load_pickle(tmp_path / "class_split.pkl")
    np.save(tmp_path / "evil.npy", np.array({"partial_labels": _RunsCode(str(marker))}, dtype=object),
            allow_pickle=True)
    with pytest.raises(DataError, match="evil.npy.*refused"):
        load_npy(tmp_path / "evil.npy")
    assert not marker.exists()
    # plain containers and arrays still load
    ok = {"a": {np.int64(1), 2}, "b": np.arange(6).reshape(2, 3), "c": [1.5, "x", (b"y",)]}
    back = loads(pickle.dumps(ok, protocol=2))
    assert back["a"] == {1, 2} and back["c"] == [1.5, "x", (b"y",)]
    np.testing.assert_array_equal(back["b"], ok["b"])


# ---------------------------------------------------------------- resume and atomicity


def test_encoding_resumes_from_finished_parts(tmp_path: Path) -> None:
    files = []
    for k in range(12):
        files.append(tmp_path / "img" / f"{k}.jpg")
        make_jpeg(files[-1], k)
    ids = [f"{k}" for k in range(12)]
    parts = tmp_path / "parts"
    parts.mkdir()
    spec = ResizeSpec(SIZE, 90)
    chunks = plan_chunks(parts, "train", ids, files, spec, chunk_size=4)
    (parts / (chunks[2].path.name + ".tmp123")).write_bytes(b"half a part")  # interrupted write
    assert encode_chunks(chunks[:1], spec, workers=1, progress=False) == 4
    assert encode_chunks(chunks, spec, workers=2, progress=False) == 8  # chunk 0 not redone
    assert encode_chunks(chunks, spec, workers=1, progress=False) == 0
    make_jpeg(files[5], 99)  # a changed image invalidates its chunk only
    changed = plan_chunks(parts, "train", ids, files, spec, chunk_size=4)
    assert [c.path == d.path for c, d in zip(chunks, changed)] == [True, False, True]


def test_stale_staging_directory_is_replaced(dbl_fixture: dict, tmp_path: Path) -> None:
    staging = tmp_path / ".out.staging"
    (staging / "images").mkdir(parents=True)
    (staging / "images" / "train-00000.parquet").write_bytes(b"half-written")
    out = tmp_path / "out"
    assert prepare("--benchmark", "coco-mlt", "--images", str(dbl_fixture["images"]),
                   "--split-files", str(dbl_fixture["release"]), "--out", str(out)) == 0
    PreparedData(out).verify()
    assert not staging.exists() and not (tmp_path / ".out.parts").exists()


# ---------------------------------------------------------------- stratification


def test_stratification_one_hot_is_exact_per_class() -> None:
    rng = np.random.default_rng(0)
    labels = np.eye(5, dtype=np.uint8)[rng.integers(0, 5, 101)]
    held = stratified_holdout(labels, 0.5, seed=3)
    for c in range(5):
        n = labels[:, c].sum()
        assert labels[held, c].sum() in (n // 2, (n + 1) // 2)
    assert held.sum() in (50, 51)


def test_stratification_is_the_package_split_deterministic_per_seed() -> None:
    labels = random_labels(400, 12, 11, density=0.1)
    labels[:, 11] = 0
    labels[:7, 11] = 1  # a tail class with 7 images
    held = stratified_holdout(labels, 0.5, seed=1)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=0.5, random_state=1)
    _, test_rows = next(splitter.split(np.zeros((400, 1)), labels))
    np.testing.assert_array_equal(np.flatnonzero(held), np.sort(test_rows))
    np.testing.assert_array_equal(held, stratified_holdout(labels, 0.5, seed=1))
    assert not np.array_equal(held, stratified_holdout(labels, 0.5, seed=2))

    def deviation(mask: np.ndarray) -> float:
        return float(np.abs(labels[mask].sum(0) - labels.sum(0) / 2).max())

    strat = deviation(held)
    rng = np.random.default_rng(0)
    randoms = [deviation(rng.permutation(400) < 200) for _ in range(200)]
    assert strat <= 2.0 and strat < np.quantile(randoms, 0.05)
    assert labels[held, 11].sum() in (3, 4)
    assert abs(held.sum() - 200) <= 10  # the package favours class shares over the exact size


def test_stratification_split_is_pinned() -> None:
    """The held-out rows of a fixed input and seed: a changed package or NumPy stream that
    moves prepared validation splits fails here (then bump the manifest schema version)."""
    labels = random_labels(40, 4, 5, density=0.3)
    held = stratified_holdout(labels, 0.5, seed=0)
    assert np.flatnonzero(held).tolist() == PINNED_HELD


def test_stratification_spreads_unlabelled_rows_and_refuses_bad_input() -> None:
    labels = random_labels(60, 5, 2)
    labels[:20] = 0  # rows without any label
    held = stratified_holdout(labels, 0.5, seed=0)
    assert 7 <= held[:20].sum() <= 13  # spread over both sides, not all in one
    with pytest.raises(ConfigError, match="fraction must be in"):
        stratified_holdout(labels, 1.0)
    with pytest.raises(ConfigError, match=r"\(N, C >= 2\)"):
        stratified_holdout(labels[:, :1], 0.5)
    with pytest.raises(ConfigError, match="cannot hold out 0.5 of 1 images"):
        stratified_holdout(labels[:1], 0.5)


# ---------------------------------------------------------------- the real release files


def release_dir() -> Path | None:
    env = os.environ.get("MLT_TUNER_BENCHMARK_FILES")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / ".." / "shared" / "benchmarks"
    return path if (path / "coco_mlt").is_dir() else None


needs_release = pytest.mark.skipif(
    release_dir() is None,
    reason="benchmark split files not found (set MLT_TUNER_BENCHMARK_FILES or place them at "
           "../shared/benchmarks relative to the repository)",
)


@needs_release
@pytest.mark.parametrize(
    "folder,prefix,n_train,n_test,classes,sizes,lpi",
    [("coco_mlt", "coco", 1909, 5000, 80, (22, 33, 25), 4.36),
     ("voc_mlt", "voc", 1142, 4952, 20, (6, 6, 8), 2.05)],
)
def test_dbl_release_facts(folder, prefix, n_train, n_test, classes, sizes, lpi) -> None:
    root = release_dir() / folder
    names = read_class_names(root / f"{prefix}_labels.txt", classes)
    train = read_space_list(root / f"{prefix}_lt_train.txt", classes)
    test = read_space_list(root / f"{prefix}_lt_test.txt", classes)
    assert (len(train), len(test), len(names)) == (n_train, n_test, classes)
    assert round(float(train.labels.sum(1).mean()), 2) == lpi
    groups = read_class_split(root / "class_split.pkl")
    assert tuple(len(groups[g]) for g in ("head", "medium", "tail")) == sizes
    counts = train.labels.sum(0)
    assert groups["head"] == np.flatnonzero(counts >= 100).tolist()  # DBL's 100 / 20 rule
    assert groups["tail"] == np.flatnonzero(counts < 20).tolist()
    freq = load_pickle(root / "class_freq.pkl")
    np.testing.assert_array_equal(np.asarray(freq["class_freq"]), counts)
    # the shipped copies are the same data
    shipped = SPLITS_DIR / folder
    assert read_class_split(shipped / "class_split.json") == groups
    np.testing.assert_array_equal(read_space_list(shipped / f"{prefix}_lt_train.txt.gz", classes).labels,
                                  train.labels)
    assert read_space_list(shipped / f"{prefix}_lt_test.txt.gz", classes).image_ids == test.image_ids


@needs_release
def test_coco2014_missing_release_facts() -> None:
    root = release_dir() / "coco2014_missing"
    full = read_comma_list(root / "coco_train_full.txt", 80)
    assert len(full) == 82081 and round(float(full.labels.sum(1).mean()), 2) == 2.94
    lpi = {"0.4left": 1.17, "singlelabel": 1.0}
    for variant in COCO2014_VIEWS:
        part = read_comma_list(root / f"coco_train_{variant}.txt", 80)
        assert part.image_ids == full.image_ids
        assert (part.labels <= full.labels).all() and (part.labels.sum(1) >= 1).all()
        if variant in lpi:
            assert round(float(part.labels.sum(1).mean()), 2) == lpi[variant]
        with gzip.open(SPLITS_DIR / "coco2014_missing" / f"coco_train_{variant}.txt.gz", "rb") as fh:
            assert fh.read() == (root / f"coco_train_{variant}.txt").read_bytes()
    dropped = 1 - read_comma_list(root / "coco_train_singlelabel.txt", 80).labels.sum() / full.labels.sum()
    assert round(float(dropped), 2) == COCO2014_VIEWS["singlelabel"]


@needs_release
def test_voc2007_partial_release_facts() -> None:
    root = release_dir() / "voc2007_partial"
    for rho in (0.1, 0.2, 0.4):
        labels = read_partial_labels(root / f"voc07_{rho}.npy")
        assert labels.shape == (5011, 20)
        shipped = read_partial_labels(SPLITS_DIR / "voc2007_partial" / f"voc07_{rho}.packed.npy")
        np.testing.assert_array_equal(shipped, labels)
        if rho == 0.1:
            assert round(float(labels.sum(1).mean()), 2) == 3.31
