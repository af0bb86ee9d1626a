"""The manifest of a prepared benchmark directory, and the checksums that guard its files.

Layout of a prepared directory::

    DIR/manifest.json                 schema version, classes, counts, groups, views, checksums
    DIR/images/<split>-00000.parquet  image shards: index, image_id, image (encoded bytes)
    DIR/labels/true.parquet           true labels of every split, keyed by image id
    DIR/labels/<view>.parquet         one table per corruption view (training split only)

Every file's SHA-256 is in the manifest; :func:`verify_files` refuses a file whose content
changed, naming it. The manifest carries a SHA-256 of itself (``manifest_sha256``, over its
canonical JSON without that field), so an edited manifest is refused too. A manifest of
another schema version (1 had no checksum of its own) is refused with the fix (re-run
``python -m tuner.prepare``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tuner.errors import ChecksumError, DataError

#: 2: real benchmarks' validation split is cut by the iterative-stratification package (a
#: directory of version 1 holds the split of the former hand-written stratifier), and the
#: manifest carries its own checksum (SELF_SUM)
SCHEMA_VERSION = 2
_CHANGED = {
    2: "validation splits now come from the iterative-stratification package, and the "
    "manifest carries its own checksum"
}
SELF_SUM = "manifest_sha256"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
GROUPS = ("head", "medium", "tail")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def class_groups(
    counts: Sequence[int] | np.ndarray, head_min: int, tail_below: int
) -> dict[str, list[int]]:
    """Head (count >= head_min) / medium / tail (count < tail_below) class indices (DBL rule)."""
    counts = np.asarray(counts)
    return {
        "head": [int(c) for c in np.flatnonzero(counts >= head_min)],
        "medium": [int(c) for c in np.flatnonzero((counts >= tail_below) & (counts < head_min))],
        "tail": [int(c) for c in np.flatnonzero(counts < tail_below)],
    }


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys, no spaces) without ``SELF_SUM``."""
    body = {k: v for k, v in manifest.items() if k != SELF_SUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_manifest_json(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``DIR/manifest.json`` as a dict, unchecked; a :class:`DataError` when absent or not JSON."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"no prepared benchmark at {Path(data_dir)} ({MANIFEST} missing); create it with "
            f"`python -m tuner.prepare --benchmark digits-mlt --out {Path(data_dir)}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a readable JSON manifest ({exc}); re-run prepare") from exc
    if not isinstance(manifest, dict):
        raise DataError(f"{path} is not a manifest (a JSON object); re-run prepare")
    return manifest


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check ``DIR/manifest.json``; a clear :class:`DataError` when absent, foreign or
    edited (its ``manifest_sha256`` does not match its content)."""
    path = Path(data_dir) / MANIFEST
    manifest = load_manifest_json(data_dir)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        why = f" ({_CHANGED[SCHEMA_VERSION]})" if version == SCHEMA_VERSION - 1 else ""
        raise DataError(
            f"{path} has schema_version={version!r}, this tuner reads {SCHEMA_VERSION}{why}; "
            f"re-run `python -m tuner.prepare` into a new directory (or this one with --overwrite)"
        )
    stored, actual = manifest.get(SELF_SUM), manifest_digest(manifest)
    if stored != actual:
        raise ChecksumError(
            f"{path} was changed after it was written ({SELF_SUM} {str(stored)[:12]}... != "
            f"content {actual[:12]}...); re-run `python -m tuner.prepare` into a new directory"
        )
    return manifest


def write_manifest(data_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Write the manifest with its own checksum, atomically (temporary file + rename)."""
    path = Path(data_dir) / MANIFEST
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    signed = {**manifest, SELF_SUM: manifest_digest(manifest)}
    tmp.write_text(json.dumps(signed, indent=1, sort_keys=True))
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(data_dir: str | os.PathLike[str], name: str = ".lock") -> Iterator[None]:
    """An exclusive advisory lock (file ``data_dir/name``), for read-modify-write."""
    lock_path = Path(data_dir) / name
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def verify_files(
    data_dir: str | os.PathLike[str], manifest: Mapping[str, Any], files: Iterable[str]
) -> None:
    """Check that each relative path exists and matches its manifest checksum."""
    sums = manifest.get("checksums", {})
    for rel in files:
        path = Path(data_dir) / rel
        if rel not in sums:
            raise ChecksumError(f"{path} is not listed in the manifest's checksums; re-run prepare")
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run `python -m tuner.prepare` for this dir")
        actual = sha256_file(path)
        if actual != sums[rel]:
            raise ChecksumError(
                f"{path} is corrupted (sha256 {actual[:12]}... != manifest {sums[rel][:12]}...); "
                f"delete the directory and re-run `python -m tuner.prepare`"
            )
