"""Search-space files: shipped spaces valid, every problem reported at once, constraints hold."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
import yaml

import methods
from tuner import search
from tuner.errors import ConfigError
from tuner.space import Domain, load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


def test_every_registered_method_has_a_space() -> None:
    assert {p.stem for p in SPACES} >= set(methods.list_methods())


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_is_valid_and_documented(path: Path) -> None:
    space = load_space(path)
    assert space.method == path.stem
    text = path.read_text()
    assert f"python -m tuner.search --method {path.stem} --space search_spaces/{path.name}" in text
    for line in text.splitlines():
        if re.match(r"^\s*[a-z_]+:\s*\S", line) and not line.startswith("method:"):
            assert "#" in line, f"{path.name}: key without a comment: {line!r}"
    assert space.asha["grace_period"] <= space.max_epochs


def _raw(**sections):
    base = yaml.safe_load((ROOT / "search_spaces/hill.yaml").read_text())
    for name, values in sections.items():
        base[name] = {**(base.get(name) or {}), **values}
    return base


def test_all_problems_reported_at_once_with_file_and_key() -> None:
    raw = _raw(
        params={"lam": {"uniform": [0.1, 9.0]}, "bogus": 1, "gamma": {"normal": [0, 1]}},
        train={"lr": {"loguniform": [0.0, 1.0]}, "batch_size": 0},
        asha={"grace_period": 50},
    )
    raw["extra"] = 1
    with pytest.raises(ConfigError) as info:
        parse_space(raw, "spaces/x.yaml")
    msg = str(info.value)
    for key in ("params.lam", "params.bogus", "params.gamma", "train.lr", "train.batch_size",
                "asha.grace_period", "extra"):
        assert f"spaces/x.yaml: {key}" in msg, key
    assert "7 problem(s)" in msg


def test_out_of_range_constant_and_choice_are_refused() -> None:
    raw = _raw(params={"margin": 5.0})
    with pytest.raises(ConfigError, match=r"params\.margin: margin must be in \[0"):
        parse_space(raw)
    raw = yaml.safe_load((ROOT / "search_spaces/splc.yaml").read_text())
    raw["params"]["tau"] = {"choice": [0.5, 1.5]}
    with pytest.raises(ConfigError, match=r"params\.tau"):
        parse_space(raw)


def test_method_mismatch_and_unknown_method() -> None:
    with pytest.raises(ConfigError, match="is for 'hill' but --method is 'asl'"):
        parse_space(_raw(), method="asl")
    with pytest.raises(ConfigError, match="registered methods: .*hill"):
        parse_space(_raw(), method="nope")


def _sample(space, n: int = 40, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space.define_by_run(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 0.0)
    return out


def test_splc_change_epoch_stays_below_the_budget() -> None:
    space = load_space(ROOT / "search_spaces/splc.yaml", {"asha": {"max_epochs": 3,
                                                                   "grace_period": 1}})
    values = {s["method/change_epoch"] for s in _sample(space)}
    assert values and max(values) < 3
    assert values <= {0, 1, 2}


def test_named_bound_orders_parameters_and_randint_is_high_exclusive() -> None:
    raw = _raw(params={"margin": {"uniform": [0.0, 1.5]}, "lam": {"uniform": ["margin", 2.5]}},
               train={"batch_size": {"randint": [16, 18]}})
    raw["params"] = {"margin": raw["params"]["margin"], "lam": raw["params"]["lam"],
                     "gamma": 2.0}
    space = parse_space(raw)
    assert isinstance(space.params["lam"], Domain)
    samples = _sample(space)
    assert all(s["method/lam"] >= s["method/margin"] for s in samples)
    assert {s["train/batch_size"] for s in samples} == {16, 17}
    assert all(s["method/gamma"] == 2.0 for s in samples)


def test_bound_naming_a_later_or_unknown_parameter_is_refused() -> None:
    raw = _raw(params={"lam": {"uniform": ["nothing", 2.5]}})
    with pytest.raises(ConfigError, match="bound 'nothing' is not a parameter defined earlier"):
        parse_space(raw)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: hill\nparams: {lam: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(bad)


def test_search_cli_unknown_method_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = search.main(["--method", "nope", "--space", str(ROOT / "search_spaces/hill.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "registered methods" in err and "splc" in err


def test_search_cli_bad_space_lists_problems(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text(yaml.safe_dump(_raw(params={"lam": 99.0, "zzz": 1})))
    code = search.main(["--method", "hill", "--space", str(bad), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}: params.lam" in err and f"{bad}: params.zzz" in err


def test_fixed_config_round_trips_as_a_space() -> None:
    space = load_space(ROOT / "search_spaces/hill.yaml")
    sample = _sample(space, n=1)[0]
    config = {"train": {}, "method": {}}
    for key, value in sample.items():
        section, name = key.split("/")
        config[section][name] = value
    doc = yaml.safe_load(yaml.safe_dump(space.fixed_config(config)))
    fixed = parse_space(doc)
    assert not fixed.tunables()
    assert fixed.params["lam"] == pytest.approx(sample["method/lam"])


def test_search_cli_overrides_benchmark_and_label_regime() -> None:
    args = search.build_parser().parse_args(
        ["--method", "bce", "--space", "s.yaml", "--label-regime", "candidate:0.3",
         "--benchmark", "voc-mlt"])
    data = search.overrides_from_args(args)["data"]
    assert data == {"label_regime": "candidate", "rate": 0.3, "benchmark": "voc-mlt",
                    "head_share": None}  # splc.yaml's DigitsMLT variant means nothing there
    space = load_space(ROOT / "search_spaces/bce.yaml", search.overrides_from_args(args),
                       method="bce")
    assert (space.data["label_regime"], space.data["rate"]) == ("candidate", 0.3)
    clean = search.overrides_from_args(search.build_parser().parse_args(
        ["--method", "bce", "--space", "s.yaml", "--label-regime", "clean"]))
    assert clean["data"] == {"label_regime": "clean", "rate": 0.0}


def test_head_share_is_a_digits_variant_and_the_cli_benchmark_drops_it() -> None:
    raw = yaml.safe_load((ROOT / "search_spaces/splc.yaml").read_text())
    assert raw["data"]["head_share"] == 0.35  # SPLC's regime, RESULTS.md section 7
    for share in (0, 1.5, "x", True):
        bad = {**raw, "data": {**raw["data"], "head_share": share}}
        words = f"data.head_share: must be null (the default build) or a number in (0, 1], got {share!r}"
        with pytest.raises(ConfigError, match=re.escape(words)):
            parse_space(bad)
    voc = {**raw, "data": {**raw["data"], "benchmark": "voc-mlt"}}
    with pytest.raises(ConfigError, match="for digits-mlt only, not 'voc-mlt'; set it to null"):
        parse_space(voc)
    args = search.build_parser().parse_args(["--method", "splc", "--space", "s.yaml",
                                             "--benchmark", "voc-mlt"])
    space = load_space(ROOT / "search_spaces/splc.yaml", search.overrides_from_args(args),
                       method="splc")
    assert space.data["benchmark"] == "voc-mlt" and space.data["head_share"] is None
    assert load_space(ROOT / "search_spaces/hill.yaml").data["head_share"] is None


def test_search_cli_bad_label_regime_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    hill = str(ROOT / "search_spaces/hill.yaml")
    assert search.main(["--method", "hill", "--space", hill, "--label-regime", "missing:lots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--label-regime 'missing:lots'" in err
    assert search.main(["--method", "hill", "--space", hill, "--label-regime", "noisy:0.2"]) == 2
    err = capsys.readouterr().err.strip()
    # the command line is named, not the space file (issue 20, case 7)
    assert len(err.splitlines()) == 1 and "hill.yaml" not in err
    assert "--label-regime 'noisy:0.2': label regime must be one of" in err and "'noisy'" in err


def test_reported_groups_follow_the_protocol_setting() -> None:
    """data.groups: benchmark (default, DBL protocol) | observed (PLT protocol, COMIC)."""
    assert load_space(ROOT / "search_spaces/hill.yaml").data["groups"] == "benchmark"
    assert load_space(ROOT / "search_spaces/comic.yaml").data["groups"] == "observed"
    raw = yaml.safe_load((ROOT / "search_spaces/comic.yaml").read_text())
    raw["data"]["groups"] = "true"
    with pytest.raises(ConfigError, match=r"data\.groups: must be benchmark .* got 'true'"):
        parse_space(raw)


def test_choice_below_a_budget_that_leaves_no_option_is_refused_up_front() -> None:
    # COMIC's compute_epoch {choice: [1, 2, 3, 5], below: max_epochs} at a 1-epoch budget:
    # Optuna's suggest_categorical would raise on [] in the middle of the search.
    with pytest.raises(ConfigError, match=r"params.compute_epoch: no option of \[1, 2, 3, 5\] "
                                          r"is below max_epochs=1"):
        load_space(ROOT / "search_spaces/comic.yaml", {"asha": {"max_epochs": 1,
                                                                "grace_period": 1}})
    space = load_space(ROOT / "search_spaces/comic.yaml", {"asha": {"max_epochs": 2,
                                                                    "grace_period": 1}})
    assert {s["method/compute_epoch"] for s in _sample(space)} == {1}
