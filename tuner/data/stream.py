"""Decoding, augmentation and the Ray Data training stream.

The training split streams from the Parquet shards with Ray Data: ``read_parquet`` (file order
shuffled each epoch) -> ``map_batches`` (decode + augment on CPU, NumPy) ->
``iter_torch_batches`` (with a local shuffle buffer) into the training loop. Batches carry only
``image`` and ``index``; the loop looks the labels up by ``index`` in the trial's label table, so
label views and methods that correct labels never touch the stream.

Evaluation splits are decoded once per trial into an in-memory uint8 tensor
(:func:`load_split`), using the same decoder without augmentation.

CPU budget: each trial's Ray Data pipeline is capped at ``data_cpus`` logical CPUs through the
DataContext resource limits, so trials x (training CPUs + data CPUs) fit the node and data
tasks cannot be starved by the trials themselves (see the README's "CPU budget").
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.25, 0.25, 0.25], dtype=np.float32).reshape(1, 3, 1, 1)


@dataclass(frozen=True)
class Decoder:
    """Decode encoded images to ``(B, 3, S, S)`` uint8, with optional training augmentation.

    Args:
        image_size: output side S (images are resized when they differ).
        augment: ``"none"``, ``"shift"`` (random translation by up to S/12 pixels, for
            digits) or ``"flip"`` (shift plus horizontal flip, for natural images).
        seed: seed of the augmentation generator (None: fresh entropy per batch).
    """

    image_size: int
    augment: str = "none"
    seed: int | None = None

    def decode_one(self, data: bytes) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([self.decode_one(bytes(b)) for b in batch["image"]])
        if self.augment != "none":
            images = self._augment(images, np.random.default_rng(self.seed))
        return {"image": images, "index": np.asarray(batch["index"], dtype=np.int64)}

    def _augment(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pad = max(1, self.image_size // 12)
        padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        out = np.empty_like(images)
        offsets = rng.integers(0, 2 * pad + 1, size=(len(images), 2))
        flips = rng.random(len(images)) < 0.5 if self.augment == "flip" else np.zeros(len(images))
        for i, ((dy, dx), flip) in enumerate(zip(offsets, flips)):
            crop = padded[i, :, dy : dy + self.image_size, dx : dx + self.image_size]
            out[i] = crop[:, :, ::-1] if flip else crop
        return out


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float32 normalised images on the same device."""
    mean = torch.as_tensor(MEAN, device=images.device)
    std = torch.as_tensor(STD, device=images.device)
    return (images.float() / 255.0 - mean) / std


def load_split(files: Sequence[str], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode whole shards in-process: ``(N, 3, S, S)`` uint8 images and ``(N,)`` indices."""
    decoder = Decoder(image_size)
    images, index = [], []
    for path in files:
        table = pq.read_table(path, columns=["index", "image"])
        out = decoder({"image": table.column("image").to_pylist(), "index": table.column("index")})
        images.append(out["image"])
        index.append(out["index"])
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(index))


def configure_data_context(data_cpus: float) -> None:
    """Set up this process's Ray Data executions for a trial.

    * caps them at ``data_cpus`` logical CPUs (so concurrent trials cannot starve each
      other's read tasks);
    * uses the V1 Parquet datasource: with Ray 2.60's default V2 datasource every execution
      starts with a ``ListFiles`` task that cost about 2 s of wall time per epoch here (a
      0.5 s epoch of DigitsMLT became 2.6 s), measured with ``benchmarks/data_throughput.py``;
    * turns progress bars off (Tune shows trial progress).
    """
    from ray.data import DataContext, ExecutionResources

    ctx = DataContext.get_current()
    ctx.execution_options.resource_limits = ExecutionResources(cpu=data_cpus)
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False


def train_dataset(
    files: Sequence[str],
    image_size: int,
    augment: str,
    decode_batch_size: int = 64,
):  # -> ray.data.Dataset
    """The Ray Data training pipeline (lazy): read shards, decode and augment in batches."""
    import ray.data

    ds = ray.data.read_parquet(list(files), shuffle="files")
    return ds.map_batches(
        Decoder(image_size, augment),
        batch_format="numpy",
        batch_size=decode_batch_size,
        zero_copy_batch=True,
    )


def iter_train_batches(
    dataset, batch_size: int, shuffle_buffer: int = 512, prefetch: int = 2
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of ``{image: uint8 (B,3,S,S), index: int64 (B,)}`` torch batches."""
    yield from dataset.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=shuffle_buffer,
        prefetch_batches=prefetch,
        drop_last=False,
    )
