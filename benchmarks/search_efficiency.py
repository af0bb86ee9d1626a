"""Search efficiency: epochs ASHA + TPE needs to reach a good configuration vs random search.

For each method and sampler seed, runs the method's shipped space (its data and label regime,
its domains, and by default its budget: ``num_trials``, ``max_epochs``, ``grace_period``,
``reduction_factor``; each can be given on the command line) as

* ``asha-tpe``: Optuna TPE with Ray Tune's ASHA, stopped trials PRUNED (the platform);
* ``random-fifo``: Optuna random search, every trial trained for the full budget (baseline);
* ``sha-tpe``: Optuna TPE + Optuna's own ``SuccessiveHalvingPruner`` (min resource = grace
  period, same reduction factor), run by the platform's trial code in this process
  (``_sha_search.py``): the choice a user could make instead of Ray's ASHA;
* ``asha-tpe-complete`` (with ``--compare-stopped``): as ``asha-tpe`` but stopped trials told
  to Optuna as COMPLETE with their low-fidelity value (Ray's stock OptunaSearch behaviour);

with the same number of trials, epochs, concurrency and seed. The compute a search needs is
the number of epochs it had trained, over all its trials, when its best validation mAP first
came within the tolerance ``max(0.5, 2 x --seed-std)`` mAP of the best value either search of
the pair found (``--seed-std`` 0.71: the seed-to-seed std of RESULTS.md section 7); epochs
are counted in the order they finished. Prints, per pair and seed, both figures, the ratio
and whether the candidate met the target (at most 1/3 of random search's epochs to it), then
over seeds the verdict (met in at least 2 of 3 seeds per method: issue 18 item 5).

    python benchmarks/search_efficiency.py --methods splc,ndlp --seeds 3

Runs are kept under ``--out`` (default ``experiments/search-efficiency``), named after every
setting that changes them: a finished run is read back, an interrupted Ray search resumed (an
interrupted sha-tpe run starts again), so the same command continues after a crash, and a
second ASHA setting (``--grace-period 3``) reuses the random runs. Also printed: the rank
fidelity of a rung at each epoch (Spearman correlation, over the random runs' trials, of the
val mAP at that epoch with the trial's best), each run's Optuna states, and ASHA alone
replayed on the random runs' full curves in 500 shuffled trial orders for several grace
periods and reduction factors (:func:`asha_replay`: the scheduler's part of the efficiency,
without TPE, at no extra compute). Times: RESULTS.md section 10.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from _search import ROOT, run_space

STRATEGIES = {  # name: search-section settings
    "asha-tpe": {"sampler": "tpe", "scheduler": "asha", "stopped_trials": "pruned"},
    "random-fifo": {"sampler": "random", "scheduler": "fifo", "stopped_trials": "pruned"},
    "asha-tpe-complete": {"sampler": "tpe", "scheduler": "asha", "stopped_trials": "complete"},
    # Optuna's SuccessiveHalvingPruner in place of Tune's ASHA, at the space's ASHA settings
    "sha-tpe": {"sampler": "tpe", "scheduler": "asha", "stopped_trials": "pruned"},
}
#: strategies run by Optuna in this process (benchmarks/_sha_search.py), not by Ray Tune
OPTUNA_RUN = ("sha-tpe",)
#: the pairs compared: (candidate, baseline)
PAIRS = (("asha-tpe", "random-fifo"), ("sha-tpe", "random-fifo"),
         ("asha-tpe", "asha-tpe-complete"))
#: seed-to-seed std of the BCE default's best val mAP on DigitsMLT v3 (RESULTS.md section 7)
SEED_STD = 0.71
#: the issue's compute target: at most this share of random search's epochs
TARGET_RATIO = 1 / 3


@dataclass(frozen=True)
class Budget:
    """A method's search budget: the shipped space's unless given on the command line."""

    trials: int
    epochs: int
    grace_period: int
    reduction_factor: int

    @property
    def key(self) -> str:
        return f"t{self.trials}e{self.epochs}"


def method_budget(method: str, args: argparse.Namespace) -> Budget:
    """``search_spaces/<method>.yaml``'s num_trials, max_epochs, grace_period and
    reduction_factor, each replaced by its command-line option when one is given."""
    space = yaml.safe_load((ROOT / f"search_spaces/{method}.yaml").read_text())
    asha, search = space["asha"], space["search"]

    def pick(given: int | None, shipped: Any) -> int:
        return int(shipped) if given is None else int(given)

    return Budget(trials=pick(args.trials, search["num_trials"]),
                  epochs=pick(args.epochs, asha["max_epochs"]),
                  grace_period=pick(args.grace_period, asha["grace_period"]),
                  reduction_factor=pick(args.reduction_factor, asha["reduction_factor"]))


def target_tolerance(seed_std: float) -> float:
    """How far below the pair's best a search may stay and still count as reaching it:
    ``max(0.5, 2 x seed std)`` mAP (issue 18 item 5): a gap the seed noise alone explains
    is no miss, and 0.5 is the floor when the noise is small."""
    if not math.isfinite(seed_std) or seed_std < 0:
        raise ValueError(f"--seed-std must be a finite number >= 0, got {seed_std}")
    return max(0.5, 2.0 * seed_std)


def meets_target(epochs_candidate: float, epochs_baseline: float,
                 baseline_run: float) -> bool:
    """The candidate reached the target with at most a third of the baseline's epochs to it.
    A baseline that never reached it needed more than its whole run (``baseline_run``
    epochs), an amount not known: the candidate then meets the target only within a third of
    that whole run (a conservative verdict)."""
    if not math.isfinite(epochs_candidate):
        return False
    need = epochs_baseline if math.isfinite(epochs_baseline) else baseline_run
    return epochs_candidate <= TARGET_RATIO * need


def progress_curve(trials: pd.DataFrame) -> pd.DataFrame:
    """Every reported epoch of a search in the order it finished, with the epochs trained so
    far (``compute``) and the best validation mAP found so far (``best``)."""
    rows = trials.sort_values(["timestamp", "time_total_s"], kind="stable")
    return pd.DataFrame({
        "compute": range(1, len(rows) + 1),
        "best": rows["val_mAP"].cummax().to_numpy(),
    })


def compute_to_reach(trials: pd.DataFrame, target: float) -> float:
    """Epochs a search had trained when its best val mAP first reached ``target`` (inf: never)."""
    curve = progress_curve(trials)
    hit = curve[curve["best"] >= target]
    return float(hit["compute"].iloc[0]) if len(hit) else math.inf


def compare_pair(runs: dict[str, pd.DataFrame], candidate: str, baseline: str,
                 tolerance: float) -> dict[str, Any]:
    """The pair's target (best of both minus ``tolerance``) and each search's compute to it."""
    best = {name: float(runs[name]["val_mAP"].max()) for name in (candidate, baseline)}
    target = max(best.values()) - tolerance
    need = {name: compute_to_reach(runs[name], target) for name in (candidate, baseline)}
    return {
        "pair": f"{candidate} vs {baseline}", "target": target,
        "best_candidate": best[candidate], "best_baseline": best[baseline],
        "epochs_candidate": need[candidate], "epochs_baseline": need[baseline],
        "total_candidate": len(runs[candidate]), "total_baseline": len(runs[baseline]),
        # nan when the baseline never reached the target (it needed more than its run)
        "ratio": (need[candidate] / need[baseline] if math.isfinite(need[baseline])
                  else math.nan),
        # the other reading of the target: against every epoch the baseline trained
        "ratio_of_run": need[candidate] / len(runs[baseline]),
    }


def state_counts(exp_dir: Path) -> dict[str, int]:
    """How many of the search's Optuna trials are in each state (``COMPLETE``, ``PRUNED``,
    ``FAIL``, ``RUNNING``); empty when it has no study yet."""
    from collections import Counter

    import optuna

    from tuner.optuna_search import sqlite_storage

    if not (exp_dir / "optuna.db").is_file():
        return {}
    storage = sqlite_storage(exp_dir / "optuna.db")
    names = optuna.get_all_study_names(storage)  # one search, one study
    if not names:
        return {}
    study = optuna.load_study(study_name=names[0], storage=storage)
    return dict(sorted(Counter(t.state.name for t in study.trials).items()))


def study_states(exp_dir: Path) -> str:
    """``STATE count`` of the search's Optuna trials, e.g. ``COMPLETE 4, PRUNED 8``."""
    return ", ".join(f"{k} {v}" for k, v in state_counts(exp_dir).items())


def finished(exp_dir: Path, trials: int) -> bool:
    """Whether the search ran all its ``trials`` to an end: COMPLETE, PRUNED or failed for
    good (e.g. a non-finite loss) in Optuna. An interrupted search also writes its trials and
    leaderboard, but its unfinished trials are RUNNING or FAIL marked ``interrupted``
    (``tuner.faults``): it is resumed, not read back."""
    import optuna

    from tuner.faults import INTERRUPTED_ATTR
    from tuner.optuna_search import sqlite_storage

    if not all((exp_dir / f).is_file() for f in ("trials.parquet", "leaderboard.csv",
                                                  "optuna.db")):
        return False
    storage = sqlite_storage(exp_dir / "optuna.db")
    names = optuna.get_all_study_names(storage)
    if not names:
        return False
    ended = [t for t in optuna.load_study(study_name=names[0], storage=storage).trials
             if t.state.is_finished() and INTERRUPTED_ATTR not in t.user_attrs]
    return len(ended) >= trials


def run_name(method: str, strategy: str, seed: int, budget: Budget, concurrency: int) -> str:
    """The run's directory: every setting that changes its result is in the name, so runs of
    other settings are never mistaken for it (random search ignores the ASHA settings, so
    its runs serve every grace period and reduction factor)."""
    key = budget.key
    if STRATEGIES[strategy]["scheduler"] != "fifo":
        key += f"g{budget.grace_period}r{budget.reduction_factor}"
    return f"{method}-{strategy}-{key}-c{concurrency}-s{seed}"


def run(method: str, strategy: str, seed: int, budget: Budget,
        args: argparse.Namespace) -> pd.DataFrame | None:
    """One search (or, when it finished before, its saved trials; with ``--report-only``
    None when it has not)."""
    name = run_name(method, strategy, seed, budget, args.concurrency)
    if finished(args.out / name, budget.trials):
        trials = pd.read_parquet(args.out / name / "trials.parquet")
        print(f"[{name}] finished before: {len(trials)} epochs, best val mAP "
              f"{trials['val_mAP'].max():.2f}; Optuna: {study_states(args.out / name)}")
        return trials
    if args.report_only:
        print(f"[{name}] not finished: left out (--report-only)")
        return None

    def edit(space: dict) -> None:
        space["asha"] = {"max_epochs": budget.epochs, "grace_period": budget.grace_period,
                         "reduction_factor": budget.reduction_factor}
        space["search"].update(num_trials=budget.trials, max_concurrent=args.concurrency,
                               seed=seed, **STRATEGIES[strategy])

    start = time.perf_counter()
    if strategy in OPTUNA_RUN:
        from _sha_search import run_sha_search

        trials = run_sha_search(method, name, edit, args.out, args.data_dir)
    else:
        trials = run_space(method, name, edit, args.out, args.data_dir)
    print(f"[{name}] {trials['trial_id'].nunique()} trials, {len(trials)} epochs, "
          f"best val mAP {trials['val_mAP'].max():.2f}, {time.perf_counter() - start:.0f} s; "
          f"Optuna: {study_states(args.out / name)}")
    return trials


def rank_fidelity(trials: pd.DataFrame) -> pd.Series:
    """Spearman correlation, over the trials of a search without early stopping, between the
    val mAP at each epoch and the trial's best over the full budget: how well a rung at that
    epoch ranks trials (ASHA keeps the top 1/reduction_factor by this value)."""
    by_epoch = trials.pivot_table(index="trial_id", columns="epoch", values="val_mAP")
    final = trials.groupby("trial_id")["val_mAP"].max()
    return by_epoch.apply(lambda col: col.corr(final, method="spearman"))


def asha_replay(curves: np.ndarray, order: Sequence[int], grace: int, rf: int,
                target: float) -> tuple[float, float, int]:
    """Ray's ASHA, replayed one trial at a time on full learning curves (no searcher).

    ``curves[t, e - 1]`` is trial t's val mAP after epoch e. In ``order``, each trial trains
    epoch by epoch; at a rung (``grace * rf**k`` below the budget) it stops when its value is
    below the ``1 - 1/rf`` quantile of the values recorded there before it (Ray's
    ``_Bracket.on_result``: the first trial at a rung always continues). Returns the epochs
    trained when the best value first reached ``target`` with ASHA and without early
    stopping (same order; inf: never), and ASHA's total epochs.
    """
    epochs = curves.shape[1]
    rungs = {grace * rf**k: [] for k in range(epochs) if grace * rf**k < epochs}
    trained, asha, plain = 0, math.inf, math.inf
    for t in order:
        for e in range(1, epochs + 1):
            trained += 1
            value = curves[t, e - 1]
            if value >= target and asha == math.inf:
                asha = trained
            if e in rungs:
                recorded = rungs[e]
                cutoff = np.nanpercentile(recorded, (1 - 1 / rf) * 100) if recorded else None
                recorded.append(value)
                if cutoff is not None and value < cutoff:
                    break
    hits = np.flatnonzero((np.asarray(curves)[list(order)] >= target).ravel())
    if len(hits):
        plain = float(hits[0] + 1)
    return asha, plain, trained


def replay_schedules(trials: pd.DataFrame, settings: Sequence[tuple[int, int]],
                     tolerance: float, orders: int = 500, seed: int = 0) -> pd.DataFrame:
    """ASHA (grace, rf) alone, replayed on a search without early stopping over ``orders``
    random trial orders: how often it reaches the search's best - ``tolerance``
    (``reached``), and over the orders where it does, its mean epochs to get there against
    no stopping's in the same orders (``ratio``; target 1/3)."""
    curves = trials.pivot_table(index="trial_id", columns="epoch", values="val_mAP").to_numpy()
    target = float(np.nanmax(curves)) - tolerance
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(len(curves)) for _ in range(orders)]
    rows = []
    for grace, rf in settings:
        runs = np.array([asha_replay(curves, order, grace, rf, target) for order in perms])
        hit = np.isfinite(runs[:, 0])
        asha = runs[hit, 0].mean() if hit.any() else math.inf
        plain = runs[hit, 1].mean() if hit.any() else math.nan
        rows.append({"grace": grace, "rf": rf, "reached": hit.mean(), "epochs_asha": asha,
                     "epochs_plain": plain, "ratio": asha / plain if hit.any() else math.inf,
                     "asha_total": runs[:, 2].mean()})
    return pd.DataFrame(rows)


def summarize(pairs: list[dict[str, Any]]) -> pd.DataFrame:
    """Per pair kind over seeds: summed epochs-to-target, their ratio, misses, and in how
    many seeds the candidate met the target (:func:`meets_target`)."""
    out = []
    for kind, group in pd.DataFrame(pairs).groupby(["method", "pair"], sort=False):
        cand, base = group["epochs_candidate"], group["epochs_baseline"]
        both = math.isfinite(cand.sum()) and math.isfinite(base.sum())
        out.append({"method": kind[0], "pair": kind[1], "seeds": len(group),
                    "seeds_met": int(group["met"].sum()),
                    "epochs_candidate": cand.sum(), "epochs_baseline": base.sum(),
                    # a search that never reached the target needed more than it had
                    "ratio": cand.sum() / base.sum() if both else
                    (math.inf if math.isfinite(base.sum()) else math.nan),
                    "candidate_missed": int((cand == math.inf).sum()),
                    "baseline_missed": int((base == math.inf).sum()),
                    "best_candidate": group["best_candidate"].mean(),
                    "best_baseline": group["best_baseline"].mean()})
    return pd.DataFrame(out)


def verdict(seeds_met: int, seeds: int) -> str:
    """The issue's rule: met in at least 2 of 3 seeds (two thirds of them) per method."""
    return "met" if seeds_met * 3 >= 2 * seeds else "missed"


def replay_settings(epochs: int) -> list[tuple[int, int]]:
    """(grace, rf) pairs replayed on a budget of ``epochs``: small graces and a ninth and a
    third of the budget, each with reduction factors 2 and 3."""
    graces = sorted({1, 2, 3, 4, max(1, epochs // 9), max(1, epochs // 3)})
    return [(g, rf) for g in graces for rf in (2, 3) if g < epochs]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="splc,ndlp", help="comma-separated method names")
    p.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..N-1")
    p.add_argument("--seed-list", help="comma-separated sampler seeds, instead of --seeds "
                                       "(e.g. another process runs the other seeds)")
    p.add_argument("--trials", type=int, help="trials per search (default: the space's)")
    p.add_argument("--epochs", type=int, help="full budget per trial (default: the space's)")
    p.add_argument("--grace-period", type=int, help="first rung (default: the space's)")
    p.add_argument("--reduction-factor", type=int, help="default: the space's")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed-std", type=float, default=SEED_STD,
                   help="seed-to-seed std of a configuration's best val mAP; the target is "
                        "the pair's best - max(0.5, 2 x this) (default: RESULTS.md section 7)")
    p.add_argument("--strategies", default="asha-tpe,random-fifo,sha-tpe",
                   help=f"comma-separated, of {', '.join(STRATEGIES)}")
    p.add_argument("--compare-stopped", action="store_true",
                   help="also run TPE with stopped trials COMPLETE (Ray's stock behaviour)")
    p.add_argument("--report-only", action="store_true",
                   help="start no search: report the finished runs only")
    p.add_argument("--out", type=Path, default=Path("experiments/search-efficiency"))
    p.add_argument("--data-dir", help="prepared DigitsMLT (default: the cache)")
    args = p.parse_args(argv)
    try:
        args.seed_list = ([int(x) for x in args.seed_list.split(",")] if args.seed_list
                          else list(range(args.seeds)))
    except ValueError:
        p.error(f"--seed-list: comma-separated integers, got {args.seed_list!r}")
    args.strategies = args.strategies.split(",") + (
        ["asha-tpe-complete"] if args.compare_stopped else [])
    missing = [m for m in args.methods.split(",") if not (ROOT / f"search_spaces/{m}.yaml").is_file()]
    if missing:
        p.error(f"--methods: no search_spaces/<name>.yaml for {', '.join(missing)}; use the "
                f"names of the files in search_spaces/")
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {', '.join(unknown)}; use {', '.join(STRATEGIES)}")
    try:
        args.tolerance = target_tolerance(args.seed_std)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs, fidelity, replays, budgets = [], {}, [], {}
    for method in args.methods.split(","):
        budget = budgets[method] = method_budget(method, args)
        print(f"{method}: {budget}, tolerance {args.tolerance:.2f} mAP", flush=True)
        for seed in args.seed_list:
            runs = {s: run(method, s, seed, budget, args) for s in args.strategies}
            runs = {s: trials for s, trials in runs.items() if trials is not None}
            for candidate, baseline in PAIRS:
                if candidate in runs and baseline in runs:
                    row = compare_pair(runs, candidate, baseline, args.tolerance)
                    row["met"] = meets_target(row["epochs_candidate"], row["epochs_baseline"],
                                              row["total_baseline"])
                    pairs.append({"method": method, "seed": seed, **row})
            if "random-fifo" in runs:
                fidelity[f"{method} s{seed}"] = rank_fidelity(runs["random-fifo"])
                replays.append(replay_schedules(runs["random-fifo"], replay_settings(
                    budget.epochs), args.tolerance, seed=seed).assign(method=method))
    report(args, pairs, fidelity, replays, budgets)


def report(args: argparse.Namespace, pairs: list[dict[str, Any]], fidelity: dict[str, Any],
           replays: list[pd.DataFrame], budgets: dict[str, Budget]) -> None:
    """Print the tables and the verdicts; save them as ``search_efficiency.json``."""
    pd.set_option("display.width", 200)
    fmt = {"float_format": lambda v: f"{v:.2f}", "index": False}
    summary = summarize(pairs) if pairs else pd.DataFrame()
    if pairs:
        print(f"\nPer seed (epochs to reach the pair's best val mAP - {args.tolerance:.2f}; "
              f"inf: never; met: at most {TARGET_RATIO:.2f} of the baseline's):")
        print(pd.DataFrame(pairs).to_string(**fmt))
    if fidelity:
        print("\nRank fidelity of a rung at each epoch (Spearman, val mAP then vs the trial's "
              "best; random-fifo runs):")
        print(pd.DataFrame(fidelity).T.to_string(float_format=lambda v: f"{v:.2f}"))
    table = pd.DataFrame()
    if replays:
        table = pd.concat(replays).groupby(["method", "grace", "rf"], sort=False).mean()
        table = table.reset_index()
        print(f"\nASHA alone (no TPE), replayed on the random-fifo runs' curves over 500 trial "
              f"orders each, mean of seeds: share of orders reaching the run's best - "
              f"{args.tolerance:.2f}, and where it does, epochs vs no stopping in the same "
              f"orders:")
        print(table.to_string(**fmt))
    if pairs:
        print("\nOver seeds (summed epochs):")
        print(summary.to_string(**fmt))
    (args.out / "search_efficiency.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "budgets": {m: vars(b) for m, b in budgets.items()}, "pairs": pairs,
         "rank_fidelity": {k: {str(e): v for e, v in r.items()} for k, r in fidelity.items()},
         "summary": summary.to_dict("records"), "asha_replay": table.to_dict("records")},
        indent=1, default=str))
    for row in summary.itertuples():
        note = ""
        if row.pair.endswith("random-fifo"):
            note = (f"; target met in {row.seeds_met} of {row.seeds} seeds: "
                    f"{verdict(row.seeds_met, row.seeds)}")
        print(f"{row.method}: {row.pair}: {row.epochs_candidate:g} vs {row.epochs_baseline:g} "
              f"epochs, ratio {row.ratio:.2f}{note}")


if __name__ == "__main__":
    main()
