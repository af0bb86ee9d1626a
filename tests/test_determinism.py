"""Deterministic trials: a trial's batches and metrics depend on its configuration and
``train.seed`` only (issue 18).

* the stream delivers an epoch's tasks in their planned order whatever order they finish in,
  and the shuffle buffer draws from a seeded generator, so the batches are the same;
* a task's permutation and augmentation draws come from its plan (the same pixels again);
* the real loop on the real Ray Data stream, run twice, gives identical per-epoch metrics,
  and a run interrupted mid-epoch and restarted from its checkpoint file gives the same
  metrics as the uninterrupted one.

Two Tune trials of the same configuration (1 worker) are compared in
``tests/test_repeats.py``; two 2-worker trials in ``tests/test_multiworker.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tuner.data.corruption import ViewSpec
from tuner.data.memory import MemoryEpochs, decode_split, memory_block
from tuner.data.prepared import PreparedData
from tuner.data.stream import (
    Decoder,
    EpochStream,
    _in_planned_order,
    _ReadShuffleDecode,
    configure_data_context,
    epochs_dataset,
    iter_train_batches,
    plan_epochs,
)
from tuner.trainable import (
    STATE_FILE,
    TrialSetup,
    _epoch_stream,
    _method_and_model,
    build_train_data,
    data_path_of,
    load_state_file,
    train_config,
)

IMAGE_SIZE = 24
#: metrics that measure time or memory, not training
TIMING = {"train_time", "data_wait_time", "eval_time", "peak_rss_mb", "startup_time"}


def _pieces(rows: list[int]) -> list[dict[str, np.ndarray]]:
    """Part-tagged pieces of one epoch in planned order; part 1 split into two pieces."""
    out, start = [], 0
    for k, n in enumerate(rows):
        index = np.arange(start, start + n)
        image = (index % 251).astype(np.uint8).reshape(-1, 1, 1, 1) * np.ones((1, 3, 2, 2), np.uint8)
        piece = {"image": image, "index": index, "part": np.full(n, k)}
        if k == 1:
            out += [{key: v[:3] for key, v in piece.items()}, {key: v[3:] for key, v in piece.items()}]
        else:
            out.append(piece)
        start += n
    return out


def test_parts_are_delivered_in_planned_order_whatever_the_arrival() -> None:
    rows = [5, 7, 0, 4, 6]  # a rank's share of a task may be empty
    planned = _pieces(rows)
    arrivals = [planned[i] for i in (4, 1, 0, 3, 2, 5)]  # part 1's pieces stay in order
    mixed = {key: np.concatenate([arrivals[0][key], arrivals[3][key]]) for key in planned[0]}
    arrivals = [mixed] + [arrivals[i] for i in (1, 2, 4, 5)]  # one block holding two parts
    delivered = list(_in_planned_order(arrivals, rows))
    np.testing.assert_array_equal(np.concatenate([p["index"] for p in delivered]),
                                  np.arange(sum(rows)))

    def batches(pieces: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        blocks = [{"image": p["image"], "index": p["index"]} for p in pieces]
        rng = np.random.default_rng([3, 1, 1])
        return [b["index"].numpy() for b in iter_train_batches(blocks, 4, shuffle_buffer=8, rng=rng)]

    reference = batches(list(_in_planned_order(planned, rows)))
    again = batches(delivered)
    assert len(reference) == len(again) == math.ceil(sum(rows) / 4)
    for a, b in zip(reference, again):
        np.testing.assert_array_equal(a, b)
    unordered = batches(arrivals)  # arrival order: other batches (the failure this prevents)
    assert any(not np.array_equal(a, b) for a, b in zip(reference, unordered))
    with pytest.raises(RuntimeError, match="did not match its plan"):
        list(_in_planned_order(planned[:-1], rows))


def test_a_task_decodes_the_same_pixels_from_its_plan(digits_dir: Path) -> None:
    files = PreparedData(digits_dir).shard_files("train")
    plan = plan_epochs(files, IMAGE_SIZE, [0, 1], rows_per_task=128, seed=7)
    assert plan == plan_epochs(files, IMAGE_SIZE, [0, 1], rows_per_task=128, seed=7)
    assert plan != plan_epochs(files, IMAGE_SIZE, [0, 1], rows_per_task=128, seed=8)
    assert [p["part"] for p in plan if p["epoch"] == 1] == list(range(len(plan) // 2))
    item = plan[0]
    batch = {key: np.asarray([item[key]], dtype=object) for key in ("epoch", "part", "files",
                                                                     "split_seed")}
    udf = _ReadShuffleDecode(Decoder(IMAGE_SIZE, "shift"), 64)
    first, second = udf(batch), udf(batch)
    for key in ("image", "index", "part"):
        np.testing.assert_array_equal(first[key], second[key])
    rows = sum(pq.read_metadata(f).num_rows for f in item["files"])
    assert len(first["index"]) == rows
    assert not np.array_equal(first["index"], np.sort(first["index"]))  # permuted
    other = udf({**batch, "split_seed": np.asarray([item["split_seed"] + 1], dtype=object)})
    assert not np.array_equal(first["image"], other["image"])


@pytest.mark.integration
def test_the_stream_delivers_an_epochs_tasks_in_planned_order(digits_dir: Path,
                                                              ray_local: None) -> None:
    """Many small tasks through Ray Data (two decode tasks at once): each epoch's rows and
    pixels equal the plan's tasks decoded one after the other in this process."""
    files = PreparedData(digits_dir).shard_files("train")
    configure_data_context(1)
    plan = plan_epochs(files, IMAGE_SIZE, range(2), rows_per_task=64, seed=5)
    rows = {e: [p["rows"] for p in plan if p["epoch"] == e] for e in range(2)}
    assert len(rows[0]) >= 8
    stream = EpochStream(lambda epochs: epochs_dataset(
        files, IMAGE_SIZE, "shift", epochs, rows_per_task=64, seed=5), rows.__getitem__, 2)
    udf = _ReadShuffleDecode(Decoder(IMAGE_SIZE, "shift"), 64)
    try:
        for epoch in range(2):
            blocks = list(stream.blocks(epoch))
            expected = [udf({key: np.asarray([p[key]], dtype=object)
                             for key in ("epoch", "part", "files", "split_seed")})
                        for p in plan if p["epoch"] == epoch]
            for key in ("index", "image"):
                np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]),
                                              np.concatenate([e[key] for e in expected]))
    finally:
        stream.close()


@pytest.mark.parametrize("world", [1, 2])
def test_the_memory_path_gives_the_streams_blocks(digits_dir: Path, world: int) -> None:
    """Splits decoded once and augmented per task in the trial (the in-memory path) give
    every rank the same rows, order and pixels as the stream's read + decode tasks."""
    files = PreparedData(digits_dir).shard_files("train")
    split = decode_split(files, IMAGE_SIZE)
    decoder = Decoder(IMAGE_SIZE, "shift")
    keys = ("epoch", "part", "files", "split_seed")
    for rank in range(world):
        udf = _ReadShuffleDecode(decoder, 64, rank, world)
        plan = plan_epochs(files, IMAGE_SIZE, [0, 3], rows_per_task=128, seed=7, rank=rank,
                           world=world)
        assert len(plan) >= 8
        for item in plan:
            streamed = udf({key: np.asarray([item[key]], dtype=object) for key in keys})
            block = memory_block(split, item, decoder, rank, world)
            assert len(block["index"]) == item["rows"]
            for key in ("index", "image"):
                np.testing.assert_array_equal(block[key], streamed[key])
        epochs = MemoryEpochs(split, IMAGE_SIZE, "shift", seed=7, rank=rank, world=world)
        default_plan = plan_epochs(files, IMAGE_SIZE, [2], seed=7, rank=rank, world=world)
        expected = [udf({key: np.asarray([p[key]], dtype=object) for key in keys})
                    for p in default_plan]
        got = list(epochs.blocks(2))
        for key in ("index", "image"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in got]),
                                          np.concatenate([e[key] for e in expected]))


# ---------------------------------------------------------------- the loop on the real stream
class _Interrupted(Exception):
    pass


def _fit(digits_dir: Path, state_file: Path, resume: dict[str, Any] | None = None,
         stop_in_epoch: int | None = None, memory: bool = False) -> dict[int, dict[str, Any]]:
    """One trial's loop as the Tune trainable runs it (without Tune): per-epoch metrics.

    ``stop_in_epoch``: raise after 3 training batches of that epoch (0-based), as a trial
    killed mid-epoch; the last end-of-epoch state is in ``state_file``. ``memory``: train
    and validate on splits decoded once and shared through the object store, as
    :func:`tuner.trainable.share_splits` does for a search.
    """
    import ray

    from tuner.loop import fit

    shared = {}
    if memory:
        files = PreparedData(digits_dir).shard_files
        shared = {s: ray.put(decode_split(files(s), IMAGE_SIZE)) for s in ("train", "val")}
    setup = TrialSetup(method="splc", data_dir=str(digits_dir), view=ViewSpec("clean", 0.0, 0),
                       max_epochs=2, groups=PreparedData(digits_dir).groups(), shared=shared)
    config = {"train": {"lr": 2e-3, "batch_size": 64, "seed": 11}, "method": {"change_epoch": 1}}
    cfg = train_config(config, setup)
    data = PreparedData(setup.data_dir)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    stream = _epoch_stream(data, cfg, setup)
    assert data_path_of(stream) == ("memory" if memory else "stream")
    train_data = build_train_data(setup, cfg, data, observed, stream, cfg.batch_size)
    if stop_in_epoch is not None:
        batches = train_data.train_batches

        def killed(epoch: int, weights: Any) -> Any:
            for n, batch in enumerate(batches(epoch, weights)):
                if epoch == stop_in_epoch and n == 3:
                    raise _Interrupted
                yield batch

        train_data.train_batches = killed
    metrics: dict[int, dict[str, Any]] = {}

    def report(m: dict[str, Any], state: dict[str, Any]) -> None:
        metrics[m["epoch"]] = {k: v for k, v in m.items() if k not in TIMING}
        torch.save(state, state_file)

    try:
        fit(method, model, cfg, train_data, report, resume=resume, device=torch.device("cpu"))
    except _Interrupted:
        pass
    finally:
        stream.close()
    return metrics


@pytest.mark.integration
def test_loop_runs_repeat_and_an_interrupted_run_resumes_identically(
    digits_dir: Path, ray_local: None, tmp_path: Path
) -> None:
    torch.set_num_threads(1)
    for name in "abc":
        (tmp_path / name).mkdir()
    first = _fit(digits_dir, tmp_path / "a" / STATE_FILE)
    second = _fit(digits_dir, tmp_path / "b" / STATE_FILE)
    assert sorted(first) == [1, 2]
    assert first == second, "the same configuration and seed trained differently"

    killed = tmp_path / "c" / STATE_FILE
    partial = _fit(digits_dir, killed, stop_in_epoch=1)  # killed in the second epoch
    assert sorted(partial) == [1]
    resumed = _fit(digits_dir, killed, resume=load_state_file(killed))
    assert sorted(resumed) == [2]
    assert {1: partial[1], **resumed} == first

    # splits decoded once per search (the in-memory path): the same metrics, and a trial
    # killed mid-epoch on it resumes to them as well
    assert _fit(digits_dir, tmp_path / "a" / STATE_FILE, memory=True) == first
    partial = _fit(digits_dir, killed, stop_in_epoch=1, memory=True)
    resumed = _fit(digits_dir, killed, resume=load_state_file(killed), memory=True)
    assert {1: partial[1], **resumed} == first
