"""Each loss against an independent elementwise formula and its known special cases.

The references below are written directly from the equations (plain ``log(sigmoid(.))``,
float64, moderate logits) and share no code with :mod:`methods`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from methods import Method, TaskInfo, create_method, list_methods

TASK = TaskInfo(num_classes=5, num_train=20, class_counts=(10, 5, 3, 2, 1), max_epochs=4)
CASES = [(0, 4, 5), (1, 1, 3), (2, 16, 7), (3, 9, 80)]  # (seed, B, C)


def make_inputs(seed: int, b: int, c: int, scale: float = 3.0) -> tuple[Tensor, Tensor]:
    """``(B, C)`` float64 logits (requires grad) and 0/1 targets."""
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(b, c, generator=gen, dtype=torch.float64)).requires_grad_()
    target = (torch.rand(b, c, generator=gen) < 0.4).to(torch.float64)
    return logits, target


def method(name: str, epoch: int = 0, **values: Any) -> Method:
    m = create_method(name, values, TASK)
    m.on_epoch_start(epoch)
    return m


def loss_and_grad(m: Method, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    z = logits.detach().clone().requires_grad_()
    value = m.loss(z, {"target": target})
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def ref_and_grad(fn: Any, logits: Tensor, target: Tensor, **kw: Any) -> tuple[Tensor, Tensor]:
    z = logits.detach().clone().requires_grad_()
    value = fn(z, target, **kw)
    (grad,) = torch.autograd.grad(value, z)
    return value.detach(), grad


def assert_matches(m: Method, fn: Any, logits: Tensor, target: Tensor, **kw: Any) -> None:
    value, grad = loss_and_grad(m, logits, target)
    ref_value, ref_grad = ref_and_grad(fn, logits, target, **kw)
    assert_close(value, ref_value)
    assert_close(grad, ref_grad)


# ---------------------------------------------------------------- reference formulas
def ref_bce(z: Tensor, y: Tensor) -> Tensor:
    p = torch.sigmoid(z)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum() / z.shape[0]


def ref_focal(z: Tensor, y: Tensor, gamma: float) -> Tensor:
    p = torch.sigmoid(z)
    elem = y * (1 - p) ** gamma * torch.log(p) + (1 - y) * p**gamma * torch.log(1 - p)
    return -elem.sum() / z.shape[0]


def ref_asl(
    z: Tensor, y: Tensor, gamma_neg: float, gamma_pos: float, clip: float, detach: bool = False
) -> Tensor:
    p = torch.sigmoid(z)
    p_m = torch.clamp(p - clip, min=0)
    w_pos, w_neg = (1 - p) ** gamma_pos, p_m**gamma_neg
    if detach:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    elem = y * w_pos * torch.log(p) + (1 - y) * w_neg * torch.log(1 - p_m)
    return -elem.sum() / z.shape[0]


def ref_hill(z: Tensor, y: Tensor, lam: float, margin: float, gamma: float) -> Tensor:
    p, p_m = torch.sigmoid(z), torch.sigmoid(z - margin)
    elem = -y * (1 - p_m) ** gamma * torch.log(p_m) + (1 - y) * (lam - p) * p**2
    return elem.sum() / z.shape[0]


def ref_splc(
    z: Tensor, y: Tensor, tau: float, change_epoch: int, margin: float, gamma: float, epoch: int
) -> Tensor:
    t = y.clone()
    if epoch >= change_epoch:
        t[(y == 0) & (torch.sigmoid(z.detach()) > tau)] = 1.0
    p = torch.sigmoid(z - margin * y)
    elem = t * (1 - p) ** gamma * torch.log(p) + (1 - t) * p**gamma * torch.log(1 - p)
    return -elem.sum() / z.shape[0]


# ---------------------------------------------------------------- BCE
@pytest.mark.parametrize("seed,b,c", CASES)
def test_bce_matches_formula_and_torch(seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    assert_matches(method("bce"), ref_bce, logits, target)
    value, _ = loss_and_grad(method("bce"), logits, target)
    torch_value = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / b
    assert_close(value, torch_value.detach())


# ---------------------------------------------------------------- ASL
ASL_SETTINGS = [
    {},  # defaults: gamma_neg 4, gamma_pos 0, clip 0.05
    {"gamma_neg": 2.5, "gamma_pos": 1.0, "clip": 0.1},
    {"gamma_neg": 0.5, "gamma_pos": 0.5, "clip": 0.0},
    {"gamma_neg": 10.0, "gamma_pos": 3.0, "clip": 0.5},
]


@pytest.mark.parametrize("values", ASL_SETTINGS)
@pytest.mark.parametrize("seed,b,c", CASES)
def test_asl_matches_formula(values: Mapping[str, float], seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("asl", **values)
    kw = {"gamma_neg": m.params.gamma_neg, "gamma_pos": m.params.gamma_pos, "clip": m.params.clip}
    assert_matches(m, ref_asl, logits, target, **kw)


@pytest.mark.parametrize("seed,b,c", CASES)
def test_asl_without_focusing_or_clip_is_bce(seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("asl", gamma_neg=0.0, gamma_pos=0.0, clip=0.0)
    assert_matches(m, ref_bce, logits, target)
    value, _ = loss_and_grad(m, logits, target)
    torch_value = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / b
    assert_close(value, torch_value.detach())


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.5])
@pytest.mark.parametrize("seed,b,c", CASES)
def test_asl_with_equal_gammas_and_no_clip_is_focal(
    gamma: float, seed: int, b: int, c: int
) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("asl", gamma_neg=gamma, gamma_pos=gamma, clip=0.0)
    assert_matches(m, ref_focal, logits, target, gamma=gamma)


@pytest.mark.parametrize("seed,b,c", CASES)
def test_asl_detach_focal_changes_gradient_not_value(seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    kw = {"gamma_neg": 4.0, "gamma_pos": 1.0, "clip": 0.05}
    value, grad = loss_and_grad(method("asl", **kw), logits, target)
    value_d, grad_d = loss_and_grad(method("asl", detach_focal=True, **kw), logits, target)
    assert_close(value_d, value)
    assert not torch.allclose(grad_d, grad)
    ref_value, ref_grad = ref_and_grad(ref_asl, logits, target, detach=True, **kw)
    assert_close(value_d, ref_value)
    assert_close(grad_d, ref_grad)


# ---------------------------------------------------------------- Hill
HILL_SETTINGS = [{}, {"lam": 2.5, "margin": 0.5, "gamma": 0.5}, {"lam": 1.0, "margin": 3.0}]


@pytest.mark.parametrize("values", HILL_SETTINGS)
@pytest.mark.parametrize("seed,b,c", CASES)
def test_hill_matches_formula(values: Mapping[str, float], seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("hill", **values)
    kw = {"lam": m.params.lam, "margin": m.params.margin, "gamma": m.params.gamma}
    assert_matches(m, ref_hill, logits, target, **kw)


@pytest.mark.parametrize("seed,b,c", CASES)
def test_hill_without_margin_or_focusing_splits_into_bce_and_hill(
    seed: int, b: int, c: int
) -> None:
    logits, _ = make_inputs(seed, b, c)
    m = method("hill", lam=1.5, margin=0.0, gamma=0.0)
    ones, zeros = torch.ones_like(logits), torch.zeros_like(logits)
    assert_matches(m, ref_bce, logits, ones)  # positive part: -log p
    p = torch.sigmoid(logits.detach())
    value, _ = loss_and_grad(m, logits, zeros)
    assert_close(value, ((1.5 - p) * p**2).sum() / b)


def test_hill_negative_term_is_flat_at_p_one() -> None:
    logits = torch.tensor([[30.0, 0.0]], dtype=torch.float64)
    _, grad = loss_and_grad(method("hill"), logits, torch.zeros_like(logits))
    assert abs(grad[0, 0].item()) < 1e-10  # confident negatives are barely pushed down
    assert grad[0, 1].item() > 0


# ---------------------------------------------------------------- SPLC
SPLC_SETTINGS = [
    ({}, 0),
    ({}, 1),
    ({"tau": 0.3, "change_epoch": 2, "margin": 0.5, "gamma": 1.5}, 3),
    ({"tau": 0.9, "change_epoch": 0, "margin": 2.0, "gamma": 0.0}, 0),
]


@pytest.mark.parametrize("values,epoch", SPLC_SETTINGS)
@pytest.mark.parametrize("seed,b,c", CASES)
def test_splc_matches_formula(
    values: Mapping[str, float], epoch: int, seed: int, b: int, c: int
) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("splc", epoch=epoch, **values)
    kw = {f: getattr(m.params, f) for f in ("tau", "change_epoch", "margin", "gamma")}
    assert_matches(m, ref_splc, logits, target, epoch=epoch, **kw)


@pytest.mark.parametrize("seed,b,c", CASES)
def test_splc_without_margin_or_focusing_before_change_epoch_is_bce(
    seed: int, b: int, c: int
) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("splc", epoch=1, change_epoch=2, margin=0.0, gamma=0.0)
    assert_matches(m, ref_bce, logits, target)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 4.5])
@pytest.mark.parametrize("seed,b,c", CASES)
def test_splc_without_margin_is_focal(gamma: float, seed: int, b: int, c: int) -> None:
    logits, target = make_inputs(seed, b, c)
    m = method("splc", epoch=0, change_epoch=1, margin=0.0, gamma=gamma)
    assert_matches(m, ref_focal, logits, target, gamma=gamma)


def test_splc_corrects_confident_negatives_only_from_change_epoch() -> None:
    # sigmoid: 0.9 (corrected), 0.5 (below tau), 0.9 on an observed positive (margin applies)
    logits = torch.logit(torch.tensor([[0.9, 0.5, 0.9]], dtype=torch.float64))
    target = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    kw = {"tau": 0.6, "change_epoch": 2, "margin": 1.0, "gamma": 2.0}
    corrected = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    shifted = logits - kw["margin"] * target
    for epoch, expected_target in [(0, target), (1, target), (2, corrected), (5, corrected)]:
        m = method("splc", epoch=epoch, **kw)
        value, _ = loss_and_grad(m, logits, target)
        p = torch.sigmoid(shifted)  # pseudo-positives keep the un-shifted logit
        t, g = expected_target, kw["gamma"]
        ref = -(t * (1 - p) ** g * torch.log(p) + (1 - t) * p**g * torch.log(1 - p)).sum()
        assert_close(value, ref, msg=f"epoch {epoch}")
    assert torch.equal(target, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64))


def test_splc_correction_is_per_batch() -> None:
    m = method("splc", epoch=3)
    confident = torch.tensor([[5.0]], dtype=torch.float64)
    low = torch.tensor([[-5.0]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    m.loss(confident, {"target": zero})
    low_value, _ = loss_and_grad(m, low, zero)
    assert_close(low_value, ref_focal(low, zero, gamma=2.0))  # no stored pseudo-label


# ---------------------------------------------------------------- numerical safety
EXTREME_SETTINGS = [
    ("bce", {}),
    ("asl", {}),
    ("asl", {"gamma_neg": 0.5, "gamma_pos": 0.5, "clip": 0.0}),
    ("asl", {"gamma_neg": 0.0, "gamma_pos": 0.0, "clip": 1e-6, "detach_focal": True}),
    ("hill", {}),
    ("hill", {"margin": 0.0, "gamma": 0.5}),
    ("splc", {"change_epoch": 0}),
    ("splc", {"change_epoch": 0, "gamma": 0.5, "margin": 3.0}),
    ("dbl", {}),
    ("dbl", {"focal_gamma": 0.0}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,values", EXTREME_SETTINGS)
def test_finite_at_extreme_logits(name: str, values: Mapping[str, Any], dtype: torch.dtype) -> None:
    z = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0], dtype=dtype)  # one per class
    logits = z.repeat(2, 1)
    target = torch.tensor([[1.0] * 5, [0.0] * 5], dtype=dtype)
    value, grad = loss_and_grad(method(name, **values), logits, target)
    assert torch.isfinite(value)
    assert torch.isfinite(grad).all(), grad
    assert value.dtype == dtype


def test_every_method_is_covered() -> None:
    """Every logit-only loss is checked here; the others (features, heads) in their own files."""
    from methods import get_method_class

    logit_only = {n for n in list_methods() if get_method_class(n).logit_loss}
    assert {name for name, _ in EXTREME_SETTINGS} == logit_only
    for name in set(list_methods()) - logit_only:
        assert (Path(__file__).parent / f"test_{name}.py").is_file() or any(
            name in f.name for f in Path(__file__).parent.glob("test_*.py")), name
