"""Nothing lost (issue 20): a data directory that is not the platform's, a re-used experiment
name, and the smaller input checks. Real files and real CLIs; none of these tests needs Ray
(every refusal comes before the cluster starts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import tuner.prepare
from tuner import experiment, search
from tuner.data.manifest import SELF_SUM, write_manifest
from tuner.data.owned import WRITING, check_removable, remove_parts
from tuner.data.prepared import PreparedData, ensure_prepared, known_benchmarks
from tuner.errors import ChecksumError, ConfigError, DataError
from tuner.space import load_space

ROOT = Path(__file__).resolve().parents[1]
BCE = ROOT / "search_spaces/bce.yaml"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: what must not change."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def search_argv(tmp_path: Path, *extra: str, space: Path = BCE, method: str = "bce") -> list[str]:
    return ["--method", method, "--space", str(space), "--out", str(tmp_path / "exp"),
            "--name", "x", *extra]


# ------------------------------------------------------------- case 1: --data-dir
def test_a_data_dir_without_a_manifest_is_refused_and_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("three years of work")
    before = snapshot(folder)
    assert search.main(search_argv(tmp_path, "--data-dir", str(folder))) == 2
    err = one_line_error(capsys)
    assert str(folder) in err and "thesis.tex" not in err
    assert f"python -m tuner.prepare --benchmark digits-mlt --out {folder}" in err
    assert snapshot(folder) == before
    assert not (tmp_path / "exp").exists()  # the refused search left nothing behind


@pytest.mark.parametrize("damage", ["unreadable", "edited"])
def test_a_data_dir_with_a_damaged_manifest_is_refused_and_kept(
        digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(digits_dir, folder)
    manifest = folder / "manifest.json"
    if damage == "unreadable":
        manifest.write_text(manifest.read_text()[:100])
    else:
        manifest.write_text(manifest.read_text().replace('"benchmark": "digits-mlt"',
                                                         '"benchmark": "digits-mlt", "x": 1'))
    (folder / "labels" / "my-notes.txt").write_text("mine")
    before = snapshot(folder)
    assert search.main(search_argv(tmp_path, "--data-dir", str(folder))) == 2
    err = one_line_error(capsys)
    assert str(folder) in err and "nothing was deleted" in err and "tuner.prepare" in err
    assert snapshot(folder) == before


def test_prepare_overwrite_deletes_only_what_the_platform_wrote(
        digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.csv").write_text("1,2")
    assert tuner.prepare.main(["--benchmark", "digits-mlt", "--out", str(foreign),
                               "--overwrite", "--no-progress"]) == 2
    assert "is not a directory the platform prepared" in one_line_error(capsys)
    assert (foreign / "a.csv").read_text() == "1,2"

    prepared = tmp_path / "prepared"
    shutil.copytree(digits_dir, prepared)
    (prepared / "images" / "README").write_text("mine")
    before = snapshot(prepared)
    assert tuner.prepare.main(["--benchmark", "digits-mlt", "--out", str(prepared),
                               "--overwrite", "--no-progress"]) == 2
    assert "images/README" in one_line_error(capsys)
    assert snapshot(prepared) == before
    # without the foreign file the platform's own files are exactly what it would replace
    (prepared / "images" / "README").unlink()
    assert set(check_removable(prepared)) == set(snapshot(prepared))


def test_an_empty_data_dir_is_filled_and_said_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    assert ensure_prepared("digits-mlt", folder) == folder
    assert f"building DigitsMLT (seed 0) into {folder}" in capsys.readouterr().err
    PreparedData(folder).verify()
    assert not (folder / WRITING).exists()
    assert ensure_prepared("digits-mlt", folder) == folder  # used as it is from now on
    assert capsys.readouterr().err == ""


def test_an_interrupted_write_is_the_platforms_and_staging_keeps_foreign_files(
        tmp_path: Path) -> None:
    half = tmp_path / "half"
    (half / "images").mkdir(parents=True)
    (half / "images" / "train-00000.parquet").write_bytes(b"half-written")
    with pytest.raises(DataError, match="no manifest.json"):  # no marker: not provably ours
        check_removable(half)
    (half / WRITING).touch()
    (half / "manifest.tmp4242").write_text("{")  # write_manifest's temporary file
    assert check_removable(half) == [WRITING, "images/train-00000.parquet", "manifest.tmp4242"]
    (half / "images" / "keep.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="images/keep.jpg"):
        check_removable(half, owned=True)
    parts = tmp_path / ".out.parts"
    parts.mkdir()
    (parts / "train-00000-0123456789ab.parquet").write_bytes(b"part")
    (parts / "notes.txt").write_text("mine")
    remove_parts(parts)
    assert [p.name for p in parts.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------- case 7: manifest checksum
def test_an_edited_manifest_fails_verify(
        digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(digits_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest[SELF_SUM] and manifest["schema_version"] == 2
    assert tuner.prepare.main(["--verify", str(folder)]) == 0
    capsys.readouterr()
    manifest["class_counts"]["train"][0] += 1  # a value edited by hand
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert tuner.prepare.main(["--verify", str(folder)]) == 2
    err = one_line_error(capsys)
    assert str(folder / "manifest.json") in err and "changed after it was written" in err
    with pytest.raises(ChecksumError):
        PreparedData(folder)
    write_manifest(folder, manifest)  # the platform's own writes stay valid
    assert PreparedData(folder).manifest["class_counts"]["train"][0] == manifest[
        "class_counts"]["train"][0]


def test_a_manifest_without_its_checksum_is_an_older_schema(digits_dir: Path,
                                                            tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(digits_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest[SELF_SUM]
    manifest["schema_version"] = 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"schema_version=1, this tuner reads 2 \(.*checksum\); re-run"):
        PreparedData(folder)
    ensure_prepared("digits-mlt", folder)  # a DigitsMLT of the older schema is rebuilt
    assert PreparedData(folder).manifest["schema_version"] == 2


# ------------------------------------------------------------- case 7: smaller input checks
def test_an_empty_space_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert search.main(search_argv(tmp_path, space=empty)) == 2
    err = one_line_error(capsys)
    assert "empty" in err and "nothing to tune" in err and "search_spaces/bce.yaml" in err


def test_a_space_without_domains_runs_one_trial_only(tmp_path: Path) -> None:
    raw = yaml.safe_load(BCE.read_text())
    raw["train"] = {"lr": 1.0e-3}
    raw["params"] = {}
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="search.num_trials: 8 trials of a space without any "
                                          "domain .* would all be the same"):
        load_space(path)
    assert not load_space(path, {"search": {"num_trials": 1}}).tunables()


def test_an_unknown_benchmark_names_the_flag_and_choices_prepare_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert search.main(search_argv(tmp_path, "--benchmark", "imagenet")) == 2
    err = one_line_error(capsys)
    assert "--benchmark 'imagenet': unknown benchmark" in err and "tuner.prepare" not in err
    for name in known_benchmarks():  # every suggested name is one tuner.prepare accepts
        tuner.prepare.build_parser().parse_args(["--benchmark", name, "--out", "x"])
    raw = yaml.safe_load(BCE.read_text())
    raw["data"]["benchmark"] = "imagenet"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="data.benchmark: unknown benchmark 'imagenet'"):
        load_space(tmp_path / "s.yaml")
    with pytest.raises(DataError) as info:
        ensure_prepared("imagenet", tmp_path / "nothing")
    assert "unknown benchmark" in str(info.value) and "tuner.prepare" not in str(info.value)


# ------------------------------------------------------------- case 2: a re-used --name
def started_experiment(tmp_path: Path, *, finished: bool) -> Path:
    """An experiment directory as a 4-trial bce search leaves it (the record is the
    platform's; the outputs stand in for the search's own)."""
    exp = tmp_path / "exp" / "x"
    space = load_space(BCE, {"search": {"num_trials": 4}}, method="bce")
    experiment.write_record(exp, space)
    for name in ("optuna.db", "leaderboard.csv", "best_config.yaml", "search.json",
                 "experiment_state-2026-12-02_06-00-00.json"):
        (exp / name).write_text(f"{name} of the first search")
    if finished:
        record = experiment.read_record(exp)
        record.update(finished="2026-12-02T06:10:00Z", trials=4, tested=True)
        (exp / "experiment.json").write_text(json.dumps(record))
        (exp / "test_metrics.json").write_text("{}")
    return exp


@pytest.mark.parametrize("finished", [False, True])
def test_another_method_or_budget_is_refused_naming_what_differs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], finished: bool) -> None:
    exp = started_experiment(tmp_path, finished=finished)
    before = snapshot(exp)
    hill = ROOT / "search_spaces/hill.yaml"
    assert search.main(search_argv(tmp_path, "--trials", "4", space=hill, method="hill")) == 2
    err = one_line_error(capsys)
    assert str(exp) in err and "method \"bce\" -> \"hill\"" in err and "new --name" in err
    assert search.main(search_argv(tmp_path, "--trials", "6")) == 2
    assert "search.num_trials 4 -> 6" in one_line_error(capsys)
    assert search.main(search_argv(tmp_path, "--trials", "4", "--epochs", "3")) == 2
    assert "asha.max_epochs 8 -> 3" in one_line_error(capsys)
    assert search.main(["--method", "bce", "--space", str(BCE), "--trials", "6",
                        "--resume", str(exp)]) == 2
    assert "search.num_trials 4 -> 6" in one_line_error(capsys)
    assert snapshot(exp) == before


def test_a_finished_search_is_reported_not_rerun(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = started_experiment(tmp_path, finished=True)
    before = snapshot(exp)
    # where it runs may change (concurrency); what it is may not
    assert search.main(search_argv(tmp_path, "--trials", "4", "--concurrency", "1")) == 0
    out = capsys.readouterr().out
    assert f"experiment {exp} is finished (4 trials" in out and "python -m tuner.report" in out
    assert snapshot(exp) == before


def test_an_unfinished_search_with_the_same_settings_continues(tmp_path: Path) -> None:
    started_experiment(tmp_path, finished=False)
    args = search.build_parser().parse_args(search_argv(tmp_path, "--trials", "4"))
    space = load_space(BCE, search.overrides_from_args(args), method="bce")
    assert experiment.check_reuse(args, space) is False  # tuner.search resumes it


def test_a_search_recorded_before_search_order_existed_continues(tmp_path: Path) -> None:
    exp = started_experiment(tmp_path, finished=False)
    record = json.loads((exp / experiment.RECORD).read_text())
    record["fingerprint"].pop("search.order", None)  # as written before the setting existed
    (exp / experiment.RECORD).write_text(json.dumps(record))
    args = search.build_parser().parse_args(search_argv(tmp_path, "--trials", "4",
                                                        "--order", "arrival"))
    space = load_space(BCE, search.overrides_from_args(args), method="bce")
    assert experiment.check_reuse(args, space) is False


def test_a_search_recorded_before_head_share_existed_continues_only_at_its_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = started_experiment(tmp_path, finished=False)
    record = json.loads((exp / experiment.RECORD).read_text())
    assert record["fingerprint"].pop("data.head_share", "absent") is None  # recorded now
    (exp / experiment.RECORD).write_text(json.dumps(record))  # as written before the key existed
    args = search.build_parser().parse_args(search_argv(tmp_path, "--trials", "4"))
    space = load_space(BCE, search.overrides_from_args(args), method="bce")
    assert experiment.check_reuse(args, space) is False
    variant = load_space(BCE, {**search.overrides_from_args(args), "data": {"head_share": 0.35}},
                         method="bce")
    with pytest.raises(ConfigError, match=r"data.head_share null -> 0.35"):
        experiment.check_reuse(args, variant)


def test_an_older_experiment_of_another_method_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "exp" / "x"
    exp.mkdir(parents=True)
    (exp / "search.json").write_text(json.dumps({"method": "hill"}))
    (exp / "best_config.yaml").write_text("{}")
    assert search.main(search_argv(tmp_path)) == 2
    assert "is a 'hill' search, not 'bce'" in one_line_error(capsys)
