"""DBL against its formula and focal BCE; NDLP's confidences, prior, ramps, selection, workers."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from torchvision.ops import sigmoid_focal_loss

import methods
from methods.base import TaskInfo
from methods.dbl import DBLParams, class_aware_weights
from methods.ndlp import NDLP, NDLPParams, ramp, sharpen
from tuner.errors import ConfigError

COUNTS = (40, 12, 6, 3, 1)
TASK = TaskInfo(num_classes=5, num_train=50, class_counts=COUNTS, max_epochs=8,
                label_regime="candidate")


def _logits_targets(seed: int, b: int = 7, c: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(b, c, generator=g, dtype=torch.float64)
    target = (torch.rand(b, c, generator=g) < 0.4).double()
    target[0] = 0.0  # an image without positives (R_i = 0)
    return logits, target


def _reference_dbl(logits: np.ndarray, y: np.ndarray, counts: np.ndarray, n: int,
                   prm: DBLParams) -> np.ndarray:
    """The DB loss written out element by element from Wu et al. (ECCV 2020), in numpy."""
    out = np.zeros_like(logits)
    for i in range(logits.shape[0]):
        repeat = sum(y[i, j] / counts[j] for j in range(len(counts)))
        for c in range(len(counts)):
            p_ic = (1.0 / counts[c]) / repeat if repeat > 0 else np.inf
            r = prm.map_alpha + 1.0 / (1.0 + np.exp(-prm.map_beta * (p_ic - prm.map_gamma)))
            bias = -prm.init_bias * np.log(n / counts[c] - 1.0) / prm.neg_scale
            z = logits[i, c] + bias
            yy = y[i, c]
            z2 = yy * z + (1 - yy) * prm.neg_scale * z
            w = yy * r + (1 - yy) * r / prm.neg_scale
            bce = np.logaddexp(0.0, z2) - yy * z2  # -[y log sigma(z) + (1-y) log(1-sigma(z))]
            p_t = np.exp(-bce)
            out[i, c] = prm.balance_param * (-np.expm1(-bce)) ** prm.focal_gamma * w * bce
            assert np.isclose(1 - p_t, -np.expm1(-bce))
    return out


@pytest.mark.parametrize("knobs", [
    {},
    {"neg_scale": 2.0, "map_gamma": 0.2, "init_bias": 0.1, "focal_gamma": 1.5, "map_alpha": 0.2},
])
def test_dbl_matches_its_formula(knobs: dict) -> None:
    prm = DBLParams(**knobs)
    dbl = methods.create_method("dbl", knobs, TASK)
    logits, target = _logits_targets(seed=0)
    got = dbl.loss(logits, {"target": target})
    ref = _reference_dbl(logits.numpy(), target.numpy(), np.array(COUNTS, float), 50, prm)
    assert_close(got, torch.tensor(ref.sum(axis=1).mean(), dtype=torch.float64))


def test_dbl_with_soft_targets_matches_its_formula() -> None:
    """NDLP's mixup feeds fractional targets; the formula is applied as written."""
    logits, _ = _logits_targets(seed=1)
    soft = torch.softmax(torch.randn(7, 5, generator=torch.Generator().manual_seed(2)), 1).double()
    got = methods.create_method("dbl", {}, TASK).db(logits, soft)
    ref = _reference_dbl(logits.numpy(), soft.numpy(), np.array(COUNTS, float), 50, DBLParams())
    assert_close(got, torch.from_numpy(ref))


@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.0])
def test_dbl_reduces_to_focal_bce(gamma: float) -> None:
    plain = {"map_alpha": 0.5, "map_beta": 0.0, "neg_scale": 1.0, "init_bias": 0.0,
             "balance_param": 1.0, "focal_gamma": gamma}
    logits, target = _logits_targets(seed=3)
    got = methods.create_method("dbl", plain, TASK).loss(logits, {"target": target})
    ref = sigmoid_focal_loss(logits, target, alpha=-1, gamma=gamma, reduction="none")
    assert_close(got, ref.sum(dim=1).mean())


@pytest.mark.parametrize("gamma", [0.05, 0.3, 0.9])
def test_dbl_gradient_stays_finite_on_saturated_logits(gamma: float) -> None:
    """A focal exponent below 1 (the shipped spaces search [0, 3]) on a logit saturated in
    float32 (bce == 0 exactly) gave pow's infinite gradient times 0 = NaN: 3 of 8 random NDLP
    configurations of a search died with a non-finite loss. The gradient must be finite and,
    away from saturation, equal the formula's (checked against float64, where nothing
    saturates at these logits)."""
    knobs = {"focal_gamma": gamma, "neg_scale": 5.0}
    dbl = methods.create_method("dbl", knobs, TASK)
    logits = torch.tensor([[-30.0, 25.0, 0.5, -2.0, 40.0]] * 2, requires_grad=True)
    target = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0, 0.0]])
    dbl.loss(logits, {"target": target}).backward()
    assert torch.isfinite(logits.grad).all(), logits.grad
    ref_logits = logits.detach().double().requires_grad_(True)
    dbl.loss(ref_logits, {"target": target.double()}).backward()
    assert_close(logits.grad, ref_logits.grad.float(), rtol=1e-4, atol=1e-6)


def test_class_aware_weights_match_a_simulated_sampler() -> None:
    """Pick a class uniformly, then one of its images uniformly: the draw frequencies."""
    rng = np.random.default_rng(0)
    labels = (rng.random((30, 4)) < np.array([0.7, 0.3, 0.1, 0.05])).astype(float)
    labels[0, 3] = 1.0
    members = [np.flatnonzero(labels[:, c]) for c in range(4)]
    draws = np.zeros(30)
    for c in rng.integers(0, 4, size=200_000):
        draws[rng.choice(members[c])] += 1
    weights = class_aware_weights(torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(weights / weights.sum(), draws / draws.sum(), atol=3e-3)


# ------------------------------------------------------------------------------------- NDLP
def _candidates(seed: int = 0, n: int = 50, c: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, c, generator=g) < 0.45).float()
    s[s.sum(1) == 0, 0] = 1.0
    return s


def _ndlp(**knobs) -> NDLP:
    m = methods.create_method("ndlp", knobs, TASK)
    m.set_train_targets(_candidates())
    return m


def test_initial_confidence_is_uniform_over_candidates() -> None:
    m = _ndlp()
    s = _candidates()
    assert_close(m.confidence, s / s.sum(1, keepdim=True))


def test_confidence_update_keeps_rows_on_the_candidate_simplex() -> None:
    m = _ndlp(conf_ema=0.3)
    s = _candidates()
    g = torch.Generator().manual_seed(4)
    for _ in range(200):
        index = torch.randint(0, 50, (16,), generator=g)
        m.update_confidence(index, 20.0 * torch.randn(16, 5, generator=g))
    assert (m.confidence >= 0).all()
    assert (m.confidence[s == 0] == 0).all()
    assert_close(m.confidence.sum(1), torch.ones(50))
    # one update by hand: (1 - mu) Q + mu * softmax restricted to the candidates
    before, z = m.confidence[3].clone(), torch.randn(1, 5, generator=g)
    m.update_confidence(torch.tensor([3]), z)
    e = torch.exp(z[0]) * s[3]
    assert_close(m.confidence[3], 0.7 * before + 0.3 * e / e.sum())


@pytest.mark.parametrize("clamp", [10.0, 1e6])
def test_prior_stays_a_finite_distribution_over_1000_updates(clamp: float) -> None:
    """The multiplicative update drifts towards the class with the least mass every batch;
    in log space and clamped it stays finite and positive (the release underflows)."""
    m = _ndlp(prior_clamp=clamp)
    g = torch.Generator().manual_seed(5)
    for step in range(1000):
        mass = torch.rand(5, generator=g) * torch.tensor([50.0, 5.0, 1.0, 0.01, 0.0])
        if step % 7 == 0:
            mass = torch.zeros(5)  # an empty batch
        m.update_prior(mass)
        assert torch.isfinite(m.prior).all() and (m.prior > 0).all()
        assert_close(m.prior.sum(), torch.tensor(1.0))
    assert m.prior.argmax() == 3  # the class with the least (non-zero) mass
    assert m.prior.min() >= 0.9 / (clamp * 5)


def test_prior_update_is_pi_over_batch_share() -> None:
    m = _ndlp(prior_clamp=1e6)
    mass = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.5])
    m.update_prior(mass)
    expected = (0.2 / (mass / mass.sum() + 1e-8))
    assert_close(m.prior, expected / expected.sum())
    m.on_epoch_start(1)
    assert_close(m.prior, torch.full((5,), 0.2))


def test_ramps_hit_their_end_values_at_max_t() -> None:
    m = _ndlp(eta=1.2, alpha_start=0.2, alpha_end=0.9)
    assert m.eta_t(0) == 0.0 and m.alpha_t(0) == pytest.approx(0.2)
    assert m.eta_t(4) == pytest.approx(0.6) and m.alpha_t(4) == pytest.approx(0.55)
    assert m.eta_t(8) == pytest.approx(1.2) and m.alpha_t(8) == pytest.approx(0.9)
    assert m.eta_t(20) == pytest.approx(1.2) and m.alpha_t(20) == pytest.approx(0.9)
    assert ramp(5, 10) == 0.5


def test_alpha_end_below_alpha_start_is_refused_with_both_values() -> None:
    with pytest.raises(ConfigError, match="alpha_end must be >= alpha_start.*0.5.*0.3"):
        NDLPParams(alpha_start=0.5, alpha_end=0.3)


def test_thresholds_sharpening_and_pseudo_labels_by_hand() -> None:
    task = TaskInfo(num_classes=3, num_train=3, class_counts=(2, 2, 2), max_epochs=4)
    m = methods.create_method("ndlp", {"gamma": 2.0}, task)
    m.set_train_targets(torch.tensor([[1.0, 1, 0], [1, 1, 1], [0, 1, 1]]))
    m.confidence = torch.tensor([[0.8, 0.2, 0.0], [0.5, 0.3, 0.2], [0.0, 0.4, 0.6]])
    assert_close(m.thresholds(), torch.tensor([0.65, 0.3, 0.4]))
    sharp, pseudo = m.pseudo_targets(torch.tensor([0, 1, 2]))
    assert_close(sharp[1], torch.tensor([0.25, 0.09, 0.04]) / 0.38)
    assert_close(sharp[2], torch.tensor([0.0, 0.16, 0.36]) / 0.52)  # 0.308 > 0.3
    assert_close(sharp[0], torch.tensor([0.64, 0.04, 0.0]) / 0.68)
    assert pseudo.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert sharpen(torch.zeros(1, 3), 2.0).tolist() == [[0.0, 0.0, 0.0]]


def test_paper_rule_is_the_default_and_unchanged() -> None:
    """``pseudo_rule: paper`` is the default and gives the sharpened softmax > phi_c."""
    assert NDLPParams().pseudo_rule == "paper"
    m, explicit = _ndlp(), _ndlp(pseudo_rule="paper")
    g = torch.Generator().manual_seed(7)
    for ndlp in (m, explicit):
        ndlp.update_confidence(torch.arange(50), 4.0 * torch.randn(50, 5, generator=g))
        g = torch.Generator().manual_seed(7)
    index = torch.arange(50)
    sharp, pseudo = m.pseudo_targets(index)
    assert torch.equal(sharp, sharpen(m.confidence, 3.0))
    assert torch.equal(pseudo, (sharp > m.thresholds()).float())
    for a, b in zip((sharp, pseudo), explicit.pseudo_targets(index)):
        assert torch.equal(a, b)


def _dense_planted() -> NDLP:
    """Image 0: six candidates, confidence uniform over them (a dense image not yet
    disambiguated); images 1-3: two or three candidates, confidence concentrated."""
    task = TaskInfo(num_classes=6, num_train=4, class_counts=(3, 3, 2, 2, 2, 1), max_epochs=4)
    m = methods.create_method("ndlp", {"gamma": 2.0, "pseudo_rule": "scaled"}, task)
    m.set_train_targets(torch.tensor([[1.0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                                      [1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0]]))
    m.confidence[1:] = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0.2, 0, 0.7, 0.1, 0, 0],
                                     [0, 0.9, 0, 0, 0.1, 0]])
    return m


def test_scaled_rule_keeps_every_candidate_of_a_uniform_dense_image() -> None:
    m = _dense_planted()
    index = torch.arange(4)
    soft, pseudo = m.pseudo_targets(index)
    assert pseudo[0].tolist() == [1.0] * 6  # every candidate of the uniform image
    assert_close(soft[0], torch.ones(6))
    # the paper's rule on the same table: 1/6 is not above phi_c for the classes whose other
    # candidates are confident (phi_0 = (1/6 + 0.5 + 0.2) / 3), nor for class 5 (phi = 1/6)
    paper = methods.create_method("ndlp", {"gamma": 2.0}, m.task)
    paper.set_train_targets(m.candidates)
    paper.confidence = m.confidence.clone()
    _, paper_pseudo = paper.pseudo_targets(index)
    assert paper_pseudo[0].tolist() == [0, 0, 0, 1, 1, 0]
    # by hand: psi_c = min(1, mean of |s_i| Q_ic over class c's candidates), |s_i| Q =
    # [1 x 6], [1, 1], [0.6, 2.1, 0.3] (classes 0, 2, 3), [1.8, 0.2] (classes 1, 4)
    assert_close(m.scaled_thresholds(),
                 torch.tensor([2.6 / 3, 1.0, 1.0, 0.65, 0.6, 1.0]))
    sharp = sharpen(m.confidence, 2.0)
    assert_close(soft, (m.candidates.sum(1, keepdim=True) * sharp).clamp(max=1.0))
    assert_close(soft[2], torch.tensor([3 * 0.04 / 0.54, 0, 1, 3 * 0.01 / 0.54, 0, 0]))
    assert pseudo.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                               [0, 1, 0, 0, 0, 0]]


def test_share_rule_by_hand() -> None:
    """|s_i| Q_ic >= share_min over the candidates: the uniform dense image keeps all."""
    m = _dense_planted()
    share = methods.create_method("ndlp", {"gamma": 2.0, "pseudo_rule": "share"}, m.task)
    share.set_train_targets(m.candidates)
    share.confidence = m.confidence.clone()
    # |s_i| Q = [1 x 6], [1, 1], [0.6, 2.1, 0.3] (classes 0, 2, 3), [1.8, 0.2] (classes 1, 4)
    soft, pseudo = share.pseudo_targets(torch.arange(4))
    assert pseudo.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                               [0, 1, 0, 0, 0, 0]]
    assert_close(soft, m.pseudo_targets(torch.arange(4))[0])  # the scaled rule's targets
    strict = methods.create_method("ndlp", {"pseudo_rule": "share", "share_min": 1.0}, m.task)
    strict.set_train_targets(m.candidates)
    strict.confidence = m.confidence.clone()
    assert strict.pseudo_targets(torch.arange(4))[1].tolist() == [
        [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]


@pytest.mark.parametrize("rule", ["scaled", "share"])
@pytest.mark.parametrize("size", [3, 5, 6, 7, 9, 10, 11, 13])
def test_dense_rules_keep_a_uniform_row_exactly(rule: str, size: int) -> None:
    """No rounding of ``|s| * (1/|s|)`` below a threshold of 1 drops a uniform row."""
    task = TaskInfo(num_classes=13, num_train=2, class_counts=(2,) * 13, max_epochs=4)
    knobs = {"pseudo_rule": rule, "gamma": 2.7, "share_min": 1.0}
    m = methods.create_method("ndlp", knobs, task)
    s = torch.zeros(2, 13)
    s[0, :size] = 1.0
    s[1] = 1.0
    m.set_train_targets(s)
    m.confidence[1] = torch.softmax(torch.arange(13.0), dim=0)
    _, pseudo = m.pseudo_targets(torch.arange(2))
    assert pseudo[0].sum() == size


@pytest.mark.parametrize("dense_rule", ["scaled", "share"])
def test_dense_rules_give_every_image_with_candidates_a_pseudo_positive(dense_rule: str) -> None:
    """Dense and sparse images (1 to 6 true labels of 10, each negative a candidate with
    probability 0.3), confidences learnt from logits that favour the true labels: the paper's
    rule leaves dense images without any pseudo-positive, the dense-image rules never do."""
    task = TaskInfo(num_classes=10, num_train=200, class_counts=(100,) * 10, max_epochs=4)
    g = torch.Generator().manual_seed(8)
    size = torch.randint(1, 7, (200, 1), generator=g)
    truth = (torch.rand(200, 10, generator=g).argsort(dim=1) < size).float()
    s = torch.maximum(truth, (torch.rand(200, 10, generator=g) < 0.3).float())
    s[:5] = 0.0  # images without candidates keep none
    rules = {}
    for rule in ("paper", dense_rule):
        m = methods.create_method("ndlp", {"pseudo_rule": rule, "conf_ema": 0.3}, task)
        m.set_train_targets(s)
        g = torch.Generator().manual_seed(9)
        for _ in range(30):
            logits = 3.0 * truth + 0.05 * torch.randn(200, 10, generator=g)
            m.update_confidence(torch.arange(200), logits)
        rules[rule] = m.pseudo_targets(torch.arange(200))[1]
    count = rules[dense_rule].sum(dim=1)
    assert (count[5:] >= 1).all() and (count[:5] == 0).all()
    assert (rules[dense_rule] <= s).all()  # only candidates
    assert (rules["paper"].sum(dim=1)[5:] == 0).sum() >= 5
    recall = {rule: (p * truth).sum() / truth[5:].sum() for rule, p in rules.items()}
    assert recall[dense_rule] > 0.9 > 0.8 > recall["paper"]
    assert (rules[dense_rule] * truth).sum() / rules[dense_rule].sum() > 0.95


@pytest.mark.parametrize("dense_rule", ["scaled", "share"])
def test_dense_rules_mixup_targets_are_the_scaled_confidences(dense_rule: str) -> None:
    from tuner.backbones import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    m = _ndlp(eta=1.0, pseudo_rule=dense_rule)
    m.update_confidence(torch.arange(50), 3.0 * torch.randn(50, 5))
    batch = {"image": torch.randn(12, 3, 16, 16), "index": torch.arange(12)}
    soft, pseudo = m.pseudo_targets(batch["index"])
    assert_close(soft.amax(dim=1), torch.ones(12))  # no softmax shrinkage of the targets
    assert ((soft > 0) == (_candidates()[:12] > 0)).all()
    seen = {}
    m.mixup_loss = lambda model, images, target: seen.setdefault("soft", target).sum()
    m.on_epoch_start(4)
    m.training_step(model.eval(), batch)
    chosen = m.select(m.db(model(batch["image"]), pseudo).mean(dim=1), pseudo, m.alpha_t(4))
    assert_close(seen["soft"], soft[chosen])


def test_selection_takes_the_k_lowest_losses_per_class() -> None:
    m = _ndlp()
    g = torch.Generator().manual_seed(6)
    score = torch.rand(16, generator=g)
    pseudo = (torch.rand(16, 5, generator=g) < 0.4).float()
    pseudo[:, 4] = 0.0  # a class without pseudo positives
    m.prior = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05])
    alpha = 0.5
    expected = torch.zeros(16, dtype=torch.bool)
    for c in range(5):
        members = [i for i in range(16) if pseudo[i, c] > 0]
        if not members:
            continue
        k = max(1, min(math.ceil(m.prior[c].item() * 16 * alpha), len(members)))
        for i in sorted(members, key=lambda i: score[i].item())[:k]:
            expected[i] = True
    assert m.select(score, pseudo, alpha).tolist() == expected.tolist()


def test_mixup_term_is_added_from_epoch_one_only() -> None:
    from tuner.backbones import build_model

    torch.manual_seed(0)
    model = build_model("small_cnn", 5)
    m = _ndlp(eta=1.0)
    batch = {"image": torch.randn(12, 3, 16, 16), "index": torch.arange(12),
             "target": _candidates()[:12]}
    model.eval()  # same BatchNorm output for both calls
    m.on_epoch_start(0)
    base = m.training_step(model, batch)["loss"]
    sharp, pseudo = m.pseudo_targets(batch["index"])
    with torch.no_grad():
        assert_close(base, m.db(model(batch["image"]), pseudo).sum(1).mean())
    m.on_epoch_start(4)  # eta_t = 0.5
    torch.manual_seed(1)
    with_mix = m.training_step(model, batch)["loss"]
    assert with_mix > base


# -------------------------------------------------------------- loop: resume and two workers
def _loop_data(n: int = 40, c: int = 5, s: int = 16):
    from tuner.loop import TrainData

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)
    labels = _candidates(1, n, c)

    def batches(epoch: int, weights=None, **sampling):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
        for start in range(0, n, 10):
            idx = order[start : start + 10]
            yield {"image": images[idx], "index": idx}

    return TrainData(batches, labels, steps_per_epoch=4, val_images=images,
                     val_targets=labels.numpy().astype(np.uint8), groups={"head": [0]})


def _fit(resume=None, stop_after=None, **knobs):
    from tuner.backbones import build_model
    from tuner.loop import TrainConfig, fit

    reports = []

    class Stop(Exception):
        pass

    def report(metrics, state):
        reports.append((metrics, copy.deepcopy(state)))
        if stop_after is not None and metrics["epoch"] >= stop_after:
            raise Stop

    task = TaskInfo(num_classes=5, num_train=40, class_counts=(30, 20, 10, 8, 5), max_epochs=2)
    cfg = TrainConfig.from_dict({"image_size": 16, "batch_size": 10, "max_epochs": 2})
    torch.manual_seed(0)
    try:
        fit(methods.create_method("ndlp", knobs, task), build_model("small_cnn", 5), cfg,
            _loop_data(), report, resume=resume, device=torch.device("cpu"))
    except Stop:
        pass
    return reports


@pytest.mark.parametrize("rule", ["paper", "scaled", "share"])
def test_resume_restores_confidences_and_continues_exactly(rule: str) -> None:
    full = _fit(pseudo_rule=rule)
    first = _fit(stop_after=1, pseudo_rule=rule)
    resumed = _fit(resume=first[-1][1], pseudo_rule=rule)
    assert [m["epoch"] for m, _ in resumed] == [2]
    assert not torch.equal(first[-1][1]["method"]["confidence"], _candidates(1, 40) /
                           _candidates(1, 40).sum(1, keepdim=True))
    for (a, _), (b, _) in zip(full[1:], resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert_close(full[-1][1]["method"]["confidence"], resumed[-1][1]["method"]["confidence"])
    assert_close(full[-1][1]["method"]["prior"], resumed[-1][1]["method"]["prior"])


def _worker_updates(rank: int, world: int) -> dict:
    from tuner.distributed import TorchDist

    m = _ndlp()
    m.dist = TorchDist()
    m.on_epoch_start(1)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):  # the same draws on both ranks; each keeps the rows of its shard
        index = torch.randperm(50, generator=g)[:8]
        logits = torch.randn(8, 5, generator=g)
        mine = index % world == rank
        m.on_batch_end({"index": index[mine]}, {"logits": logits[mine]})
    m.on_epoch_end(1)
    return {"confidence": m.confidence, "prior": m.prior}


def test_two_workers_merge_confidences_and_share_the_prior() -> None:
    from tuner.distributed import run_workers

    out = run_workers(_worker_updates, 2)
    # reference: one process seeing every batch whole
    m = _ndlp()
    m.on_epoch_start(1)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        index = torch.randperm(50, generator=g)[:8]
        m.on_batch_end({"index": index}, {"logits": torch.randn(8, 5, generator=g)})
    m.on_epoch_end(1)
    for rank in range(2):
        assert_close(out[rank]["confidence"], m.confidence)
        assert_close(out[rank]["prior"], m.prior)


@pytest.mark.parametrize("name", ["dbl", "ndlp"])
def test_sampler_uses_clean_labels_only_under_the_oracle_flag(name: str) -> None:
    """``data.class_stats: clean`` reaches the class-aware sampler through
    ``set_stats_targets``; by default the observed (candidate) labels drive it."""
    from tuner.backbones import build_model
    from tuner.loop import TrainConfig, TrainData, fit

    clean = _candidates(seed=1)
    observed = torch.clamp(clean + _candidates(seed=2), max=1.0)  # extra candidates
    images = torch.randint(0, 256, (len(clean), 3, 16, 16), dtype=torch.uint8)
    seen: list[torch.Tensor | None] = []

    def batches(epoch: int, weights=None, **sampling):
        seen.append(None if weights is None else torch.as_tensor(weights).float())
        yield {"image": images[:16], "index": torch.arange(16)}

    cfg = TrainConfig.from_dict({"image_size": 16, "batch_size": 16, "max_epochs": 1})
    for stats, expected in ((None, observed), (clean, clean)):
        method = methods.create_method(name, {"class_aware": True}, TASK)
        data = TrainData(batches, observed, steps_per_epoch=1, val_images=images,
                         val_targets=clean.numpy().astype(np.uint8), stats_targets=stats)
        fit(method, build_model("small_cnn", 5), cfg, data, lambda m, s: None,
            device=torch.device("cpu"))
        assert_close(seen[-1], class_aware_weights(expected).float())
    assert not torch.allclose(class_aware_weights(clean), class_aware_weights(observed))


# -------------------------------------------------------------- issue 21: epoch 0, epoch length
def test_paper_rule_at_epoch_zero_by_hand() -> None:
    """Uniform Q and the strict comparison, as the release: phi = (4/9, 5/12, 5/12); image 1
    (three candidates, q = 1/3 everywhere) gets no pseudo-positive and trains all-negative."""
    task = TaskInfo(num_classes=3, num_train=3, class_counts=(2, 2, 2), max_epochs=4)
    m = methods.create_method("ndlp", {"gamma": 3.0}, task)
    s = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 1]])
    m.set_train_targets(s)
    assert_close(m.thresholds(), torch.tensor([4 / 9, 5 / 12, 5 / 12]))
    sharp, pseudo = m.pseudo_targets(torch.arange(3))
    assert_close(sharp, s / s.sum(1, keepdim=True))  # sharpening keeps a uniform row
    assert pseudo.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 1]]
    m.on_epoch_start(0)
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits

    out = m.training_step(Fixed(), {"image": torch.zeros(3, 1), "index": torch.arange(3),
                                    "target": s})
    assert_close(out["loss"], m.db(logits, pseudo).sum(1).mean())  # no mixup at epoch 0


def test_class_aware_epoch_is_the_released_length() -> None:
    from methods.dbl import class_aware_draws

    voc = torch.zeros(1142, 20)
    voc[:775, 14] = 1.0  # person, 775 of 1,142
    voc[775:, 0] = 1.0
    assert class_aware_draws(voc) == 775 * 20 // 4 == 3875
    coco = torch.zeros(1909, 80)
    coco[:1128, 0] = 1.0
    assert class_aware_draws(coco) == 22560
    small = torch.tensor([[1.0, 0, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0]] * 2)  # counts 8, 2, 4
    assert class_aware_draws(small) == 6  # floor(8 * 3 / 4)


@pytest.mark.parametrize("name", ["dbl", "ndlp"])
@pytest.mark.parametrize("length", ["release", "images"])
def test_loop_draws_the_methods_epoch_length(name: str, length: str) -> None:
    """The loop asks the stream for the method's draws and sizes the LR schedule on them."""
    from methods.dbl import class_aware_draws
    from tuner.backbones import build_model
    from tuner.loop import TrainConfig, TrainData, fit, lr_factor

    observed = _candidates(2, 40, 5)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    asked: list[dict] = []

    def batches(epoch: int, weights=None, **sampling):
        asked.append(sampling)
        yield {"image": images[:16], "index": torch.arange(16)}

    cfg = TrainConfig.from_dict({"image_size": 16, "batch_size": 16, "max_epochs": 1})
    method = methods.create_method(name, {"epoch_draws": length}, TASK)
    data = TrainData(batches, observed, steps_per_epoch=3, val_images=images,
                     val_targets=observed.numpy().astype(np.uint8))
    seen: list[dict] = []
    fit(method, build_model("small_cnn", 5), cfg, data, lambda m, s: seen.append(m),
        device=torch.device("cpu"))
    draws = class_aware_draws(observed)
    steps = math.ceil(draws / 16) if length == "release" else 3
    assert asked == ([{"draws": draws}] if length == "release" else [{}])
    assert seen[0]["lr"] == pytest.approx(cfg.lr * lr_factor(1, steps, cfg))
