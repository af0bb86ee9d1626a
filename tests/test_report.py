"""``python -m tuner.report`` on a small real experiment (one real search for the whole file)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml

from tuner import report, search
from tuner.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
MAX_EPOCHS = 2


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """A real 3-trial, 2-epoch BCE search on DigitsMLT (missing labels), then its report."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data"
    shutil.copytree(digits_dir, data)
    space = yaml.safe_load((ROOT / "search_spaces/bce.yaml").read_text())
    space["asha"] = {"max_epochs": MAX_EPOCHS, "grace_period": 1, "reduction_factor": 2}
    space["search"].update(num_trials=3, max_concurrent=2, seed=3)
    (tmp / "bce.yaml").write_text(yaml.safe_dump(space))
    code = search.main(["--method", "bce", "--space", str(tmp / "bce.yaml"), "--out",
                        str(tmp / "exp"), "--name", "rep", "--data-dir", str(data)])
    ray.shutdown()
    assert code == 0
    exp = tmp / "exp" / "rep"
    assert report.main([str(exp)]) == 0
    return exp


class _Tables(HTMLParser):
    """Rows of every ``<table>`` of a page, keyed by the table's class."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._current: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._current = self.tables.setdefault(dict(attrs).get("class") or "", [])
        elif tag == "tr" and self._current is not None:
            self._current.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._current is not None:
            self._current[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _table(exp: Path, cls: str) -> pd.DataFrame:
    parser = _Tables()
    parser.feed((exp / "report.html").read_text())
    head, *rows = parser.tables[cls]
    return pd.DataFrame(rows, columns=head)


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.integration
def test_report_has_every_figure_and_the_dashboard_command(experiment: Path) -> None:
    page = (experiment / "report.html").read_text()
    for name in ("learning_curves", "parallel_coordinates", "importance", "long_tail"):
        png = experiment / "figures" / f"{name}.png"
        width, height = _png_size(png)
        assert width > 300 and height > 150 and png.stat().st_size > 10_000, name
        assert f'src="figures/{name}.png"' in page
    assert f"optuna-dashboard sqlite:///{experiment / 'optuna.db'}" in page
    assert f"python -m tuner.dashboard {experiment}" in page


@pytest.mark.integration
def test_leaderboard_rows_match_the_parquet_results(experiment: Path) -> None:
    trials = pd.read_parquet(experiment / "trials.parquet")
    board = _table(experiment, "leaderboard")
    assert sorted(board["trial"]) == sorted(trials["trial_id"].unique())
    per_trial = trials.groupby("trial_id")
    for _, row in board.iterrows():
        rows = per_trial.get_group(row["trial"])
        best = rows.loc[rows["val_mAP"].idxmax()]
        for key in ("mAP", "mAP_head", "mAP_medium", "mAP_tail"):
            assert float(row[f"val {key}"]) == pytest.approx(best[f"val_{key}"], abs=0.006)
        assert int(row["epochs"]) == rows["epoch"].max()
        assert row["status"] == rows["trial_status"].iloc[0]
    assert list(board["val mAP"].astype(float)) == sorted(board["val mAP"].astype(float),
                                                          reverse=True)
    test = json.loads((experiment / "test_metrics.json").read_text())
    assert float(board.loc[0, "test mAP"]) == pytest.approx(test["mAP"], abs=0.006)
    assert (board.loc[1:, "test mAP"] == "\u2013").all()  # test is scored for the best only


@pytest.mark.integration
def test_cost_ledger_sums_reserved_resources_times_wall_time(experiment: Path) -> None:
    trials = pd.read_parquet(experiment / "trials.parquet")
    last = trials.sort_values("epoch").groupby("trial_id").tail(1).set_index("trial_id")
    cost = pd.read_csv(experiment / "cost.csv", dtype={"trial_id": str}).set_index("trial_id")
    # bce.yaml: 1 training CPU + 1 data CPU, 0 GPUs per trial
    expected = last["time_total_s"] * 2 / 3600
    pd.testing.assert_series_equal(cost["cpu_hours"].sort_index(), expected.sort_index(),
                                   check_names=False)
    assert (cost["gpu_hours"] == 0).all()
    stopped = last["trial_status"] == "STOPPED"
    _, totals = report.cost_ledger(report.load_experiment(experiment))
    assert totals["cpu_hours"] == pytest.approx(expected.sum())
    assert totals["stopped_share_cpu"] == pytest.approx(expected[stopped].sum() / expected.sum())
    assert math.isnan(totals["stopped_share_gpu"])
    page = (experiment / "report.html").read_text()
    assert f"{totals['cpu_hours']:.4f} CPU-hours" in page


@pytest.mark.integration
def test_per_class_ap_averages_to_the_test_metrics(experiment: Path) -> None:
    table = pd.read_csv(experiment / "per_class_ap.csv")
    test = json.loads((experiment / "test_metrics.json").read_text())
    manifest = json.loads((experiment.parents[1] / "data" / "manifest.json").read_text())
    assert list(table["train_count"]) == manifest["class_counts"]["train"]
    assert (table["observed_count"] <= table["train_count"]).all()
    assert table["ap"].mean() == pytest.approx(test["mAP"], abs=1e-6)
    for group, members in manifest["groups"].items():
        assert sorted(table.index[table["group"] == group]) == sorted(members)
        assert table.loc[members, "ap"].mean() == pytest.approx(test[f"mAP_{group}"], abs=1e-6)


@pytest.mark.integration
def test_optuna_study_has_every_epoch(experiment: Path) -> None:
    study = optuna.load_study(study_name=experiment.name,
                              storage=f"sqlite:///{experiment / 'optuna.db'}")
    trials = pd.read_parquet(experiment / "trials.parquet")
    epochs = sorted(trials.groupby("trial_id")["epoch"].max())
    assert sorted(len(t.intermediate_values) for t in study.trials) == epochs


@pytest.mark.parametrize("grace,max_t,factor", [(1, 2, 2), (1, 8, 2), (2, 8, 2), (1, 9, 3),
                                                (3, 10, 2), (2, 2, 2), (1, 30, 4)])
def test_asha_rungs_match_ray(grace: int, max_t: int, factor: int) -> None:
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=grace,
                         reduction_factor=factor, metric="m", mode="max")
    rays = sorted(int(level) for level, _ in asha._brackets[0]._rungs if level < max_t)
    assert report.asha_rungs(grace, max_t, factor) == rays


def test_missing_experiment_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: experiment directory") and "\n" not in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "search.json").write_text("{}")
    assert report.main([str(tmp_path / "half")]) == 2
    assert "trials.parquet" in capsys.readouterr().err


def test_restricted_loader_refuses_foreign_objects(tmp_path: Path) -> None:
    import datetime

    good = {"best": {"model": {"w": torch.ones(2)}}, "rng": np.random.get_state()}
    torch.save(good, tmp_path / "good.pt")
    loaded = report.load_state_restricted(tmp_path / "good.pt")
    torch.testing.assert_close(loaded["best"]["model"]["w"], torch.ones(2))
    torch.save({"when": datetime.date(2020, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="restricted loader"):
        report.load_state_restricted(tmp_path / "bad.pt")
