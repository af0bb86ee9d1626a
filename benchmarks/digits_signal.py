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
  q = 0.6), over ``--method-seeds`` seeds, with each method's difference from BCE per seed.

``--epochs`` trains longer than the space's budget; ``--budgets 8,12,16`` then prints (a),
(b) and (c) for each budget from the same runs (the best of a run's first e epochs), which is what a
run of e epochs gives when the schedule does not depend on the budget (``schedule: constant``
or ``rsqrt``, as ``splc.yaml``); with ``cosine`` (``hill.yaml``) it refuses.

Each finished run is appended to ``--out`` (JSON lines); a second invocation with the same file
skips the runs it already holds, so an interrupted measurement continues. Both spaces must name
the same DigitsMLT build (``data.head_share``; ``splc.yaml`` names the 0.35 variant), which
is prepared in the cache unless ``--data-dir`` names one. ``--workers``
processes train at once, each with one torch thread: the figures do not depend on it.

    python benchmarks/digits_signal.py --out digits_signal.jsonl --workers 2
    python benchmarks/digits_signal.py --space search_spaces/splc.yaml \
        --bce-space search_spaces/splc.yaml --seeds 8 --configs 0 --method-seeds 5 \
        --epochs 16 --budgets 8,10,12,14,16 --workers 2
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
    epochs: int

    def key(self) -> str:
        return json.dumps([self.tag, self.method, self.config, self.view.name, self.epochs],
                          sort_keys=True)


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


def prepared_run(data_dir: str, run: Run) -> tuple[Any, Any, Any, TrainData]:
    """The method, model, ``TrainConfig`` and in-memory ``TrainData`` of one run (one thread)."""
    torch.set_num_threads(1)
    data = PreparedData(data_dir)
    setup = TrialSetup(method=run.method, data_dir=data_dir, view=run.view,
                       max_epochs=run.epochs, groups=data.groups(None))
    cfg = train_config(run.config, setup)
    method, model, observed = _method_and_model(run.config, setup, cfg, data)
    val_images, _ = load_split(data.shard_files("val"), cfg.image_size)
    _, val_targets = data.true_labels("val")
    train = TrainData(in_memory_batches(data, cfg, len(observed)), observed,
                      math.ceil(len(observed) / cfg.batch_size), val_images, val_targets,
                      groups=setup.groups)
    return method, model, cfg, train


def train_run(job: tuple[str, Run]) -> dict[str, Any]:
    """Best validation mAP (and its epoch) of one run, in this process with one thread."""
    data_dir, run = job
    method, model, cfg, train = prepared_run(data_dir, run)
    epochs: list[dict[str, Any]] = []
    fit(method, model, cfg, train, lambda m, s: epochs.append(m), device=torch.device("cpu"))
    best = max(epochs, key=lambda m: m["val_mAP"])
    return {"key": run.key(), "tag": run.tag, "method": run.method, "config": run.config,
            "view": run.view.name, "best_val_mAP": best["val_mAP"], "best_epoch": best["epoch"],
            "val_mAP_tail": best.get("val_mAP_tail"), "curve": [m["val_mAP"] for m in epochs]}


def default_train(space: Any) -> dict[str, Any]:
    """The space's constant training knobs (searched ones keep ``TrainConfig``'s defaults)."""
    return {k: v for k, v in space.train.items() if not isinstance(v, Domain)}


def plan(args: argparse.Namespace) -> list[Run]:
    """Every run of (a), (b) and (c)."""
    space = load_space(args.space)
    bce_space = load_space(args.bce_space)
    epochs = args.epochs or space.max_epochs
    base = default_train(bce_space)
    runs = [Run("a", "bce", {"train": {**base, "seed": s}, "method": {}}, CLEAN, epochs)
            for s in range(args.seeds)]
    for i, config in enumerate(random_configs(space, args.configs, args.sample_seed)):
        for seed in (0, 1):
            train = {**config["train"], "seed": seed}
            runs.append(Run(f"b{i:02d}", space.method, {"train": train,
                                                        "method": config["method"]},
                            space.view(), epochs))
    for method in ("bce", "hill", "splc"):
        for s in range(args.method_seeds):
            runs.append(Run("c", method, {"train": {**default_train(space), "seed": s},
                                          "method": {}}, space.view(), epochs))
    return runs


def budgets_of(args: argparse.Namespace) -> list[int]:
    """``--budgets`` as epoch counts, checked against ``--epochs`` and the schedules."""
    if not args.budgets:
        return []
    try:
        budgets = sorted({int(b) for b in args.budgets.split(",")})
    except ValueError:
        raise SystemExit(f"--budgets {args.budgets}: expected epoch counts such as 8,12,16") from None
    epochs = args.epochs or load_space(args.space).max_epochs
    if budgets[0] < 1 or budgets[-1] > epochs:
        raise SystemExit(f"--budgets {args.budgets}: each must be between 1 and the {epochs} "
                         f"epochs trained (--epochs)")
    for path in (args.space, args.bce_space):
        schedule = default_train(load_space(path)).get("schedule", "cosine")
        if schedule == "cosine":
            raise SystemExit(f"--budgets: {path} decays its learning rate over the budget "
                             f"(schedule: cosine), so a shorter run is not a prefix of a "
                             f"longer one; pass a space with schedule: constant or rsqrt")
    return budgets


def best_within(row: dict[str, Any], budget: int | None) -> float:
    """A run's best validation mAP over its first ``budget`` epochs (all when None)."""
    return max(row["curve"][:budget]) if budget else row["best_val_mAP"]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties) of two equally long lists."""
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def summarize(rows: list[dict[str, Any]], budget: int | None = None) -> None:
    """Print (a), (b) and (c) from the finished runs (over their first ``budget`` epochs)."""
    if budget:
        print(f"-- budget {budget} epochs (the best of each run's first {budget})")
    a = [best_within(r, budget) for r in rows if r["tag"] == "a"]
    if a:
        print(f"(a) BCE default, clean: best val mAP over {len(a)} seeds: mean "
              f"{statistics.mean(a):.2f}, std {statistics.stdev(a) if len(a) > 1 else math.nan:.2f}"
              f"  ({', '.join(f'{v:.2f}' for v in a)})")
    pairs: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["tag"].startswith("b"):
            pairs.setdefault(r["tag"], {})[int(r["config"]["train"]["seed"])] = \
                best_within(r, budget)
    full = {t: p for t, p in sorted(pairs.items()) if len(p) == 2}
    if len(full) > 2:
        s0, s1 = [p[0] for p in full.values()], [p[1] for p in full.values()]
        diffs = [abs(x - y) for x, y in zip(s0, s1)]
        print(f"(b) {len(full)} random configurations, seed 0 vs seed 1: Spearman "
              f"{spearman(s0, s1):.3f}; best val mAP range {min(s0 + s1):.2f}..{max(s0 + s1):.2f}; "
              f"mean |seed difference| {statistics.mean(diffs):.2f}")
        if budget is None:  # per configuration: whole runs only
            for tag, p in full.items():
                print(f"    {tag}: {p[0]:.2f} / {p[1]:.2f}")
    per_seed = {m: {int(r["config"]["train"]["seed"]): best_within(r, budget) for r in rows
                    if r["tag"] == "c" and r["method"] == m} for m in ("bce", "hill", "splc")}
    for method, by_seed in per_seed.items():
        c = list(by_seed.values())
        if not c:
            continue
        line = (f"(c) {method} default, {rows[-1]['view'] if rows else ''}: best val mAP over "
                f"{len(c)} seeds: mean {statistics.mean(c):.2f}, std "
                f"{statistics.stdev(c) if len(c) > 1 else math.nan:.2f}")
        paired = [v - per_seed["bce"][s] for s, v in sorted(by_seed.items())
                  if s in per_seed["bce"]]
        if method != "bce" and len(paired) > 1:
            line += (f"; minus BCE per seed {' '.join(f'{d:+.2f}' for d in paired)} (mean "
                     f"{statistics.mean(paired):+.2f}, std {statistics.stdev(paired):.2f})")
        print(line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default="search_spaces/hill.yaml", help="space of (b) and (c)")
    p.add_argument("--bce-space", default="search_spaces/bce.yaml", help="constants of (a)")
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    p.add_argument("--seeds", type=int, default=5, help="train seeds of (a)")
    p.add_argument("--configs", type=int, default=12, help="random configurations of (b)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of (b)'s random sampler")
    p.add_argument("--method-seeds", type=int, default=3, help="train seeds of (c)")
    p.add_argument("--epochs", type=int, help="epochs per run (default: the space's max_epochs)")
    p.add_argument("--budgets", help="also report (a) and (c) at these budgets, e.g. 8,12,16")
    p.add_argument("--workers", type=int, default=1, help="processes training at once")
    p.add_argument("--out", default="digits_signal.jsonl", help="finished runs (JSON lines)")
    args = p.parse_args(argv)
    budgets = budgets_of(args)
    shares = {load_space(path).data["head_share"] for path in (args.space, args.bce_space)}
    if len(shares) > 1:
        raise SystemExit(f"--space {args.space} and --bce-space {args.bce_space} name other "
                         f"DigitsMLT builds (data.head_share {sorted(shares, key=str)}); pass two "
                         f"spaces of one build, e.g. --bce-space {args.space}")
    data_dir = str(ensure_prepared("digits-mlt", args.data_dir, head_share=shares.pop()))
    runs = plan(args)
    out = Path(args.out)
    done = {json.loads(line)["key"]: json.loads(line)
            for line in out.read_text().splitlines()} if out.is_file() else {}
    todo = [(data_dir, r) for r in runs if r.key() not in done]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already in {out}", flush=True)
    with get_context("spawn").Pool(args.workers) as pool, out.open("a") as f:
        for row in pool.imap_unordered(train_run, todo):
            done[row["key"]] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"  {row['tag']} {row['method']} seed {row['config']['train']['seed']}: "
                  f"{row['best_val_mAP']:.2f} (epoch {row['best_epoch']})", flush=True)
    finished = [done[r.key()] for r in runs if r.key() in done]
    summarize(finished)
    for budget in budgets:
        summarize(finished, budget)


if __name__ == "__main__":
    main()
