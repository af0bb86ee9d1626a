"""The issue-18 measurement scripts: ``benchmarks/digits_signal.py``'s per-budget report,
``benchmarks/splc_correction.py``'s tally of SPLC's corrections and
``benchmarks/cooccurrence.py``'s missing-label table; and issue 19's per-process CPU table of
``benchmarks/trial_overhead.py --processes``.

Expected values come from the rows and tensors each test builds, never from the code under test.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cooccurrence  # noqa: E402
import digits_signal  # noqa: E402
import peers  # noqa: E402
import splc_correction  # noqa: E402
import trial_overhead  # noqa: E402

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


def test_process_table_counts_and_times_each_kind_of_process() -> None:
    """Two busy ``python -c`` processes carrying the token and one without it: the table
    has the two (sampled from /proc, as in a search) and none of the third."""
    token = uuid.uuid4().hex
    # busy for 0.6 CPU s, then idle long enough for the sampler to read the final CPU time
    busy = ("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
            "time.sleep(0.5)")
    env = {**os.environ, peers.TOKEN_VAR: token}
    with peers.TreeCpu(token, interval=0.05) as tree:
        marked = [subprocess.Popen([sys.executable, "-c", busy], env=env) for _ in range(2)]
        other = subprocess.Popen([sys.executable, "-c", busy])
        for p in [*marked, other]:
            p.wait()
    table = trial_overhead.process_table(tree, trials=2)
    assert table.loc["python -c", "processes"] == 2
    assert table.loc["python -c", "processes_per_trial"] == 1
    # each ran 0.6 CPU s of loop plus its interpreter's start
    assert 0.8 <= table.loc["python -c", "cpu_s"] <= 1.4
    assert table.loc["python -c", "cpu_s_per_trial"] == table.loc["python -c", "cpu_s"] / 2
    assert other.pid not in {int(pid) for pid in tree.last}


def test_missing_rows_compare_the_released_coco_list_with_its_full_labels(tmp_path: Path) -> None:
    """The released-list row pairs each image of the 40%-left list with its full labels by
    path, whatever the order of the two files."""
    folder = tmp_path / "coco2014_missing"
    folder.mkdir()
    (folder / "coco_train_full.txt").write_text("a.jpg, 0 1\nb.jpg, 1 2 3\nc.jpg, 0\n")
    (folder / "coco_train_0.4left.txt").write_text("c.jpg,0\na.jpg,1\nb.jpg, 2\n")
    labels = np.zeros((4, 80), dtype=np.uint8)
    labels[:, :2] = 1  # two labels per image: q = 0.5 is reachable with one kept
    rows = cooccurrence.missing_rows({"toy": labels}, 0.5, tmp_path)
    released = rows["COCO-2014 40% left (released)"]
    assert released["kept"] == pytest.approx(3 / 6)  # 3 of the 6 true positives listed
    # missing: a's 0, b's 1 and 3 -> 3 of 3 x 80 - 3 unobserved entries
    assert released["all"] == pytest.approx(3 / 237)
    # classes 0 and 1 lead with 2 images each; the first, class 0, is unobserved in a (true)
    # and in b (false)
    assert released["head_class"] == pytest.approx(1 / 2)
    assert released["head_prevalence"] == pytest.approx(2 / 3)
    assert set(rows) == {"toy, q=0.5", "COCO-2014 40% left (released)"}
    assert cooccurrence.missing_rows({"toy": labels}, 0.5, None).keys() == {"toy, q=0.5"}


def test_digits_signal_refuses_two_spaces_of_other_builds(tmp_path: Path) -> None:
    """(a) and (b)/(c) share one prepared directory, so their spaces must name one build."""
    out = str(tmp_path / "runs.jsonl")
    with pytest.raises(SystemExit, match=r"name other DigitsMLT builds \(data.head_share "
                                         r"\[0.35, None\]\); pass two spaces of one build"):
        digits_signal.main(["--space", str(ROOT / "search_spaces/splc.yaml"), "--out", out])
    assert not Path(out).exists()
