"""Decoding, augmentation and the Ray Data training stream.

The training split streams from the Parquet shards with Ray Data: shards (file order shuffled
each epoch) read and decoded + augmented on CPU in ``map_batches`` tasks, then whole decoded
blocks through a local shuffle buffer (:func:`iter_train_batches`) into the training loop. A
single-worker trial runs all its epochs as one Ray Data execution (:func:`epochs_dataset`,
:class:`EpochStream`); each worker of a multi-worker trial runs its own such execution over
its disjoint share of every epoch (``rank``/``world``: no split coordinator, no per-epoch
start). :func:`train_dataset` is the per-epoch pipeline (Train's ``streaming_split`` input,
kept as a reference for ``benchmarks/data_throughput.py``). Batches carry only
``image`` and ``index``; the loop looks the labels up by ``index`` in the trial's label table, so
label views and methods that correct labels never touch the stream.

Evaluation splits are decoded once per trial into an in-memory uint8 tensor
(:func:`load_split`), using the same decoder without augmentation.

CPU budget: each trial's Ray Data pipeline runs about ``data_cpus`` decode tasks at once
(:func:`task_pool`), so trials x (training CPUs + data CPUs) fit the node and data tasks
cannot be starved by the trials themselves (see the README's "CPU budget").
"""

from __future__ import annotations

import io
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32).reshape(1, 3, 1, 1)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_layout(data: bytes) -> int:
    """Channels of an 8-bit grey (1) or RGB (3) PNG from its IHDR chunk; 0 for anything else."""
    if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24] != 8:
        return 0
    return {0: 1, 2: 3}.get(data[25], 0)


@dataclass(frozen=True)
class Decoder:
    """Decode encoded images to ``(B, 3, S, S)`` uint8, with optional training augmentation.

    Args:
        image_size: output side S (images are resized when they differ).
        augment: ``"none"``, ``"shift"`` (random translation by up to S/12 pixels, for
            digits) or ``"flip"`` (shift plus horizontal flip, for natural images).
        seed: seed of the augmentation generator when :meth:`transform` is given none
            (None: fresh entropy per batch). The training streams pass a generator seeded
            from the epoch plan instead (:func:`plan_epochs`).

        libpng: decode 8-bit grey/RGB PNGs with ``torchvision.io.decode_png`` (True) or with
            PIL (False). The pixels are the same (PNG is lossless); libpng through torchvision
            is 13-15% faster per image at 64-448 px, but importing torchvision costs 0.9 s
            (it imports ``torch._dynamo``), so :func:`load_split` uses PIL for small splits.

    8-bit grey and RGB PNGs (what ``tuner.data.shards`` writes) decode without a colour
    conversion, and a batch of grey images is resized and augmented on one channel and
    replicated to three at the end; anything else goes through PIL (``convert("RGB")``). Both
    paths give the same pixels as decoding every image with PIL ``convert("RGB")`` + bilinear
    ``resize`` + per-channel augmentation (PNG is lossless, PIL's 8-bit resampling treats
    channels independently, and the augmentation moves whole pixels).
    """

    image_size: int
    augment: str = "none"
    seed: int | None = None
    libpng: bool = True

    def decode_one(self, data: bytes) -> np.ndarray:
        """One image as ``(3, S, S)`` uint8 (reference path: PIL)."""
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    def _decode_fast(self, data: bytes, channels: int) -> np.ndarray:
        """An 8-bit grey/RGB PNG as ``(channels, S, S)`` uint8."""
        if self.libpng:
            from torchvision.io import decode_png

            chw = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy()
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(img, dtype=np.uint8)
            chw = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        size = self.image_size
        if chw.shape[1:] == (size, size):
            return chw
        from PIL import Image

        hwc = chw[0] if channels == 1 else chw.transpose(1, 2, 0)
        resized = np.asarray(Image.fromarray(hwc).resize((size, size), Image.BILINEAR))
        return resized[None] if channels == 1 else resized.transpose(2, 0, 1)

    def decode(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Decode a batch to ``(B, C, S, S)`` uint8, C = 1 when every image is grey, else 3."""
        channels = [_png_layout(b) for b in encoded]
        if channels and all(c == 1 for c in channels):
            out = np.empty((len(encoded), 1, self.image_size, self.image_size), dtype=np.uint8)
        else:
            out = np.empty((len(encoded), 3, self.image_size, self.image_size), dtype=np.uint8)
        for i, (data, c) in enumerate(zip(encoded, channels)):
            out[i] = self._decode_fast(data, c) if c else self.decode_one(data)
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = batch["image"]
        out = np.empty((len(encoded), 3, self.image_size, self.image_size), dtype=np.uint8)
        self.transform(encoded, out)
        return {"image": out, "index": np.asarray(batch["index"], dtype=np.int64)}

    def transform(self, encoded: Sequence[bytes], out: np.ndarray,
                  rng: np.random.Generator | None = None) -> None:
        """Decode + augment ``encoded`` into ``out`` (``(B, 3, S, S)`` uint8) in place;
        the augmentation draws come from ``rng`` (default: a generator from ``seed``)."""
        self.augment_decoded(self.decode(encoded), out, rng)

    def augment_decoded(self, images: np.ndarray, out: np.ndarray,
                        rng: np.random.Generator | None = None) -> None:
        """Augment already decoded ``(B, C, S, S)`` uint8 ``images`` into ``out`` (C = 1 or 3).

        The second half of :meth:`transform`, with the same draws: the in-memory training
        path (:class:`MemoryEpochs`) augments images decoded once per search with it.
        """
        if self.augment == "none":
            out[...] = images  # grey (B, 1, S, S) broadcasts to three channels
        else:
            self._augment(images, rng if rng is not None else np.random.default_rng(self.seed), out)

    def _augment(self, images: np.ndarray, rng: np.random.Generator, out: np.ndarray) -> None:
        """Zero-padded random shift by up to ``pad`` pixels (+ horizontal flip for "flip").

        Same draws and result as padding by ``pad``, cropping at ``(dy, dx)`` and then
        flipping, without materialising the padded batch; writes into ``out`` (which may have
        3 channels where ``images`` has 1).
        """
        size, n = self.image_size, len(images)
        pad = max(1, size // 12)
        out[...] = 0
        offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))
        flips = rng.random(n) < 0.5 if self.augment == "flip" else np.zeros(n, dtype=bool)
        for i, ((dy, dx), flip) in enumerate(zip(offsets - pad, flips)):
            # crop[y, x] = image[y + dy, x + dx] where that lies inside the image, else 0;
            # flipped: out[y, x] = crop[y, size - 1 - x].
            src = images[i, :, max(0, dy) : size + min(0, dy), max(0, dx) : size + min(0, dx)]
            x0, x1 = max(0, -dx), size - max(0, dx)
            if flip:
                x0, x1, src = size - x1, size - x0, src[:, :, ::-1]
            out[i, :, max(0, -dy) : size - max(0, dy), x0:x1] = src


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 normalised images on the same device."""
    mean = torch.as_tensor(MEAN, device=images.device)
    std = torch.as_tensor(STD, device=images.device)
    return (images.float() / 255.0 - mean) / std


#: below this many bytes of shards, :func:`load_split` decodes with PIL rather than import
#: torchvision: PIL's 13-15% slower decode costs the 0.9 s of that import only after about
#: 6 s of decoding, some 600 MB of 224 px PNGs; half of that keeps a margin.
PIL_SPLIT_BYTES = 256 << 20


def load_split(files: Sequence[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode whole shards in-process: ``(N, 3, S, S)`` uint8 images and ``(N,)`` indices.

    A small split decodes with PIL unless torchvision is already imported (see
    ``Decoder.libpng``): the search driver and the trials decode train, val and test this way.
    """
    try:
        small = sum(os.path.getsize(path) for path in files) < PIL_SPLIT_BYTES
    except OSError:  # not a local file: let pyarrow read it (and say what is wrong)
        small = False
    decoder = Decoder(image_size, libpng=not small or "torchvision" in sys.modules)
    images, index = [], []
    for path in files:
        table = pq.read_table(path, columns=["index", "image"])
        out = decoder({"image": table.column("image").to_pylist(), "index": table.column("index")})
        images.append(out["image"])
        index.append(out["index"])
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(
            0, dtype=torch.int64
        )
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(index))


#: decoded pixels per task of the multi-epoch stream, and its largest block (bytes)
TASK_PIXELS = 1 << 23
MAX_BLOCK_BYTES = 1 << 27


def rows_per_task_for(image_size: int) -> int:
    """Rows per decode task of the training streams: at least 1,024 and about 8 Mpx.

    Large tasks keep Ray's per-task costs (scheduling, object-store put and get) small next
    to decoding; blocks are capped at 128 MB of decoded RGB uint8 (891 rows at 224 px).
    ``benchmarks/data_throughput.py --image-size S --rows-per-task N``, DataLoader = 1.0, on
    2 CPUs: at 48 px 512 rows 0.68x, 2,048 rows 0.89x, 4,096 rows 1.01x; at 160 px 256 rows
    0.75x, 512 rows 0.83-0.92x, 1,024 rows 1.11x.
    """
    pixels = max(1, image_size) ** 2
    return min(max(1024, TASK_PIXELS // pixels), max(256, MAX_BLOCK_BYTES // (3 * pixels)))


def task_pool(data_cpus: float):  # -> ray.data.TaskPoolStrategy
    """The compute strategy that runs about ``data_cpus`` one-CPU decode tasks at once.

    Ray Data 2.60 keeps only about half of a task pool's slots computing: measured here with
    the resource reservation off (:func:`configure_data_context`), a pool of 2 ran 1.0 task
    at a time on average, a pool of 4 ran 1.85 (200 ms tasks), because a task still counts
    against the pool until the executor has collected the end of its output stream. A pool
    of ``2 x data_cpus`` therefore spends the trial's data budget (never more than that many
    tasks at once, the hard bound); ``benchmarks/data_throughput.py`` measures the result.
    """
    import ray.data

    return ray.data.TaskPoolStrategy(size=max(1, math.ceil(2 * data_cpus)))


def local_first() -> dict[str, Any]:
    """Remote args that keep a trial's decode tasks on the trial's own node.

    Ray Data's default (``SPREAD``) sends them to every node with a free CPU: on a cluster
    (cluster.yaml) that is the head node, whose CPUs are meant for the drivers, and the decoded
    images then cross the network to the trial. With a soft node affinity that may spill,
    a task runs on the caller's node while it has a free CPU and elsewhere only when it has
    none (tests/test_multinode.py checks that no decode task runs on the head).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return {}
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(
        node, soft=True, _spill_on_unavailable=True)}


def configure_data_context(data_cpus: float) -> None:
    """Set up this process's Ray Data executions for a trial.

    * records the ``data_cpus`` budget as the executions' resource limit; the budget itself is
      enforced by the pipelines' task pool (:func:`task_pool`);
    * turns Ray Data's per-operator resource reservation off. With it on (the default), the
      reservation allocator's budget for the one decode operator dropped to zero CPUs and
      zero object-store bytes between task completions, so a 2-CPU pipeline ran 0.8-0.96
      tasks at once and reached 0.5-0.6x a DataLoader's images/s; with it off and the task
      pool as the bound, the stream reached the DataLoader's rate, and the output that runs
      ahead of a slow consumer stayed smaller (64 MB against 816 MB of 8 MB blocks in the
      same test), as the task pool's concurrency-cap policy applies backpressure;
    * uses the V1 Parquet datasource: with Ray 2.60's default V2 datasource every execution
      starts with a ``ListFiles`` task that cost about 2 s of wall time per epoch here (a
      0.5 s epoch of DigitsMLT became 2.6 s), measured with ``benchmarks/data_throughput.py``;
    * turns progress bars off (Tune shows trial progress).
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(cpu=data_cpus)
    ctx.op_resource_reservation_enabled = False
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False


def keep_data_coordinator_here() -> None:
    """Start Ray Data's autoscaling coordinator on this process's node (the head).

    Ray Data 2.60 creates one detached actor per cluster (``AutoscalingCoordinator``) on the
    node of the first execution that needs it, pinned there for good. Started by a trial,
    it lands on a (spot) GPU worker, and a node that hosts a live actor is never idle: the
    autoscaler then never releases that GPU node (tests/test_multinode.py). The search's
    driver calls this once before any trial starts, so the actor lives on the head.
    """
    try:  # Ray Data's internals of Ray 2.60 (pyproject pins it)
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
    except ImportError:  # another Ray version without this actor: nothing to place
        return
    get_or_create_autoscaling_coordinator()


@dataclass(frozen=True)
class _ShuffleDecode:
    """Fused read-task UDF: permute the block's rows, then decode them in chunks.

    The permutation and the augmentation draw from ``rng`` (default: fresh entropy, as in
    :func:`train_dataset`; the trials' stream passes a generator seeded from its plan).
    """

    decoder: Decoder
    chunk_rows: int

    def __call__(self, batch: dict[str, np.ndarray],
                 rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        rng = rng if rng is not None else np.random.default_rng()
        n, size = len(batch["index"]), self.decoder.image_size
        order = rng.permutation(n)
        encoded = np.asarray(batch["image"], dtype=object)[order]
        out = np.empty((n, 3, size, size), dtype=np.uint8)
        step = max(1, self.chunk_rows)
        for i in range(0, n, step):
            self.decoder.transform(encoded[i : i + step], out[i : i + step], rng)
        return {"image": out, "index": np.asarray(batch["index"], dtype=np.int64)[order]}


def train_dataset(
    files: Sequence[str],
    image_size: int,
    augment: str,
    decode_batch_size: int = 64,
    rows_per_task: int | None = None,
    data_cpus: float = 1.0,
):  # -> ray.data.Dataset
    """The Ray Data training pipeline (lazy): read shards, decode and augment, one task per block.

    ``read_parquet`` (file order shuffled every execution, about ``rows_per_task`` rows of
    whole files per read task, by default :func:`rows_per_task_for` the image size) fuses
    with the decode ``map_batches`` (``batch_size=None``: the UDF gets the task's whole
    block), so a task reads its files, permutes their rows and
    decodes + augments them ``decode_batch_size`` rows at a time; only decoded images go
    through the object store. Fewer, larger tasks keep Ray's per-task cost (scheduling,
    object-store puts, the driver's executor loop) small next to decoding, and the in-block
    permutation over several random shards replaces most of a local shuffle buffer
    (``iter_train_batches`` still mixes across blocks).
    """
    import ray.data

    files = list(files)
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    rows_per_task = rows_per_task or rows_per_task_for(image_size)
    tasks = min(len(files), max(1, -(-rows // max(1, rows_per_task))))
    ds = ray.data.read_parquet(
        files, columns=["index", "image"], shuffle="files", override_num_blocks=tasks
    )
    return ds.map_batches(
        _ShuffleDecode(Decoder(image_size, augment), decode_batch_size),
        batch_format="numpy",
        batch_size=None,
        zero_copy_batch=True,
        compute=task_pool(data_cpus),
    )


@dataclass(frozen=True)
class _ReadShuffleDecode:
    """UDF of :func:`epochs_dataset`: read one task's shards, keep this rank's rows, permute,
    decode and augment (draws seeded by the task's ``split_seed`` and the rank), tag the epoch
    and the task's ``part`` (its place in the epoch's plan)."""

    decoder: Decoder
    chunk_rows: int
    rank: int = 0
    world: int = 1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, index, epoch, part = [], [], [], []
        for e, k, files, split_seed in zip(batch["epoch"], batch["part"], batch["files"],
                                           batch["split_seed"]):
            tables = [pq.read_table(str(f), columns=["index", "image"]) for f in files]
            encoded = [b for t in tables for b in t.column("image").to_pylist()]
            rows = np.concatenate([t.column("index").to_numpy() for t in tables])
            if self.world > 1:  # the same permutation on every rank: disjoint, balanced rows
                mine = np.random.default_rng(int(split_seed)).permutation(len(rows))
                mine = np.sort(mine[self.rank :: self.world])
                encoded, rows = [encoded[i] for i in mine], rows[mine]
            rng = np.random.default_rng([int(split_seed), self.rank])
            out = _ShuffleDecode(self.decoder, self.chunk_rows)({"image": encoded, "index": rows},
                                                                rng)
            images.append(out["image"])
            index.append(out["index"])
            epoch.append(np.full(len(rows), int(e), dtype=np.int64))
            part.append(np.full(len(rows), int(k), dtype=np.int64))
        return {"image": np.concatenate(images), "index": np.concatenate(index),
                "epoch": np.concatenate(epoch), "part": np.concatenate(part)}


def plan_epochs(
    files: Sequence[str],
    image_size: int,
    epochs: Sequence[int],
    rows_per_task: int | None = None,
    seed: int | None = None,
    rank: int = 0,
    world: int = 1,
    counts: Sequence[int] | None = None,
) -> list[dict]:
    """The tasks of :func:`epochs_dataset`: ``{epoch, part, files, split_seed, rows}`` per task.

    ``counts`` (rows of each file, when the caller knows them) saves reading the shards'
    Parquet footers.

    Each epoch puts the shards in a random order and groups them into tasks of about
    ``rows_per_task`` rows; ``part`` numbers an epoch's tasks from 0 (the order in which
    :class:`EpochStream` delivers them), and ``split_seed`` also seeds the task's in-block
    permutation and augmentation draws. With ``world > 1`` each task's rows are dealt to the ranks by a
    permutation that every rank draws alike (``split_seed``), so the ranks' rows are
    disjoint and their counts differ by at most one per task; ``rows`` is this rank's share.
    The plan of an epoch depends only on ``(seed, epoch)`` (a resumed worker plans its
    epochs as the others do), which is why several ranks need the same, explicit ``seed``;
    trials always pass one (``train.seed``), so a trial's epochs are the same in every run.
    """
    files = [str(f) for f in files]
    if not files:
        raise ValueError("no training shards to stream")
    if world > 1 and seed is None:
        raise ValueError("a stream split over several ranks needs a seed shared by all ranks")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} workers")
    if counts is None:
        counts = [pq.read_metadata(f).num_rows for f in files]
    rows_per_task = rows_per_task or rows_per_task_for(image_size)
    tasks = min(len(files), max(1, -(-sum(counts) // max(1, rows_per_task))))
    shared = np.random.default_rng() if seed is None else None  # unseeded: one generator
    items = []
    for epoch in epochs:
        rng = shared if shared is not None else np.random.default_rng([seed, int(epoch)])
        order = rng.permutation(len(files))
        for part, group in enumerate(np.array_split(order, tasks)):
            n = sum(counts[i] for i in group)
            items.append({"epoch": int(epoch), "part": part, "files": [files[i] for i in group],
                          "split_seed": int(rng.integers(2**62)),
                          "rows": len(range(rank, n, world))})
    return items


def epochs_dataset(
    files: Sequence[str],
    image_size: int,
    augment: str,
    epochs: Sequence[int],
    decode_batch_size: int = 64,
    rows_per_task: int | None = None,
    seed: int | None = None,
    data_cpus: float = 1.0,
    rank: int = 0,
    world: int = 1,
):  # -> ray.data.Dataset
    """Several training epochs as ONE Ray Data execution (see :class:`EpochStream`).

    The same work as :func:`train_dataset` per epoch (whole shards in a fresh random order
    each epoch, about ``rows_per_task`` rows per task, by default :func:`rows_per_task_for`
    the image size, rows permuted within a task, decode + augment), planned here for every
    epoch in ``epochs`` at once (:func:`plan_epochs`): each task is one ``(epoch, shard
    group)`` and tags its rows with the epoch. One execution pays Ray Data's
    start-up and end-of-epoch drain once instead of every epoch, and decodes the next epoch
    while the loop validates and checkpoints. The tasks run on the caller's node while it
    has free CPUs (:func:`local_first`).

    With ``world > 1`` this is rank ``rank``'s part of a multi-worker trial's stream: every
    rank runs its own execution over the same plan (same ``seed``) and decodes only its rows
    of each task (disjoint across ranks, together every row of the epoch); each rank reads
    the encoded bytes of all shards, but decodes only its own share.
    """
    import ray.data

    items = plan_epochs(files, image_size, epochs, rows_per_task, seed, rank, world)
    items = [{k: v for k, v in item.items() if k != "rows"} for item in items]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        _ReadShuffleDecode(Decoder(image_size, augment), decode_batch_size, rank, world),
        batch_format="numpy",
        batch_size=None,
        zero_copy_batch=True,
        compute=task_pool(data_cpus),
        **local_first(),
    )


class EpochStream:
    """Consecutive epochs' decoded blocks from one Ray Data execution, in the planned order.

    Blocks arrive in completion order, so a block of epoch ``e + 1`` may come before the
    last of epoch ``e``: it is kept aside (with Ray Data's backpressure, at most a few
    blocks) until its epoch is asked for. :meth:`blocks` yields exactly the rows of one
    epoch (counted against the plan), so every image appears once per epoch as with a
    per-epoch execution. Epochs must be asked for in order; asking for another one (a
    resumed trial starts later) starts a new execution from that epoch.

    **Order.** When the plan gives each epoch's rows per task (``rows_per_epoch`` returns a
    sequence, indexed by the tasks' ``part`` tags, :func:`plan_epochs`), blocks are delivered
    in that order whatever order they finish in: a task that finishes early waits (in this
    process) until the tasks planned before it are delivered. What a trial trains on then
    depends on its plan (``(seed, epoch)``) only, not on Ray's scheduling. ``ordered=False``
    delivers in arrival order (the cost comparison of ``benchmarks/determinism_cost.py``).

    Args:
        make_dataset: ``epochs -> ray.data.Dataset`` (e.g. :func:`epochs_dataset` bound to
            the shards), called with ``range(first, last_epoch)``.
        rows_per_epoch: training rows of one epoch, or ``epoch -> rows`` where they differ
            per epoch, or ``epoch -> [rows of part 0, rows of part 1, ...]`` (this rank's
            rows of each planned task) for delivery in the planned order.
        last_epoch: the epoch budget (exclusive end).
        ordered: deliver the parts in their planned order (when the plan gives them).
    """

    def __init__(self, make_dataset, rows_per_epoch: int | Callable[[int], int | Sequence[int]],
                 last_epoch: int, prefetch: int = 2, ordered: bool = True) -> None:
        self.make_dataset = make_dataset
        self._rows = rows_per_epoch if callable(rows_per_epoch) else (
            lambda epoch, n=int(rows_per_epoch): n)
        self.last_epoch = int(last_epoch)
        self.prefetch = prefetch
        self.ordered = ordered
        self.next_epoch: int | None = None
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._stash: dict[int, list[dict[str, np.ndarray]]] = {}

    def _start(self, epoch: int) -> None:
        self.close()
        ds = self.make_dataset(range(epoch, max(epoch + 1, self.last_epoch)))
        self._it = iter(ds.iter_batches(batch_size=None, batch_format="numpy",
                                        prefetch_batches=self.prefetch))
        self._stash = {}

    def close(self) -> None:
        """Stop the running execution (its tasks and buffered blocks are released)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def blocks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        """The blocks (``image``, ``index``) of ``epoch``, in planned (or arrival) order."""
        if self._it is None or epoch != self.next_epoch:
            self._start(epoch)
        self.next_epoch = epoch + 1
        plan = self._rows(epoch)
        if isinstance(plan, (int, np.integer)):
            return _strip(self._arrivals(epoch, int(plan)))
        parts = [int(n) for n in plan]
        pieces = self._arrivals(epoch, sum(parts))
        return _strip(_in_planned_order(pieces, parts) if self.ordered else pieces)

    def _arrivals(self, epoch: int, expected: int) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``epoch`` in arrival order (rows of later epochs are kept aside)."""
        got = 0
        for block in self._stash.pop(epoch, []):
            got += len(block["index"])
            yield block
        while got < expected:
            try:
                block = next(self._it)
            except StopIteration:
                self._it = None
                raise RuntimeError(
                    f"the training stream ended after {got} of {expected} rows of "
                    f"epoch {epoch}; were the shards changed during the trial?"
                ) from None
            tags = np.asarray(block["epoch"], dtype=np.int64)
            for e in np.unique(tags).tolist():
                part = block if (tags == e).all() else {k: v[tags == e] for k, v in block.items()}
                part = {k: v for k, v in part.items() if k != "epoch"}
                if e == epoch:
                    got += len(part["index"])
                    yield part
                elif e > epoch:
                    self._stash.setdefault(e, []).append(part)
                # e < epoch: rest of an epoch the consumer abandoned; dropped
        if got > expected:
            raise RuntimeError(f"epoch {epoch} streamed {got} rows, expected {expected}")


def _strip(pieces: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    for piece in pieces:
        yield {"image": piece["image"], "index": piece["index"]}


def _in_planned_order(pieces: Iterable[dict[str, np.ndarray]],
                      rows: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
    """Re-order one epoch's ``part``-tagged pieces (arrival order) into part order.

    ``rows[k]`` is the number of rows of part ``k``; the pieces of one part keep their
    arrival order (a task's blocks arrive in the order it produced them). A piece waits
    until every part before its own is complete.
    """
    left, waiting, current = list(rows), {}, 0

    def ready() -> Iterator[dict[str, np.ndarray]]:
        nonlocal current
        while current < len(left):
            for piece in waiting.pop(current, []):
                left[current] -= len(piece["index"])
                yield piece
            if left[current] > 0:
                return
            if left[current] < 0:
                raise RuntimeError(f"part {current} of the epoch streamed more rows than planned")
            current += 1

    for piece in pieces:
        if "part" not in piece:
            raise RuntimeError("the stream's blocks carry no `part` tag; the planned order "
                               "needs epochs_dataset's blocks (or ordered=False)")
        tags = np.asarray(piece["part"], dtype=np.int64)
        for k in np.unique(tags).tolist():
            waiting.setdefault(k, []).append(
                piece if (tags == k).all() else {n: v[tags == k] for n, v in piece.items()})
        yield from ready()
    yield from ready()
    if waiting or current < len(left):
        raise RuntimeError(f"the epoch's parts {sorted(waiting)} did not match its plan")


def sample_repeats(weights: np.ndarray, seed: int, draws: int | None = None) -> np.ndarray:
    """``(N,)`` multiplicities of one epoch drawn with replacement in proportion to ``weights``.

    The epoch has ``draws`` draws (default: as many as images, N), like PyTorch's
    ``WeightedRandomSampler(weights, draws, replacement=True)``; deterministic per ``seed``.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1 or not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("sample weights must be a finite, non-negative (N,) vector")
    total = weights.sum()
    if total <= 0:
        raise ValueError("sample weights sum to zero; at least one image needs a positive weight")
    draws = len(weights) if draws is None else int(draws)
    if draws < 1:
        raise ValueError(f"an epoch needs at least one draw, got draws={draws}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(draws, weights / total).astype(np.int64)


def iter_train_batches(
    dataset,
    batch_size: int,
    shuffle_buffer: int = 512,
    prefetch: int = 2,
    repeats: np.ndarray | None = None,
    views: Mapping[str, np.ndarray] | None = None,
    rng: np.random.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``{image: uint8 (B,3,S,S), index: int64 (B,)}`` torch batches.

    ``dataset`` is a Ray Dataset (or a worker's shard of one), run for one epoch, or an
    iterable of its decoded blocks (:meth:`EpochStream.blocks`).

    Whole decoded blocks are pulled from the dataset (``prefetch`` blocks ahead) into a local
    shuffle buffer with the semantics of Ray Data's ``local_shuffle_buffer_size``: once at
    least ``shuffle_buffer + batch_size`` rows are buffered, random rows are drawn from the
    buffer as whole batches, leaving at least ``shuffle_buffer`` rows behind; at the end of
    the epoch the buffer drains in random order. Every row is yielded exactly once and only
    the last batch may be short. The buffer holds (block, row) positions only: each image is
    copied once, from its block in the object store straight into its batch (Ray's own
    buffer concatenates and re-slices Arrow blocks, about 10% of an epoch here). Within a
    batch, rows are grouped by source block. ``shuffle_buffer=0`` keeps the dataset's order
    (rows are already permuted within each block by :func:`train_dataset`).

    ``repeats`` (``(N,)`` multiplicities by image index, :func:`sample_repeats`) re-weights the
    epoch. ``views`` maps a view name to its own ``(N,)`` multiplicities (a dataset-level
    sampler of a method, e.g. COMIC's reversed and class-balanced views): every batch then
    also carries ``<name>_image`` and ``<name>_index``, up to ``batch_size`` rows drawn from
    that view's own shuffle buffer, so a view sees any image of the epoch, not only the
    batch's. Batches are drawn once every buffer holds ``shuffle_buffer + batch_size`` rows;
    at the end the main rows drain and each view gives what it has left (a view whose draws
    ran out before the main rows, e.g. on one worker's shard, gives fewer or no rows;
    leftover view rows are dropped). A repeated image carries the augmentation of its one
    decode in this epoch. The buffers' draws come from ``rng`` (default: NumPy's global
    generator); with a seeded ``rng`` and blocks in a fixed order (:class:`EpochStream`) the
    batches are the same in every run.
    """
    names = ["", *(views or {})]
    mult = {"": repeats, **(views or {})}
    permutation = rng.permutation if rng is not None else np.random.permutation
    blocks: dict[int, dict[str, np.ndarray]] = {}
    left: dict[int, int] = {}  # rows of each block not yielded yet (all views)
    pools = {v: np.empty((0, 2), dtype=np.int64) for v in names}  # buffered (block id, row)

    def gather(chosen: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        if not len(chosen):
            return None, np.empty(0, dtype=np.int64)
        chosen = chosen[np.argsort(chosen[:, 0], kind="stable")]
        ids, first, counts = np.unique(chosen[:, 0], return_index=True, return_counts=True)
        sample = blocks[int(ids[0])]["image"]
        image = np.empty((len(chosen), *sample.shape[1:]), dtype=sample.dtype)
        index = np.empty(len(chosen), dtype=np.int64)
        for block_id, lo, count in zip(ids.tolist(), first.tolist(), counts.tolist()):
            rows, block = chosen[lo : lo + count, 1], blocks[block_id]
            np.take(block["image"], rows, axis=0, out=image[lo : lo + count], mode="clip")
            index[lo : lo + count] = block["index"][rows]
            left[block_id] -= count
            if not left[block_id]:
                del blocks[block_id], left[block_id]
        return image, index

    def draw(final: bool) -> Iterator[dict[str, torch.Tensor]]:
        if final:
            emit = len(pools[""])
        else:
            emit = min((len(p) - shuffle_buffer) // batch_size for p in pools.values())
            emit *= batch_size
        taken = {}
        for v in names:
            pool = pools[v]
            if shuffle_buffer > 0:
                pool = pool[permutation(len(pool))]
            taken[v], pools[v] = pool[:emit], pool[emit:]
        for start in range(0, emit, batch_size):
            image, index = gather(taken[""][start : start + batch_size])
            out = {"image": torch.from_numpy(image), "index": torch.from_numpy(index)}
            for v in names[1:]:
                v_image, v_index = gather(taken[v][start : start + batch_size])
                if v_image is None:
                    v_image = np.empty((0, *image.shape[1:]), dtype=image.dtype)
                out[f"{v}_image"] = torch.from_numpy(v_image)
                out[f"{v}_index"] = torch.from_numpy(v_index)
            yield out

    if hasattr(dataset, "iter_batches"):
        batches = dataset.iter_batches(batch_size=None, batch_format="numpy",
                                       prefetch_batches=prefetch)
    else:  # already an iterable of decoded blocks (EpochStream.blocks)
        batches = dataset
    for block_id, block in enumerate(batches):
        n = len(block["index"])
        if not n:
            continue
        added = 0
        for v in names:
            rows = np.arange(n, dtype=np.int64)
            if mult[v] is not None:
                rows = np.repeat(rows, mult[v][np.asarray(block["index"], dtype=np.int64)])
            if len(rows):
                pos = np.stack([np.full(len(rows), block_id), rows], axis=1)
                pools[v] = np.concatenate([pools[v], pos])
                added += len(rows)
        if not added:
            continue
        blocks[block_id], left[block_id] = block, added
        if all(len(p) >= shuffle_buffer + batch_size for p in pools.values()):
            yield from draw(final=False)
    if len(pools[""]):
        yield from draw(final=True)
