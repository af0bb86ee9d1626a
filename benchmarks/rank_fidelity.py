"""Rank fidelity of early epochs under each learning-rate schedule option (issue 18 item 4).

ASHA keeps or stops a trial on its value at a rung; that only works when the ranking of the
trials at the rung agrees with their ranking at the end. For a method's shipped space, this
script draws ``--n`` random configurations (Optuna's random sampler over the space's domains,
seeded), trains each for the space's full budget in this process (``tuner.loop.fit``, no Ray,
one torch thread, the trials' seeded batches decoded in-process) once per schedule option,
and prints, per option and epoch e, the Spearman correlation over the configurations of

* ``at e``: the val mAP at epoch e (what a rung at e sees), and
* ``best<=e``: the best val mAP up to epoch e,

with the trial's best val mAP over the full budget, plus the mean and maximum of those final
bests (an option that ranks well but trains worse is no better choice). Each option is a set
of ``train`` overrides (:data:`OPTIONS`); every option trains the same configurations.

    python benchmarks/rank_fidelity.py --methods hill,splc --n 12

Finished runs are appended to ``--out/<method>.jsonl`` (default
``experiments/rank-fidelity``) and read back, so the same command continues after a crash
and a new option trains only its own runs. Trials are deterministic given (configuration,
``train.seed``), so the figures do not depend on the machine's load; times do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _search import random_configs  # noqa: E402

from tuner.data.prepared import PreparedData, ensure_prepared  # noqa: E402
from tuner.data.stream import Decoder, iter_train_batches, sample_repeats  # noqa: E402
from tuner.loop import TrainData, fit  # noqa: E402
from tuner.space import SearchSpace, load_space  # noqa: E402
from tuner.trainable import (  # noqa: E402
    TrialSetup,
    _method_and_model,
    build_train_data,
    train_config,
)

#: schedule options: ``train`` overrides on top of the drawn configuration
OPTIONS: dict[str, dict[str, Any]] = {
    "cosine": {"schedule": "cosine", "warmup_frac": 0.1, "warmup_epochs": 0.0,
               "ema_epochs": 0.0, "ema_decay": 0.0},  # warm-up + cosine over the budget
    "constant": {"schedule": "constant", "warmup_epochs": 0.5, "ema_epochs": 0.0,
                 "ema_decay": 0.0},
    "rsqrt": {"schedule": "rsqrt", "warmup_epochs": 0.5, "ema_epochs": 0.0, "ema_decay": 0.0},
    "cosine+ema": {"schedule": "cosine", "warmup_frac": 0.1, "warmup_epochs": 0.0,
                   "ema_epochs": 1.0},
    "constant+ema": {"schedule": "constant", "warmup_epochs": 0.5, "ema_epochs": 1.0},
    "rsqrt+ema": {"schedule": "rsqrt", "warmup_epochs": 0.5, "ema_epochs": 1.0},
}


def in_process_batches(data: PreparedData, cfg: Any) -> Any:
    """The trial's training epochs decoded in this process: each epoch's images augmented
    with a generator seeded by (train.seed, epoch), batched by the stream's own
    :func:`iter_train_batches` (seeded shuffle). Deterministic like the Ray Data stream, not
    the same pixels (no Ray here)."""
    tables = [pq.read_table(f, columns=["index", "image"]) for f in data.shard_files("train")]
    encoded = [b for t in tables for b in t.column("image").to_pylist()]
    index = np.concatenate([t.column("index").to_numpy() for t in tables]).astype(np.int64)
    decoder = Decoder(cfg.image_size, data.manifest["image"].get("augment", "flip"))

    def batches(epoch: int, weights: Any, draws: int | None = None,
                views: Mapping[str, Any] | None = None) -> Any:
        if views:
            sys.exit("rank_fidelity: methods with dataset views (COMIC) need the Ray stream")
        rng = np.random.default_rng([cfg.seed, epoch, 17])
        images = np.empty((len(encoded), 3, cfg.image_size, cfg.image_size), dtype=np.uint8)
        decoder.transform(encoded, images, rng)
        repeats = None
        if weights is not None:
            repeats = sample_repeats(weights, cfg.seed * 100003 + epoch, draws)
        block = {"image": images, "index": index}
        return iter_train_batches([block], cfg.batch_size, repeats=repeats, rng=rng)

    return batches


def train_curve(space: SearchSpace, data_dir: str, config: dict[str, Any]) -> list[float]:
    """Per-epoch val mAP of one configuration trained for the space's full budget."""
    view = space.view()
    data = PreparedData(data_dir)
    stats_clean = space.data.get("class_stats") == "clean"
    setup = TrialSetup(method=space.method, data_dir=data_dir, view=view,
                       max_epochs=space.max_epochs, stats_from_clean=stats_clean,
                       groups=data.groups(None if stats_clean else view))
    cfg = train_config(config, setup)
    method, model, observed = _method_and_model(config, setup, cfg, data)
    train_data: TrainData = build_train_data(setup, cfg, data, observed, [], cfg.batch_size)
    train_data.train_batches = in_process_batches(data, cfg)
    curve: list[float] = []
    fit(method, model, cfg, train_data, lambda m, s: curve.append(float(m["val_mAP"])),
        device=torch.device("cpu"))
    return curve


def fidelity_table(curves: np.ndarray) -> pd.DataFrame:
    """Spearman, over configurations (rows of ``curves``, ``(n, epochs)``), of the value at
    each epoch and of the best so far with the final best (pandas' rank correlation)."""
    final = pd.Series(curves.max(axis=1))
    rows = {}
    for e in range(curves.shape[1]):
        at = pd.Series(curves[:, e]).corr(final, method="spearman")
        best = pd.Series(curves[:, : e + 1].max(axis=1)).corr(final, method="spearman")
        rows[e + 1] = {"at e": at, "best<=e": best}
    return pd.DataFrame(rows)


def load_runs(path: Path) -> dict[tuple[str, int], list[float]]:
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            runs[(rec["option"], rec["config"])] = rec["curve"]
    return runs


def run_method(method: str, args: argparse.Namespace, options: Sequence[str]) -> dict[str, Any]:
    space = load_space(ROOT / "search_spaces" / f"{method}.yaml")
    data_dir = str(ensure_prepared(space.data["benchmark"], space.data.get("data_dir"),
                                   int(space.data.get("seed", 0)),
                                   head_share=space.data.get("head_share")))
    configs = random_configs(space, args.n, args.seed)
    out = Path(args.out) / f"{method}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = load_runs(out)
    for option in options:
        for k, config in enumerate(configs):
            if (option, k) in runs or args.report_only:
                continue
            run = {"train": {**config["train"], **OPTIONS[option]}, "method": config["method"]}
            t0 = time.perf_counter()
            curve = train_curve(space, data_dir, run)
            runs[(option, k)] = curve
            with out.open("a") as f:
                f.write(json.dumps({"option": option, "config": k, "run": run,
                                    "curve": curve}) + "\n")
            print(f"{method} {option} #{k}: final best {max(curve):.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    done = {o: [runs[(o, k)] for k in range(len(configs)) if (o, k) in runs] for o in options}
    return {o: np.array(c) for o, c in done.items() if len(c) >= 3}  # fewer ranks nothing


def report(method: str, curves: Mapping[str, np.ndarray]) -> dict[str, Any]:
    summary = {}
    print(f"\n## {method}: Spearman with the final best")
    for option, c in curves.items():
        table = fidelity_table(c)
        finals = c.max(axis=1)
        print(f"\n{option} (n = {len(c)}): final best mean {finals.mean():.2f}, "
              f"max {finals.max():.2f}")
        print(table.round(2).to_string())
        summary[option] = {"fidelity": {str(e): table[e].to_dict() for e in table},
                           "final_mean": float(finals.mean()), "final_max": float(finals.max()),
                           "n": len(c)}
    common = min(len(c) for c in curves.values())
    paired = ", ".join(f"{o} {c[:common].max(axis=1).mean():.2f}" for o, c in curves.items())
    print(f"\npaired, the first {common} configurations: mean final best {paired}")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="hill,splc")
    p.add_argument("--n", type=int, default=12, help="random configurations per method")
    p.add_argument("--seed", type=int, default=0, help="seed of the configuration draw")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"of {list(OPTIONS)}")
    p.add_argument("--out", default="experiments/rank-fidelity")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: the tables from the runs already in --out")
    args = p.parse_args()
    options = [o for o in args.options.split(",") if o]
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        sys.exit(f"--options: unknown {unknown}; choose from {list(OPTIONS)}")
    torch.set_num_threads(args.threads)
    summary = {}
    for method in args.methods.split(","):
        summary[method] = report(method, run_method(method, args, options))
    if not args.report_only:
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
