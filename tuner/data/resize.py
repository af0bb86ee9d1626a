"""Parallel, resumable decoding and resizing of a benchmark's images.

Images are decoded, resized to ``S x S`` and re-encoded as JPEG by a process pool, a chunk of
images per task. Each chunk is written as a small Parquet "part" (``image_id``, ``image``,
``error``) in a parts folder beside the output, atomically (temporary file + rename), under a
name that hashes the chunk's ids, files and settings. A re-run skips every part that exists, so
an interrupted prepare resumes where it stopped and a half-written part is never read.
:class:`PartStore` then serves the encoded bytes to :func:`tuner.data.shards.write_benchmark`.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from tuner.errors import DataError

PART_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("error", pa.string())])


@dataclass(frozen=True)
class ResizeSpec:
    """Output images: ``size x size`` RGB JPEG at ``quality``."""

    size: int = 224
    quality: int = 90

    def encode_file(self, path: str | Path) -> bytes:
        """Decode ``path``, resize to a square of ``size`` (bilinear), re-encode as JPEG."""
        from PIL import Image

        with Image.open(path) as img:
            img.draft("RGB", (self.size, self.size))  # JPEG: decode at the smallest scale >= S
            rgb = img.convert("RGB")
        rgb = rgb.resize((self.size, self.size), Image.BILINEAR)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=self.quality)
        return buf.getvalue()


def _encode_chunk(spec: ResizeSpec, ids: list[str], files: list[str], dest: str) -> int:
    """Worker: encode one chunk and write its part atomically; returns the failure count."""
    from PIL import Image

    images, errors = [], []
    for path in files:
        try:
            images.append(spec.encode_file(path))
            errors.append(None)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            images.append(None)
            errors.append(f"{type(exc).__name__}: {exc}")
    table = pa.table({"image_id": ids, "image": images, "error": errors}, schema=PART_SCHEMA)
    tmp = f"{dest}.tmp{os.getpid()}"
    pq.write_table(table, tmp, compression="none")
    os.replace(tmp, dest)
    return sum(e is not None for e in errors)


@dataclass
class Chunk:
    pool: str
    ids: list[str]
    files: list[str]
    path: Path


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def plan_chunks(
    parts_dir: Path, pool: str, ids: Sequence[str], files: Sequence[Path], spec: ResizeSpec,
    chunk_size: int = 256,
) -> list[Chunk]:
    """Chunks of a pool (in the given order), each named by a hash of its ids, files (path,
    size, modification time) and output settings, so a changed image or setting is re-done."""
    chunks = []
    for k, start in enumerate(range(0, len(ids), chunk_size)):
        cid = list(ids[start : start + chunk_size])
        cfiles = [str(f) for f in files[start : start + chunk_size]]
        stats = [_stat(f) for f in cfiles]
        key = json.dumps([cid, cfiles, stats, spec.size, spec.quality]).encode()
        digest = hashlib.sha256(key).hexdigest()[:12]
        chunks.append(Chunk(pool, cid, cfiles, parts_dir / f"{pool}-{k:05d}-{digest}.parquet"))
    return chunks


def encode_chunks(
    chunks: Sequence[Chunk], spec: ResizeSpec, workers: int, progress: bool = True
) -> int:
    """Encode every chunk whose part is missing, ``workers`` processes at a time (1: in this
    process).

    Returns the number of images encoded now (0 when everything was already done).
    """
    todo = [c for c in chunks if not c.path.is_file()]
    total = sum(len(c.ids) for c in chunks)
    done = total - sum(len(c.ids) for c in todo)
    if not todo:
        return 0
    bar = tqdm(total=total, initial=done, desc="decoding + resizing", unit="img", disable=not progress)
    if workers <= 1:  # in this process: no pool start-up cost for small jobs
        with bar:
            for c in todo:
                _encode_chunk(spec, c.ids, c.files, str(c.path))
                bar.update(len(c.ids))
        return sum(len(c.ids) for c in todo)
    context = multiprocessing.get_context("spawn")
    with bar, ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context) as pool:
        futures = {pool.submit(_encode_chunk, spec, c.ids, c.files, str(c.path)): c for c in todo}
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(len(futures[future].ids))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return sum(len(c.ids) for c in todo)


def collect_failures(chunks: Sequence[Chunk]) -> dict[str, str]:
    """``{image_id: error}`` of every image that could not be decoded."""
    failures = {}
    for chunk in chunks:
        table = pq.read_table(chunk.path, columns=["image_id", "error"])
        for image_id, error in zip(table.column("image_id").to_pylist(), table.column("error").to_pylist()):
            if error is not None:
                failures[image_id] = error
    return failures


class PartStore:
    """Encoded bytes by image id, read part by part (a few parts cached in memory)."""

    def __init__(self, chunks: Sequence[Chunk], cache_parts: int = 4) -> None:
        self._where = {image_id: c.path for c in chunks for image_id in c.ids}
        self._cache: OrderedDict[Path, dict[str, bytes]] = OrderedDict()
        self._cache_parts = cache_parts

    def get(self, image_id: str) -> bytes:
        path = self._where.get(image_id)
        if path is None:
            raise DataError(f"image {image_id} was not encoded; re-run prepare")
        if path not in self._cache:
            table = pq.read_table(path, columns=["image_id", "image"])
            self._cache[path] = dict(
                zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())
            )
            while len(self._cache) > self._cache_parts:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        data = self._cache[path][image_id]
        if data is None:
            raise DataError(f"image {image_id} could not be decoded; it should have been left out")
        return data
