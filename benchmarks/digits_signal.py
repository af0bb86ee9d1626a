"""Does DigitsMLT separate configurations and methods, or only seeds? (issue 18, item 3)

Trains in-process (no Ray) with the trials' own pieces: the prepared DigitsMLT, the corruption
views, :func:`tuner.trainable.task_info` and ``_method_and_model``, and :func:`tuner.loop.fit`
for the space's ``asha.max_epochs``. Training batches come from the decoded split in memory
with the trials' shift augmentation, drawn from ``(train.seed, epoch)``, so every run is
deterministic. It prints

* **(a)** BCE at its default configuration (the space's constants, ``TrainConfig``'s defaults
  for the searched knobs) on clean labels: best validation mAP over ``--seeds`` train seeds,
  mean and standard deviation (targets: mean >= 90, std <= 0.5);
* **(b)** the Spearman correlation of two train seeds' best validation mAP over ``--configs``
  random configurations of ``--space`` (Hill in its regime; target >= 0.9);
* **(c)** BCE, Hill and SPLC at their defaults in the Hill space's regime (missing labels,
  q = 0.6), over ``--method-seeds`` seeds.

Each finished run is appended to ``--out`` (JSON lines); a second invocation with the same file
skips the runs it already holds, so an interrupted measurement continues. ``--workers``
processes train at once, each with one torch thread: the figures do not depend on it.

    python benchmarks/digits_signal.py --out digits_signal.jsonl --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _search import random_configs

from tuner.data.corruption import ViewSpec
from tuner.data.prepared import PreparedData, ensure_prepared
from tuner.data.stream import Decoder, load_split
from tuner.loop import TrainConfig, TrainData, fit
from tuner.space import Domain, load_space
from tuner.trainable import TrialSetup, _method_and_model, train_config

CLEAN = ViewSpec("clean", 0.0, 0)


@dataclass(frozen=True)
class Run:
    """One training run: a tag for the report, the method, its trial config and label view."""

    tag: str
    method: str
    config: Mapping[str, Any]
    view: ViewSpec

    def key(self) -> str:
        return json.dumps([self.tag, self.method, self.config, self.view.name], sort_keys=True)


def in_memory_batches(data: PreparedData, cfg: TrainConfig, n: int):  # -> Callable
    """The loop's ``train_batches``: each image once per epoch, shuffled, shift-augmented,
    all drawn from ``(cfg.seed, epoch)`` (no method here asks for re-weighted epochs)."""
    images, index = load_split(data.shard_files("train"), cfg.image_size)
    order = torch.argsort(index)
    grey = images[order][:, :1].numpy()
    decoder = Decoder(cfg.image_size, augment=data.manifest["image"].get("augment", "shift"))

    def batches(epoch: int, weights: Any, **_: Any) -> Iterator[dict[str, torch.Tensor]]:
        if weights is not None:
            raise ValueError("digits_signal.py runs methods without sample weights only")
        rng = np.random.default_rng([cfg.seed, epoch])
        perm = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            rows = perm[start : start + cfg.batch_size]
            out = np.empty((len(rows), 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
            decoder._augment(grey[rows], rng, out)
            yield {"image": torch.from_numpy(out), "index": torch.from_numpy(rows)}

    return batches


def train_run(job: tuple[str, Run, int]) -> dict[str, Any]:
    """Best validation mAP (and its epoch) of one run, in this process with one thread."""
    data_dir, run, max_epochs = job
    torch.set_num_threads(1)
    data = PreparedData(data_dir)
    setup = TrialSetup(method=run.method, data_dir=data_dir, view=run.view,
                       max_epochs=max_epochs, groups=data.groups(None))
    cfg = train_config(run.config, setup)
    method, model, observed = _method_and_model(run.config, setup, cfg, data)
    val_images, _ = load_split(data.shard_files("val"), cfg.image_size)
    _, val_targets = data.true_labels("val")
    train = TrainData(in_memory_batches(data, cfg, len(observed)), observed,
                      math.ceil(len(observed) / cfg.batch_size), val_images, val_targets,
                      groups=setup.groups)
    epochs: list[dict[str, Any]] = []
    fit(method, model, cfg, train, lambda m, s: epochs.append(m), device=torch.device("cpu"))
    best = max(epochs, key=lambda m: m["val_mAP"])
    return {"key": run.key(), "tag": run.tag, "method": run.method, "config": run.config,
            "view": run.view.name, "best_val_mAP": best["val_mAP"], "best_epoch": best["epoch"],
            "val_mAP_tail": best.get("val_mAP_tail"), "curve": [m["val_mAP"] for m in epochs]}


def default_train(space: Any) -> dict[str, Any]:
    """The space's constant training knobs (searched ones keep ``TrainConfig``'s defaults)."""
    return {k: v for k, v in space.train.items() if not isinstance(v, Domain)}


def plan(args: argparse.Namespace) -> tuple[list[Run], int]:
    """Every run of (a), (b) and (c), and the epoch budget."""
    space = load_space(args.space)
    bce_space = load_space(args.bce_space)
    base = default_train(bce_space)
    runs = [Run("a", "bce", {"train": {**base, "seed": s}, "method": {}}, CLEAN)
            for s in range(args.seeds)]
    for i, config in enumerate(random_configs(space, args.configs, args.sample_seed)):
        for seed in (0, 1):
            train = {**config["train"], "seed": seed}
            runs.append(Run(f"b{i:02d}", space.method, {"train": train,
                                                        "method": config["method"]}, space.view()))
    for method in ("bce", "hill", "splc"):
        for s in range(args.method_seeds):
            runs.append(Run("c", method, {"train": {**default_train(space), "seed": s},
                                          "method": {}}, space.view()))
    return runs, space.max_epochs


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties) of two equally long lists."""
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def summarize(rows: list[dict[str, Any]]) -> None:
    """Print (a), (b) and (c) from the finished runs."""
    a = [r["best_val_mAP"] for r in rows if r["tag"] == "a"]
    if a:
        print(f"(a) BCE default, clean: best val mAP over {len(a)} seeds: mean "
              f"{statistics.mean(a):.2f}, std {statistics.stdev(a) if len(a) > 1 else math.nan:.2f}"
              f"  ({', '.join(f'{v:.2f}' for v in a)})")
    pairs: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["tag"].startswith("b"):
            pairs.setdefault(r["tag"], {})[int(r["config"]["train"]["seed"])] = r["best_val_mAP"]
    full = {t: p for t, p in sorted(pairs.items()) if len(p) == 2}
    if len(full) > 2:
        s0, s1 = [p[0] for p in full.values()], [p[1] for p in full.values()]
        diffs = [abs(x - y) for x, y in zip(s0, s1)]
        print(f"(b) {len(full)} random configurations, seed 0 vs seed 1: Spearman "
              f"{spearman(s0, s1):.3f}; best val mAP range {min(s0 + s1):.2f}..{max(s0 + s1):.2f}; "
              f"mean |seed difference| {statistics.mean(diffs):.2f}")
        for tag, p in full.items():
            print(f"    {tag}: {p[0]:.2f} / {p[1]:.2f}")
    for method in ("bce", "hill", "splc"):
        c = [r["best_val_mAP"] for r in rows if r["tag"] == "c" and r["method"] == method]
        if c:
            print(f"(c) {method} default, {rows[-1]['view'] if rows else ''}: best val mAP over "
                  f"{len(c)} seeds: mean {statistics.mean(c):.2f}, std "
                  f"{statistics.stdev(c) if len(c) > 1 else math.nan:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="search_spaces/hill.yaml", help="space of (b) and (c)")
    p.add_argument("--bce-space", default="search_spaces/bce.yaml", help="constants of (a)")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    p.add_argument("--seeds", type=int, default=5, help="train seeds of (a)")
    p.add_argument("--configs", type=int, default=12, help="random configurations of (b)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of (b)'s random sampler")
    p.add_argument("--method-seeds", type=int, default=3, help="train seeds of (c)")
    p.add_argument("--workers", type=int, default=1, help="processes training at once")
    p.add_argument("--out", default="digits_signal.jsonl", help="finished runs (JSON lines)")
    args = p.parse_args()
    data_dir = str(ensure_prepared("digits-mlt", args.data_dir))
    runs, max_epochs = plan(args)
    out = Path(args.out)
    done = {json.loads(line)["key"]: json.loads(line)
            for line in out.read_text().splitlines()} if out.is_file() else {}
    todo = [(data_dir, r, max_epochs) for r in runs if r.key() not in done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already in {out}", flush=True)
    with get_context("spawn").Pool(args.workers) as pool, out.open("a") as f:
        for row in pool.imap_unordered(train_run, todo):
            done[row["key"]] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"  {row['tag']} {row['method']} seed {row['config']['train']['seed']}: "
                  f"{row['best_val_mAP']:.2f} (epoch {row['best_epoch']})", flush=True)
    summarize([done[r.key()] for r in runs if r.key() in done])


if __name__ == "__main__":
    main()
