"""Readers of the benchmarks' label files and of users' COCO / VOC folders.

Every reader returns a :class:`LabelledImages`: image ids (the relative path the file names,
unique within the file), the relative image paths and an ``(N, C)`` uint8 label matrix.
Bad input raises one :class:`~tuner.errors.DataError` line naming the file (and line).

Formats:

* class-name files (``coco_labels.txt``, ``voc_labels.txt``): ``name index`` per line, names
  may contain spaces, indices 0..C-1 in order;
* DBL / LMPT lists (``coco_lt_train.txt``, ``voc_lt_test.txt``): ``relpath i j k``;
* Hill / SPLC lists (``coco_train_0.4left.txt``): ``file.jpg,i j k``;
* caption files (TailCLIP): ``relpath caption text``;
* a COCO instances JSON: categories sorted by id give the 0-based class order; images without
  any annotation are left out (the usual COCO multi-label protocol: COCO-2014 val has 40,137
  labelled images of 40,504);
* a VOC folder: ``ImageSets/Main/<set>.txt`` ids, ``Annotations/<id>.xml`` objects,
  ``JPEGImages/<id>.jpg``.
"""

from __future__ import annotations

import gzip
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tuner.errors import DataError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@dataclass
class LabelledImages:
    """Images named by a label file: ids, relative paths and ``(N, C)`` uint8 labels."""

    image_ids: list[str]
    paths: list[str]
    labels: np.ndarray
    #: optional ``(N, C)`` uint8: entries in the "ignore" state (label 0 in ``labels``, left
    #: out of evaluation; VOC2007 difficult-only objects under ``ignore_difficult``)
    ignore: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, mask: np.ndarray) -> LabelledImages:
        rows = np.flatnonzero(mask)
        return LabelledImages(
            [self.image_ids[i] for i in rows], [self.paths[i] for i in rows], self.labels[rows],
            None if self.ignore is None else self.ignore[rows],
        )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a text file (``.gz`` transparently), CR/LF stripped."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            for number, line in enumerate(fh, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield number, line
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc}); check the path") from exc


def read_class_names(path: str | Path, num_classes: int | None = None) -> list[str]:
    """Class names from a ``name index`` file; indices must run 0..C-1 in order."""
    path = Path(path)
    names = []
    for number, line in _lines(path):
        name, _, index = line.strip().rpartition(" ")
        if not name or not index.isdigit() or int(index) != len(names):
            raise DataError(
                f"{path}:{number}: expected '<name> {len(names)}', got {line.strip()!r}"
            )
        names.append(name.strip())
    if num_classes is not None and len(names) != num_classes:
        raise DataError(
            f"{path} names {len(names)} classes but the split has {num_classes}; "
            f"use the class-name file that belongs to these split files"
        )
    return names


def _parse_ids(text: str, num_classes: int, path: Path, number: int) -> list[int]:
    try:
        ids = [int(token) for token in text.split()]
    except ValueError:
        bad = next(t for t in text.split() if not t.lstrip("-").isdigit())
        raise DataError(f"{path}:{number}: class id {bad!r} is not an integer") from None
    if ids and (min(ids) < 0 or max(ids) >= num_classes):
        bad_id = next(i for i in ids if not 0 <= i < num_classes)
        raise DataError(f"{path}:{number}: class id {bad_id} out of range 0..{num_classes - 1}")
    return ids


def _build(path: Path, rows: list[tuple[int, str, list[int]]], num_classes: int) -> LabelledImages:
    seen: dict[str, int] = {}
    for number, rel, _ in rows:
        if seen.setdefault(rel, number) != number:
            raise DataError(f"{path}:{number}: {rel} is listed twice (first on line {seen[rel]})")
    labels = np.zeros((len(rows), num_classes), dtype=np.uint8)
    row_index = [i for i, (_, _, ids) in enumerate(rows) for _ in ids]
    labels[row_index, [c for _, _, ids in rows for c in ids]] = 1
    rels = [rel for _, rel, _ in rows]
    return LabelledImages(list(rels), list(rels), labels)


def read_space_list(path: str | Path, num_classes: int) -> LabelledImages:
    """A DBL / LMPT list: ``relpath i j k ...`` (0-based class ids, space separated)."""
    path = Path(path)
    rows = []
    for number, line in _lines(path):
        rel, *ids = line.split()
        rows.append((number, rel, _parse_ids(" ".join(ids), num_classes, path, number)))
    return _build(path, rows, num_classes)


def read_comma_list(path: str | Path, num_classes: int) -> LabelledImages:
    """A Hill / SPLC list: ``file.jpg,i j k`` (comma after the file name)."""
    path = Path(path)
    rows = []
    for number, line in _lines(path):
        rel, comma, ids = line.partition(",")
        if not comma:
            raise DataError(f"{path}:{number}: expected 'file.jpg,i j k', got {line[:60]!r}")
        rows.append((number, rel.strip(), _parse_ids(ids, num_classes, path, number)))
    return _build(path, rows, num_classes)


def read_captions(path: str | Path) -> dict[str, str]:
    """TailCLIP captions: ``relpath caption text`` -> ``{relpath: caption}``."""
    path = Path(path)
    out = {}
    for _, line in _lines(path):
        rel, _, caption = line.partition(" ")
        out[rel] = caption.strip()
    return out


def read_coco_instances(path: str | Path) -> tuple[LabelledImages, list[str]]:
    """Labels of a COCO instances JSON (images with >= 1 annotation) and the class names."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        categories = sorted(data["categories"], key=lambda c: c["id"])
        images, annotations = data["images"], data["annotations"]
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); pass the instances JSON with "
                        f"--annotations (or --test-annotations)") from exc
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a COCO instances JSON ({type(exc).__name__}: {exc})") from exc
    column = {c["id"]: k for k, c in enumerate(categories)}
    row = {img["id"]: i for i, img in enumerate(images)}
    labels = np.zeros((len(images), len(categories)), dtype=np.uint8)
    for ann in annotations:
        if ann["image_id"] not in row or ann["category_id"] not in column:
            raise DataError(
                f"{path}: annotation {ann.get('id')} names image {ann['image_id']} / category "
                f"{ann['category_id']}, which the file does not list"
            )
        labels[row[ann["image_id"]], column[ann["category_id"]]] = 1
    files = [img["file_name"] for img in images]
    found = LabelledImages(files, files, labels)
    return found.subset(labels.any(1)), [c["name"] for c in categories]


def read_voc(
    root: str | Path, image_set: str, class_names: Sequence[str] = VOC_CLASSES,
    difficult: bool = True, ignore_difficult: bool = False,
) -> LabelledImages:
    """A VOC folder's image set: ids from ImageSets/Main, labels from Annotations XML.

    Args:
        root: the year folder (``VOCdevkit/VOC2007``) with Annotations, ImageSets, JPEGImages.
        image_set: ``trainval``, ``test``, ``train`` or ``val``.
        class_names: the class order (VOC's 20 classes by default).
        difficult: count objects marked difficult as positives (the usual multi-label VOC
            protocol); False ignores them.
        ignore_difficult: a class present only through difficult objects gets label 0 and
            the "ignore" state (``LabelledImages.ignore``), which evaluation leaves out of
            that class's AP (the VOC07 protocol; a non-difficult object of the class makes
            it a plain positive). Overrides ``difficult``.
    """
    root = Path(root)
    set_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not set_file.is_file():
        raise DataError(f"{set_file} not found; --images must be a VOC year folder (VOCdevkit/VOC2007)")
    column = {name: k for k, name in enumerate(class_names)}
    ids = [line.split()[0] for _, line in _lines(set_file)]
    labels = np.zeros((len(ids), len(class_names)), dtype=np.uint8)
    hard = np.zeros_like(labels)
    for i, image_id in enumerate(ids):
        for name, is_difficult in _voc_objects(root / "Annotations" / f"{image_id}.xml"):
            if name not in column:
                raise DataError(
                    f"{root / 'Annotations' / (image_id + '.xml')}: object {name!r} is not one "
                    f"of the {len(class_names)} classes"
                )
            if is_difficult and ignore_difficult:
                hard[i, column[name]] = 1
            elif difficult or not is_difficult:
                labels[i, column[name]] = 1
    ignore = (hard & (1 - labels)).astype(np.uint8) if ignore_difficult else None
    return LabelledImages(ids, [f"JPEGImages/{i}.jpg" for i in ids], labels, ignore)


def _voc_objects(path: Path) -> list[tuple[str, bool]]:
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise DataError(f"cannot read annotation {path} ({exc})") from exc
    out = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        out.append((name, (obj.findtext("difficult") or "0").strip() == "1"))
    return out


def resolve_images(
    root: str | Path, rels: Sequence[str], subdirs: Sequence[str] = ("",), skip_missing: bool = False
) -> tuple[list[Path], np.ndarray]:
    """Absolute image paths of ``rels`` under ``root``, and a mask of the ones found.

    The layout is found once from the first image: ``root/sub/rel`` for each ``sub`` in
    ``subdirs``, then with leading folders of ``rel`` stripped (so both ``COCO/`` and
    ``COCO/train2017/`` work as a root). Missing files raise one line with their count and the
    first few paths, unless ``skip_missing``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass --images DIR")
    layout = _find_layout(root, rels, subdirs)
    paths = [layout(rel) for rel in rels]
    found = np.fromiter((os.path.isfile(p) for p in paths), dtype=bool, count=len(paths))
    if not found.all() and not skip_missing:
        missing = [str(p) for p, ok in zip(paths, found) if not ok]
        raise DataError(
            f"{len(missing)} of {len(paths)} images missing under {root}, e.g. "
            f"{', '.join(missing[:3])}; fix --images or pass --skip-missing to leave them out"
        )
    return paths, found


def _find_layout(root: Path, rels: Sequence[str], subdirs: Sequence[str]):  # -> Callable
    for rel in rels[:50]:
        parts = Path(rel).parts
        for sub in subdirs:
            for strip in range(len(parts)):
                candidate = root / sub / Path(*parts[strip:])
                if candidate.is_file():
                    return lambda r, s=sub, k=strip: root / s / Path(*Path(r).parts[k:])
    return lambda r: root / r  # nothing found: report them as missing at root/rel
