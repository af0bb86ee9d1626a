"""Each method's default configuration is the paper's (as released, with its bugs fixed), and
each shipped space runs it: every paper value is the space's constant or inside its domain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import methods

ROOT = Path(__file__).resolve().parents[1]

#: the released configurations (METHODS.md; VOC settings where COCO and VOC differ)
DBL_VOC = {"map_alpha": 0.1, "map_beta": 10.0, "map_gamma": 0.3, "neg_scale": 5.0,
           "init_bias": 0.05, "focal_gamma": 2.0, "balance_param": 2.0, "class_aware": True,
           "epoch_draws": "release"}
PAPER: dict[str, dict[str, Any]] = {
    "dbl": DBL_VOC,
    "ndlp": {**DBL_VOC, "eta": 0.9, "gamma": 3.0, "alpha_start": 0.4, "alpha_end": 0.8,
             "conf_ema": 0.1, "mix_beta": 4.0, "pseudo_rule": "paper"},
    "comic": {"tau": 0.7, "margin": 1.0, "compute_epoch": 1, "rlc_weight": 0.2,
              "rlc_exponent": 1 / 6, "gamma_neg": 3.0, "gamma_pos": 0.0, "clip": 0.05,
              "gamma_class_ng": 1.2, "prior_exponent": 1 / 3, "scale": 16.0,
              "norm_offset": 1 / 32, "tde_alpha": 2.0, "mean_momentum": 0.9,
              "feature_act": "log_softmax", "views": "dataset", "htb": False,
              "htb_weighting": "release", "htb_term": "release", "eval_logits": "balanced",
              "freeze_trunk": True, "cls_lr_scale": 0.1, "attention_mix": 0.1},
    "cones": {"beta": 0.1, "r_ws": 3.0, "tau_cam": 0.1, "n_clusters": 5, "memory_size": 256,
              "conf_momentum": 0.99, "corr_momentum": 0.99, "classifier_lr_mult": 10.0,
              "neg_weight_norm": "sum_power"},
}


def _contains(domain: Any, value: Any, params: dict[str, Any]) -> bool:
    if not isinstance(domain, dict):
        return domain == value if not isinstance(value, float) else abs(domain - value) < 1e-3
    (kind, args), = ((k, v) for k, v in domain.items() if k != "below")
    if kind == "choice":
        return value in args
    lo, hi = (PAPER_BOUND(params, a) for a in args)
    if kind == "randint":
        return lo <= value < hi
    return lo <= value <= hi


def PAPER_BOUND(params: dict[str, Any], bound: Any) -> float:  # noqa: N802 - a named bound
    return params[bound] if isinstance(bound, str) else bound


@pytest.mark.parametrize("name", sorted(PAPER))
def test_default_params_are_the_papers(name: str) -> None:
    defaults = methods.get_method_class(name).Params()
    for key, value in PAPER[name].items():
        got = getattr(defaults, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shipped_space_runs_the_papers_configuration(name: str) -> None:
    raw = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    space = raw["params"]
    for key, value in PAPER[name].items():
        if key not in space:  # not in the space: the (paper) default applies
            continue
        assert _contains(space[key], value, PAPER[name]), f"{name}.{key}: {space[key]!r}"


def test_every_algorithm_variant_is_searched() -> None:
    """Platform variants that change an algorithm are categorical choices of the space."""
    spaces = {n: yaml.safe_load((ROOT / "search_spaces" / f"{n}.yaml").read_text())["params"]
              for n in ("ndlp", "comic", "cones")}
    assert set(spaces["ndlp"]["pseudo_rule"]["choice"]) == {"paper", "share", "scaled"}
    for key, both in (("views", {"dataset", "batch"}), ("eval_logits", {"balanced", "ensemble"}),
                      ("feature_act", {"log_softmax", "relu"}), ("freeze_trunk", {True, False})):
        assert set(spaces["comic"][key]["choice"]) == both, key
    assert set(spaces["cones"]["neg_weight_norm"]["choice"]) == {"sum_power", "simplex"}
