"""Reading a prepared benchmark directory, and building / caching it and its label views."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tuner.data.corruption import ViewSpec, make_view
from tuner.data.digits import DEFAULT_HEAD_SHARE, DigitsConfig, build_digits_mlt
from tuner.data.digits import IMAGE_SIZE as DIGITS_SIZE
from tuner.data.digits import VERSION as DIGITS_VERSION
from tuner.data.manifest import (
    MANIFEST,
    SPLITS,
    class_groups,
    locked,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from tuner.data.owned import check_removable
from tuner.data.shards import SplitSource, encode_png, labels_table, table_labels, write_benchmark
from tuner.errors import ConfigError, DataError

EMBEDDED = ("digits-mlt",)


def default_data_dir(benchmark: str, seed: int = 0, head_share: float | None = None) -> Path:
    """Where a benchmark is cached: ``$MLT_TUNER_DATA`` or ``~/.cache/mlt-tuner``; a DigitsMLT
    variant (``head_share``) in a folder of its own."""
    root = os.environ.get("MLT_TUNER_DATA") or Path.home() / ".cache" / "mlt-tuner"
    variant = f"-h{head_share:g}" if head_share is not None else ""
    return Path(root) / f"{benchmark}-s{seed}{variant}"


def prepare_digits(out: str | Path, seed: int = 0, rows_per_shard: int = 64,
                   head_share: float | None = None, **kw: Any) -> dict:
    """Build DigitsMLT with ``seed`` and write it to ``out``; returns the manifest.

    ``head_share`` (default :class:`DigitsConfig`'s) builds a variant: the share of training
    images that hold the most frequent class. The class counts stay, so a lower share means
    more training images with fewer labels each (0.35: 5,143 images, 1.68 labels per image,
    against 2,571 and 3.36). The manifest records it. The validation and test splits are drawn
    the same way (from the scenes, about 3.3 labels per image) but from a random stream that
    follows the training split's, so they are other images than the default build's.
    """
    config = DigitsConfig(seed=seed)
    if head_share is not None:
        if not 0.0 < head_share <= 1.0:
            raise ConfigError(f"head_share must be in (0, 1], got {head_share}")
        config = dataclasses.replace(config, head_share=head_share)
    splits, facts = build_digits_mlt(config)
    sources = {}
    for name, built in splits.items():
        ids = [f"digits-{name}-{i:05d}" for i in range(len(built.labels))]
        sources[name] = SplitSource(ids, built.labels, lambda i, b=built: encode_png(b.images[i]))
    build = {**vars(config), **facts, "sources": {k: v.sources for k, v in splits.items()}}
    return write_benchmark(
        out,
        "digits-mlt",
        [str(d) for d in range(10)],
        sources,
        head_min=facts["head_min"],
        tail_below=facts["tail_below"],
        build=build,
        image_info={"format": "png", "height": DIGITS_SIZE, "width": DIGITS_SIZE, "channels": 1,
                    "augment": "shift"},
        rows_per_shard=rows_per_shard,
        **kw,
    )


def ensure_prepared(benchmark: str, data_dir: str | Path | None, seed: int = 0,
                    head_share: float | None = None) -> Path:
    """The benchmark's directory, building DigitsMLT there the first time it is needed.

    The default cache (``data_dir`` None) is the platform's own: DigitsMLT is built there when
    missing and rebuilt when another generator version or schema wrote it. A directory the
    user names is used as it is when it holds a prepared benchmark; a missing or empty one is
    filled with DigitsMLT (said in one line), a stale DigitsMLT rebuilt; any other folder is
    refused with the ``tuner.prepare`` command that would fill it. Only files the platform
    wrote are ever deleted (:mod:`tuner.data.owned`). A stale build of a variant
    (``tuner.prepare --head-share``) is rebuilt as the same variant, never as the default.

    ``head_share`` (a space's ``data.head_share``) asks for a DigitsMLT variant: the cache
    keeps it in a folder of its own, and an empty folder the user names is filled with it. A
    named folder that already holds a DigitsMLT is used as it is (the user chose it); when its
    head share differs, one line on stderr says which build runs.
    """
    if head_share is not None and benchmark not in EMBEDDED:
        raise ConfigError(f"head_share builds a DigitsMLT variant; it is for digits-mlt only, "
                          f"not {benchmark!r}")
    path = Path(data_dir) if data_dir else default_data_dir(benchmark, seed, head_share)
    if (path / "manifest.json").is_file() and not _stale_embedded(benchmark, path):
        if data_dir and head_share is not None:
            _say_which_build(path, head_share)
        return path
    if benchmark not in EMBEDDED:
        raise DataError(_not_prepared(benchmark, path))
    if path.exists() and not path.is_dir():
        raise DataError(f"data directory {path} is a file; pass a folder as --data-dir")
    fix = (f"move its files away and run `python -m tuner.prepare --benchmark {benchmark} "
           f"--out {path}`, or pass another --data-dir")
    # the lock lives beside the directory: building replaces the directory's content
    with locked(_mkdir(path.parent), f".{path.name}.lock"):
        if not (path / "manifest.json").is_file() or _stale_embedded(benchmark, path):
            if path.is_dir() and any(path.iterdir()):
                check_removable(path, owned=data_dir is None, fix=fix)
            recorded = _variant_head_share(path)
            share = head_share if head_share is not None else recorded
            variant = (f", head share {share:g}" if head_share is not None
                       else f", head share {share} as its manifest records" if share else "")
            if data_dir or recorded:
                print(f"data: building DigitsMLT (seed {seed}{variant}) into {path} (it held no "
                      f"current prepared benchmark)", file=sys.stderr)
            prepare_digits(path, seed=seed, overwrite=True, owned=data_dir is None,
                           head_share=share)
    return path


def known_benchmarks() -> tuple[str, ...]:
    """Every benchmark ``python -m tuner.prepare --benchmark`` accepts."""
    from tuner.data.benchmarks import REAL

    return EMBEDDED + REAL


def _not_prepared(benchmark: str, path: Path) -> str:
    if benchmark in known_benchmarks():
        return (f"benchmark {benchmark!r} is not prepared at {path}; run "
                f"`python -m tuner.prepare --benchmark {benchmark} --out {path}` first")
    return (f"unknown benchmark {benchmark!r}; choose one of {list(known_benchmarks())} "
            f"(docs/benchmarks.md)")


def _stale_embedded(benchmark: str, path: Path) -> bool:
    """A directory to (re)build DigitsMLT into: its manifest is unreadable or edited (then
    :func:`check_removable` decides whether that may happen), or it is a DigitsMLT of another
    generator or schema version (rebuilt in place).

    A readable manifest of another benchmark is never stale: a user's prepared COCO-MLT given
    as ``--data-dir`` is left alone, whatever its schema, and refused with its reason when read.
    """
    if benchmark != "digits-mlt":
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return True
    if not isinstance(manifest, dict) or manifest.get("benchmark") != "digits-mlt":
        return False
    try:
        read_manifest(path)  # schema and the manifest's own checksum
    except DataError:
        return True
    return manifest.get("build", {}).get("version", 1) != DIGITS_VERSION


def _digits_build(path: Path) -> dict[str, Any] | None:
    """The ``build`` record of the DigitsMLT manifest at ``path``; None when there is none."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("benchmark") != "digits-mlt":
        return None
    build = manifest.get("build")
    return build if isinstance(build, dict) else None


def _say_which_build(path: Path, head_share: float) -> None:
    """One line when a named DigitsMLT folder is not the variant the space asks for."""
    build = _digits_build(path)
    if build is not None and build.get("head_share") != head_share:
        print(f"data: {path} holds DigitsMLT with head share {build.get('head_share')}; it runs "
              f"as named (data.head_share {head_share:g} picks the cache's build only)",
              file=sys.stderr)


def _variant_head_share(path: Path) -> float | None:
    """The ``head_share`` of the DigitsMLT variant at ``path``, or None for a default build.

    A build records its head share; it is a variant when that differs from the default of the
    generator version that wrote it (``DEFAULT_HEAD_SHARE``; versions before 3 had none).
    """
    build = _digits_build(path) or {}
    share, version = build.get("head_share"), build.get("version")
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0.0 < share <= 1.0:
        return None
    default = DEFAULT_HEAD_SHARE.get(version) if isinstance(version, int) else None
    return None if default is None or share == default else float(share)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def observed_groups(counts: np.ndarray, manifest: dict[str, Any]) -> tuple[dict, str]:
    """Head / medium / tail of a view's observed counts, and the rule that made them.

    The benchmark's thresholds apply first (the PLT protocol). Corruption shifts every count
    (missing labels shrink them, candidate labels add about rho x negatives to each class),
    which can empty a group; the groups are then taken by rank of the observed counts, with
    the sizes of the true groups (``"rank"``), so a method never gets an empty head or tail.
    """
    thresholds = manifest["group_thresholds"]
    groups = class_groups(counts, thresholds["head_min"], thresholds["tail_below"])
    true_sizes = [len(manifest["groups"][g]) for g in ("head", "medium", "tail")]
    if all(groups[g] for g, n in zip(("head", "medium", "tail"), true_sizes) if n):
        return groups, "thresholds"
    order = [int(c) for c in np.argsort(-np.asarray(counts), kind="stable")]
    head, tail = true_sizes[0], true_sizes[2]
    ranked = {
        "head": sorted(order[:head]),
        "medium": sorted(order[head : len(order) - tail]),
        "tail": sorted(order[len(order) - tail :]),
    }
    return ranked, "rank"


class PreparedData:
    """A prepared benchmark directory: manifest, shards, labels and corruption views."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir)
        self.manifest = read_manifest(self.root)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    def shard_files(self, split: str) -> list[str]:
        """Absolute paths of a split's image shards."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return [str(self.root / rel) for rel in self.manifest["splits"][split]["shards"]]

    def verify(self, splits: Sequence[str] = SPLITS) -> None:
        """Check the checksums of the splits' shards and of the label tables."""
        rels = [r for s in splits for r in self.manifest["splits"][s]["shards"]]
        rels.append(self.manifest["labels"])
        if self.manifest.get("ignore"):
            rels.append(self.manifest["ignore"]["file"])
        rels += [v["file"] for v in self.manifest["views"].values()]
        verify_files(self.root, self.manifest, rels)

    def true_labels(self, split: str) -> tuple[list[str], np.ndarray]:
        """Image ids (sorted) and ``(N, C)`` uint8 true labels of a split."""
        table = pq.read_table(self.root / self.manifest["labels"])
        mask = np.asarray(table.column("split").to_pylist()) == split
        table = table.filter(mask)
        ids = table.column("image_id").to_pylist()
        if ids != sorted(ids) or len(ids) != self.manifest["splits"][split]["num_images"]:
            raise DataError(f"{self.root / self.manifest['labels']} does not match the manifest")
        return ids, table_labels(table)

    def ignore_mask(self, split: str) -> np.ndarray | None:
        """``(N, C)`` bool "ignore" state of a split's true labels (rows as
        :meth:`true_labels`), or None when the benchmark has none (``manifest["ignore"]``,
        e.g. VOC2007 difficult objects prepared with ``--voc-difficult ignore``)."""
        entry = self.manifest.get("ignore")
        if not entry:
            return None
        ids, labels = self.true_labels(split)
        table = pq.read_table(self.root / entry["file"])
        table = table.filter(np.asarray(table.column("split").to_pylist()) == split)
        if not table.num_rows:
            return None
        row = {image_id: i for i, image_id in enumerate(ids)}
        out = np.zeros(labels.shape, dtype=bool)
        try:
            rows = [row[i] for i in table.column("image_id").to_pylist()]
        except KeyError as exc:
            raise DataError(f"{self.root / entry['file']} names image {exc} that is not in the "
                            f"{split} split; re-run `python -m tuner.prepare`") from None
        out[rows] = table_labels(table) > 0
        return out

    def view_labels(self, spec: ViewSpec) -> np.ndarray:
        """Observed ``(N_train, C)`` training labels of a view, generated and cached once."""
        if spec.kind == "clean":
            return self.true_labels("train")[1]
        entry = self.ensure_view(spec)
        table = pq.read_table(self.root / entry["file"])
        return table_labels(table)

    def ensure_view(self, spec: ViewSpec) -> dict[str, Any]:
        """The manifest entry of ``spec``, writing its label table the first time."""
        if spec.name in self.manifest["views"]:
            return self.manifest["views"][spec.name]
        with locked(self.root):
            self.manifest = read_manifest(self.root)
            if spec.name not in self.manifest["views"]:
                self._write_view(spec)
        return self.manifest["views"][spec.name]

    def _write_view(self, spec: ViewSpec) -> None:
        ids, labels = self.true_labels("train")
        observed, info = make_view(labels, spec)
        rel = f"labels/{spec.name}.parquet"
        pq.write_table(labels_table(ids, observed), self.root / rel)
        counts = observed.sum(0).astype(int)
        groups, rule = observed_groups(counts, self.manifest)
        self.manifest["views"][spec.name] = {
            "kind": spec.kind,
            "rate": spec.rate,
            "seed": spec.seed,
            "file": rel,
            "class_counts": counts.tolist(),
            "groups": groups,
            "group_rule": rule,
            **info,
        }
        self.manifest["checksums"][rel] = sha256_file(self.root / rel)
        write_manifest(self.root, self.manifest)

    def class_counts(self, spec: ViewSpec | None = None) -> list[int]:
        """Training class counts of the observed labels of ``spec`` (true counts for None/clean)."""
        if spec is None or spec.kind == "clean":
            return list(self.manifest["class_counts"]["train"])
        return list(self.ensure_view(spec)["class_counts"])

    def groups(self, spec: ViewSpec | None = None) -> dict[str, list[int]]:
        """Head / medium / tail groups; from the observed labels of ``spec`` when given."""
        if spec is None or spec.kind == "clean":
            return {k: list(v) for k, v in self.manifest["groups"].items()}
        return {k: list(v) for k, v in self.ensure_view(spec)["groups"].items()}
