"""The in-memory training path: splits decoded once per search, shared by every trial.

When the decoded train and validation splits fit a memory budget, the search's driver
decodes them once (:func:`decode_split`, no augmentation) and puts them in Ray's object
store; every trial maps the same arrays zero-copy (NumPy arrays from the object store are
read-only views of shared memory) and augments each planned task's rows in its own process
(:class:`MemoryEpochs`). That replaces a Ray Data execution per trial (its start-up was most
of a trial's 9 s start-up) and re-decoding the PNG shards every epoch in tasks that compete
with training for the same cores.

**Same batches as the stream.** An epoch follows the stream's plan
(:func:`tuner.data.stream.plan_epochs`, from ``(seed, epoch)``): the same tasks in the same
order, each task's rows (and a rank's share of them) in the same permutation, augmented
with the same draws (:meth:`Decoder.augment_decoded`), so a trial trains on the same pixels
in the same order on either path, and a resumed epoch is planned as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tuner.data.stream import Decoder, load_split, plan_epochs

#: rows augmented per call, as the stream's ``decode_batch_size`` (the draws depend on it)
CHUNK_ROWS = 64


@dataclass(frozen=True)
class DecodedSplit:
    """A split decoded once: ``images`` ``(N, 3, S, S)`` uint8 and ``index`` ``(N,)`` int64,
    rows in the order of ``files`` (``counts[i]`` rows from ``files[i]``)."""

    images: np.ndarray
    index: np.ndarray
    files: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(self.images.nbytes + self.index.nbytes)

    def rows_of(self, files: Sequence[str]) -> np.ndarray:
        """Positions (into ``images``) of the rows of ``files``, file after file."""
        starts = dict(zip(self.files, np.cumsum((0, *self.counts[:-1])).tolist()))
        sizes = dict(zip(self.files, self.counts))
        try:
            return np.concatenate([np.arange(starts[f], starts[f] + sizes[f]) for f in files])
        except KeyError as exc:
            raise ValueError(f"shard {exc.args[0]} is not part of the decoded split") from None


def decoded_bytes(num_images: int, image_size: int) -> int:
    """Bytes of a split of ``num_images`` decoded to RGB uint8 at ``image_size`` (+ index)."""
    return int(num_images) * (3 * int(image_size) ** 2 + 8)


def decode_split(files: Sequence[str], image_size: int) -> DecodedSplit:
    """Decode every shard of a split in this process (no augmentation), in file order."""
    import pyarrow.parquet as pq

    files = tuple(str(f) for f in files)
    counts = tuple(pq.read_metadata(f).num_rows for f in files)
    images, index = load_split(files, image_size)
    return DecodedSplit(images.numpy(), index.numpy(), files, counts)


def memory_block(split: DecodedSplit, item: Mapping[str, Any], decoder: Decoder,
                 rank: int = 0, world: int = 1,
                 chunk_rows: int = CHUNK_ROWS) -> dict[str, np.ndarray]:
    """One planned task's block from decoded rows: the same rows, order and augmentation
    draws as the stream's read + decode task (``_ReadShuffleDecode``) for ``item``."""
    rows = split.rows_of(item["files"])
    seed = int(item["split_seed"])
    if world > 1:  # the same permutation on every rank: disjoint, balanced rows
        mine = np.random.default_rng(seed).permutation(len(rows))
        rows = rows[np.sort(mine[rank::world])]
    rng = np.random.default_rng([seed, rank])
    rows = rows[rng.permutation(len(rows))]
    images = split.images[rows]
    out = np.empty_like(images)
    for i in range(0, len(rows), max(1, chunk_rows)):
        decoder.augment_decoded(images[i : i + chunk_rows], out[i : i + chunk_rows], rng)
    return {"image": out, "index": split.index[rows]}


class MemoryEpochs:
    """A trial's training epochs from a :class:`DecodedSplit`, planned like the stream's.

    Same interface as :class:`tuner.data.stream.EpochStream` (``blocks(epoch)``,
    ``close()``); an epoch's blocks are augmented lazily, one planned task at a time, in
    the planned order. Any epoch may be asked for in any order (a resumed trial).
    """

    def __init__(self, split: DecodedSplit, image_size: int, augment: str, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.split, self.image_size, self.seed = split, image_size, seed
        self.rank, self.world = rank, world
        self.decoder = Decoder(image_size, augment)

    def plan(self, epoch: int) -> list[dict[str, Any]]:
        """The stream's tasks of ``epoch`` (:func:`tuner.data.stream.plan_epochs`)."""
        return plan_epochs(self.split.files, self.image_size, [epoch], seed=self.seed,
                           rank=self.rank, world=self.world, counts=self.split.counts)

    def blocks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        for item in self.plan(epoch):
            yield memory_block(self.split, item, self.decoder, self.rank, self.world)

    def close(self) -> None:
        """Nothing to stop (the decoded split belongs to the object store)."""
