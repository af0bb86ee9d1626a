"""The issue-18 measurement scripts: ``benchmarks/digits_signal.py``'s per-budget report and
``benchmarks/splc_correction.py``'s tally of SPLC's corrections.

Expected values come from the rows and tensors each test builds, never from the code under test.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import digits_signal  # noqa: E402
import splc_correction  # noqa: E402

from methods import TaskInfo, create_method  # noqa: E402


def budget_args(space: str, budgets: str, epochs: int | None = 16,
                bce_space: str = "search_spaces/splc.yaml") -> argparse.Namespace:
    return argparse.Namespace(space=str(ROOT / space), bce_space=str(ROOT / bce_space),
                              budgets=budgets, epochs=epochs)


def test_budgets_are_prefixes_only_under_a_budget_independent_schedule() -> None:
    assert digits_signal.budgets_of(budget_args("search_spaces/splc.yaml", "12,8,12")) == [8, 12]
    for cosine in ("search_spaces/bce.yaml", "search_spaces/hill.yaml"):  # decay over the budget
        for args in (budget_args("search_spaces/splc.yaml", "8", bce_space=cosine),
                     budget_args(cosine, "8")):
            with pytest.raises(SystemExit, match="schedule: cosine"):
                digits_signal.budgets_of(args)
    with pytest.raises(SystemExit, match="between 1 and the 16 epochs"):
        digits_signal.budgets_of(budget_args("search_spaces/splc.yaml", "8,20"))
    with pytest.raises(SystemExit, match="epoch counts"):
        digits_signal.budgets_of(budget_args("search_spaces/splc.yaml", "eight"))


def c_row(method: str, seed: int, curve: list[float]) -> dict:
    return {"tag": "c", "method": method, "config": {"train": {"seed": seed}}, "view": "missing",
            "best_val_mAP": max(curve), "curve": curve}


def test_summary_at_a_budget_takes_each_runs_prefix_and_pairs_methods_by_seed(capsys) -> None:
    curves = {("bce", 0): [50.0, 60.0, 99.0], ("bce", 1): [52.0, 58.0, 10.0],
              ("hill", 0): [51.0, 63.5, 70.0], ("hill", 1): [55.0, 57.0, 90.0]}
    rows = [c_row(m, s, c) for (m, s), c in curves.items()]
    digits_signal.summarize(rows, budget=2)
    out = capsys.readouterr().out
    bce = [max(curves[("bce", s)][:2]) for s in (0, 1)]
    hill = [max(curves[("hill", s)][:2]) for s in (0, 1)]
    diffs = [h - b for h, b in zip(hill, bce)]
    assert "budget 2 epochs" in out
    assert f"mean {statistics.mean(bce):.2f}, std {statistics.stdev(bce):.2f}" in out
    assert (f"minus BCE per seed {diffs[0]:+.2f} {diffs[1]:+.2f} (mean "
            f"{statistics.mean(diffs):+.2f}, std {statistics.stdev(diffs):.2f})") in out
    digits_signal.summarize(rows)  # the whole run: the best of every epoch
    assert f"mean {statistics.mean([99.0, 58.0]):.2f}" in capsys.readouterr().out


def test_seed_spearman_at_a_budget_ranks_each_runs_prefix(capsys) -> None:
    from scipy.stats import spearmanr

    curves = {0: [[10.0, 20.0, 90.0], [30.0, 40.0, 10.0], [50.0, 55.0, 60.0]],
              1: [[12.0, 25.0, 10.0], [33.0, 38.0, 95.0], [49.0, 52.0, 20.0]]}
    rows = [{"tag": f"b{i:02d}", "method": "hill", "config": {"train": {"seed": seed}},
             "view": "missing", "best_val_mAP": max(curve), "curve": curve}
            for seed, per in curves.items() for i, curve in enumerate(per)]
    for budget in (2, None):
        digits_signal.summarize(rows, budget)
        s0, s1 = ([max(c[:budget]) for c in curves[s]] for s in (0, 1))
        out = capsys.readouterr().out
        assert f"Spearman {spearmanr(s0, s1).statistic:.3f}" in out
        assert ("    b00:" in out) == (budget is None)  # per-configuration lines: whole runs only


def test_splc_tally_counts_corrections_against_the_clean_labels() -> None:
    task = TaskInfo(num_classes=3, num_train=4, class_counts=(2, 1, 1), max_epochs=4)
    splc = create_method("splc", {"tau": 0.6, "change_epoch": 1}, task)
    truth = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.uint8)
    observed = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    high, low = math.log(0.7 / 0.3), math.log(0.5 / 0.5)  # sigmoid 0.7 > tau, 0.5 < tau
    logits = torch.tensor([[high, high, high],   # corrects (0,1) true and (0,2) false
                           [low, high, low],     # misses the missing (1,2)
                           [high, low, low],
                           [low, high, high]])   # corrects (3,1) false
    batch = {"target": observed, "index": torch.arange(4)}
    tally = splc_correction.CorrectionTally(splc, truth)
    splc.on_epoch_start(0)  # before change_epoch: nothing is corrected
    tally.add(logits, batch)
    splc.on_epoch_start(1)
    tally.add(logits, batch)
    tally.add(logits[:1], {"target": observed[:1], "index": torch.arange(1)})
    before = tally.epoch(0)
    assert (before["corrected"], before["recall"]) == (0, 0.0) and math.isnan(before["precision"])
    # epoch 1: 3 + 2 corrected, 1 + 1 of them right; missing positives (0,1), (1,2) + (0,1)
    assert tally.epoch(1) == {"corrected": 5, "precision": 2 / 5, "recall": 2 / 3}
