"""Writing a prepared benchmark directory: image shards, label tables and the manifest.

Every benchmark (the embedded DigitsMLT and the real ones) goes through
:func:`write_benchmark`, so they all read back the same way. Rows of each split are sorted by
image id; ``index`` is a row's position in that order, i.e. its row in the split's label
table, so per-sample method state is keyed by image id, never by loader order.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tuner import __version__
from tuner.data.manifest import (
    SCHEMA_VERSION,
    SPLITS,
    class_groups,
    sha256_file,
    write_manifest,
)
from tuner.data.owned import WRITING, remove_prepared
from tuner.errors import DataError

IMAGE_SCHEMA = pa.schema(
    [("index", pa.int64()), ("image_id", pa.string()), ("image", pa.binary())]
)


@dataclass
class SplitSource:
    """One split to write: ids, ``(N, C)`` 0/1 labels and a function giving encoded image bytes."""

    image_ids: Sequence[str]
    labels: np.ndarray
    encode: Callable[[int], bytes]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``(H, W)`` or ``(H, W, 3)`` uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def labels_table(image_ids: Sequence[str], labels: np.ndarray, split: str | None = None) -> pa.Table:
    """A label table: ``image_id``, optional ``split``, ``labels`` (fixed-size list of uint8)."""
    num_classes = labels.shape[1]
    flat = pa.array(np.ascontiguousarray(labels, dtype=np.uint8).reshape(-1))
    columns = {"image_id": pa.array(list(image_ids), pa.string())}
    if split is not None:
        columns["split"] = pa.array([split] * len(image_ids), pa.string())
    columns["labels"] = pa.FixedSizeListArray.from_arrays(flat, num_classes)
    return pa.table(columns)


def table_labels(table: pa.Table) -> np.ndarray:
    """``(N, C)`` uint8 matrix from a label table's ``labels`` column."""
    column = table.column("labels").combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.uint8)


def _write_split_shards(
    out: Path, split: str, source: SplitSource, order: np.ndarray, rows_per_shard: int, bar: Any
) -> list[str]:
    files = []
    for shard, start in enumerate(range(0, len(order), rows_per_shard)):
        rows = order[start : start + rows_per_shard]
        table = pa.table(
            {
                "index": pa.array(np.arange(start, start + len(rows)), pa.int64()),
                "image_id": pa.array([source.image_ids[i] for i in rows], pa.string()),
                "image": pa.array([source.encode(int(i)) for i in rows], pa.binary()),
            },
            schema=IMAGE_SCHEMA,
        )
        rel = f"images/{split}-{shard:05d}.parquet"
        pq.write_table(table, out / rel, compression="none")
        files.append(rel)
        bar.update(len(rows))
    return files


def write_benchmark(
    out_dir: str | Path,
    benchmark: str,
    class_names: Sequence[str],
    splits: Mapping[str, SplitSource],
    *,
    head_min: int,
    tail_below: int,
    build: Mapping[str, Any],
    image_info: Mapping[str, Any],
    rows_per_shard: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    owned: bool = False,
) -> dict[str, Any]:
    """Write shards, the true-label table and the manifest; returns the manifest.

    ``overwrite`` replaces a previous benchmark in ``out_dir``, deleting only the files the
    platform wrote there (:mod:`tuner.data.owned`; ``owned``: the caller's own staging folder).
    """
    out = Path(out_dir)
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"benchmark {benchmark!r} lacks split(s) {missing}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"{out} is not empty; pass --overwrite or choose another --out")
        remove_prepared(out, owned)  # only what the platform wrote; refuses a directory with more
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    (out / WRITING).touch()  # this directory is the platform's until its manifest is written
    total = sum(len(s.image_ids) for s in splits.values())
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"tuner {__version__}",
        "benchmark": benchmark,
        "build": dict(build),
        "image": dict(image_info),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "group_thresholds": {"head_min": head_min, "tail_below": tail_below},
        "splits": {},
        "class_counts": {},
        "views": {},
    }
    tables = []
    with tqdm(total=total, desc=f"writing {benchmark} shards", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            source = splits[split]
            order = np.argsort(np.asarray(source.image_ids, dtype=object), kind="stable")
            files = _write_split_shards(out, split, source, order, rows_per_shard, bar)
            labels = source.labels[order]
            ids = [source.image_ids[i] for i in order]
            tables.append(labels_table(ids, labels, split))
            manifest["splits"][split] = {
                "num_images": len(ids),
                "shards": files,
                "labels_per_image": float(labels.sum(1).mean()) if len(ids) else 0.0,
            }
            manifest["class_counts"][split] = labels.sum(0).astype(int).tolist()
    pq.write_table(pa.concat_tables(tables), out / "labels/true.parquet")
    manifest["labels"] = "labels/true.parquet"
    manifest["groups"] = class_groups(manifest["class_counts"]["train"], head_min, tail_below)
    rels = [f for s in SPLITS for f in manifest["splits"][s]["shards"]] + [manifest["labels"]]
    manifest["checksums"] = {rel: sha256_file(out / rel) for rel in rels}
    write_manifest(out, manifest)
    (out / WRITING).unlink()
    return manifest
