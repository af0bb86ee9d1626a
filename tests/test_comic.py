"""COMIC: each loss term against its formula (NumPy, by hand), the sampler views' class
statistics, the TDE logits, the method state and its multi-worker collectives."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.testing import assert_close

import methods
from methods.base import TaskInfo
from methods.comic import (
    COMIC,
    COMICNet,
    COMICParams,
    CosineClassifier,
    attention_scores,
    cooccurrence,
    htb_loss,
    pfm_loss,
    prior_weights,
    recall_targets,
    rlc_loss,
    view_rows,
    view_sample_weights,
)
from tuner.backbones import build_model

ROOT = Path(__file__).resolve().parents[1]
C = 5
TASK = TaskInfo(num_classes=C, num_train=40, class_counts=(80, 40, 20, 10, 5), max_epochs=4)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _data(seed: int, b: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(b, C, generator=gen, dtype=torch.float64)
    target = (torch.rand(b, C, generator=gen) < 0.4).double()
    target[target.sum(1) == 0, 0] = 1.0
    return logits, target


def _labels(seed: int = 3, n: int = 40) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, C, generator=gen) < 0.35).float()
    y[y.sum(1) == 0, 1] = 1.0
    return y


# ------------------------------------------------------------------------------ statistics
def test_prior_weights_follow_the_formula() -> None:
    counts = np.array([80.0, 40.0, 20.0, 10.0, 0.0])
    expected = (1 - np.log(np.maximum(counts, 1) / 80.0)) ** (1 / 3)
    assert_close(prior_weights(torch.tensor(counts), 1 / 3), torch.tensor(expected))
    assert prior_weights(torch.tensor(counts), 0.0).eq(1).all()


def test_cooccurrence_and_attention_match_a_loop() -> None:
    y = _labels().numpy()
    t = np.zeros((C, C))
    for row in y:
        for i in range(C):
            for j in range(C):
                if i != j and row[i] and row[j]:
                    t[i, j] += 1
    colsum = t.sum(0)
    t_norm = np.where(colsum > 0, t / np.where(colsum > 0, colsum, 1), 0.0)
    cooc = cooccurrence(torch.tensor(y))
    assert_close(cooc, torch.tensor(t_norm, dtype=torch.float32))
    batch = y[:6]
    attn = attention_scores(torch.tensor(batch), cooc).numpy()
    for k, row in enumerate(batch):
        a = t_norm[row == 1].mean(0)
        a = a / a.sum() if a.sum() > 0 else a
        np.testing.assert_allclose(attn[k], a, rtol=1e-5, atol=1e-6)
    empty = attention_scores(torch.zeros(1, C), cooc)
    assert empty.eq(0).all()


# ------------------------------------------------------------------------------ PFM
def _pfm_reference(z, y, a, w, gp, gn, clip, gng) -> float:
    p = _sigmoid(z)
    pos = p * (1 - a)
    neg = np.minimum(1 - p + clip, 1.0)
    neg = np.where(a > 0, np.minimum(neg * gng, 1.0), neg)
    total = 0.0
    for i in range(z.shape[0]):
        for c in range(z.shape[1]):
            if y[i, c]:
                total += -w[c] * np.log(max(pos[i, c], 1e-8)) * (1 - pos[i, c]) ** gp
            else:
                total += -w[c] * np.log(max(neg[i, c], 1e-8)) * (1 - neg[i, c]) ** (gn + w[c])
    return total / z.shape[0]


@pytest.mark.parametrize("gp,gn,clip,gng", [(0.0, 3.0, 0.05, 1.2), (0.5, 5.0, 0.1, 1.7)])
def test_pfm_matches_its_formula_with_the_configured_gammas(gp, gn, clip, gng) -> None:
    logits, target = _data(0)
    cooc = cooccurrence(_labels()).double()
    attn = attention_scores(target, cooc)
    w = prior_weights(torch.tensor(TASK.class_counts, dtype=torch.float64), 1 / 3)
    value = pfm_loss(logits, target, attn, w, gamma_pos=gp, gamma_neg=gn, clip=clip,
                     gamma_class_ng=gng)
    ref = _pfm_reference(logits.numpy(), target.numpy(), attn.numpy(), w.numpy(), gp, gn, clip, gng)
    assert_close(value, torch.tensor(ref, dtype=torch.float64))


def test_pfm_reduces_to_bce_without_modifiers() -> None:
    # the class weight (1 here) also enters the negatives' exponent: gamma_neg = -1 cancels it
    logits, target = _data(1)
    value = pfm_loss(logits, target, torch.zeros_like(target), torch.ones(C, dtype=torch.float64),
                     gamma_pos=0.0, gamma_neg=-1.0, clip=0.0, gamma_class_ng=1.0)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1).mean()
    assert_close(value, bce)


def test_pfm_config_values_change_the_loss() -> None:
    """The release's create_loss ignores its arguments; here every knob is used."""
    logits, target = _data(2)
    attn = attention_scores(target, cooccurrence(_labels()).double())
    w = torch.ones(C, dtype=torch.float64)
    base = dict(gamma_pos=0.0, gamma_neg=3.0, clip=0.05, gamma_class_ng=1.2)
    ref = pfm_loss(logits, target, attn, w, **base)
    for key, value in (("gamma_pos", 1.0), ("gamma_neg", 4.0), ("clip", 0.1),
                       ("gamma_class_ng", 1.5)):
        assert not torch.isclose(pfm_loss(logits, target, attn, w, **{**base, key: value}), ref)


# ------------------------------------------------------------------------------ RLC
def test_recall_needs_both_the_global_and_the_class_aware_threshold() -> None:
    # class 0: probabilities 0.9, 0.8, 0.75, mean 0.817 -> only 0.9 recalled (0.8 < mean)
    # class 1: 0.6 everywhere -> below tau, nothing recalled; observed positive kept
    probs = torch.tensor([[0.9, 0.6], [0.8, 0.6], [0.75, 0.6]], dtype=torch.float64)
    logits = torch.log(probs / (1 - probs))
    target = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    out = recall_targets(logits, target, tau=0.7, margin=0.0)
    assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    # the margin lowers observed positives' p' (and so the class mean): 0.8 > new mean
    target2 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out2 = recall_targets(logits, target2, tau=0.7, margin=3.0)
    assert out2[1, 0] == 1 and out2[2, 0] == 1


def _rlc_reference(z, y, yhat, w, m, gp, gn, clip) -> float:
    p = _sigmoid(z - m * y)
    neg = np.minimum(1 - p + clip, 1.0)
    total = 0.0
    for i in range(z.shape[0]):
        for c in range(z.shape[1]):
            if yhat[i, c]:
                total += -w[c] * np.log(p[i, c]) * (1 - p[i, c]) ** gp
            else:
                total += -w[c] * np.log(neg[i, c]) * (1 - neg[i, c]) ** (gn + w[c])
    return total / yhat.sum()


def test_rlc_matches_its_formula() -> None:
    logits, target = _data(4)
    corrected = recall_targets(logits, target, tau=0.7, margin=1.0)
    assert (corrected >= target).all() and corrected.sum() > target.sum()
    counts = torch.tensor(TASK.class_counts, dtype=torch.float64) + (corrected - target).sum(0)
    w = prior_weights(counts, 1 / 6)
    value = rlc_loss(logits, target, corrected, w, margin=1.0, gamma_pos=0.0, gamma_neg=3.0,
                     clip=0.05)
    ref = _rlc_reference(logits.numpy(), target.numpy(), corrected.numpy(), w.numpy(), 1.0, 0.0,
                         3.0, 0.05)
    assert_close(value, torch.tensor(ref, dtype=torch.float64))


def test_recalled_counts_reweight_within_the_epoch_and_reset() -> None:
    m = methods.create_method("comic", {"tau": 0.55, "feature_act": "relu"}, TASK)
    m.set_train_targets(_labels())
    model = m.configure_model(build_model("small_cnn", C))
    m.on_epoch_start(0)
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(8, 3, 16, 16, generator=gen), "target": _labels()[:8],
             "index": torch.arange(8)}
    with torch.no_grad():
        model.cls["balanced"].weight.fill_(1.0)  # every class confident: recalls happen
    out = m.training_step(model, batch)
    assert out["recalled"][0].sum() > 0
    m.on_batch_end(batch, out)
    assert_close(m.recalled, out["recalled"])
    m.on_epoch_start(1)
    assert m.recalled.eq(0).all()


def test_corrector_is_off_before_compute_epoch() -> None:
    m = methods.create_method("comic", {"compute_epoch": 3, "tau": 0.55, "feature_act": "relu"},
                              TASK)
    m.set_train_targets(_labels())
    model = m.configure_model(build_model("small_cnn", C))
    batch = {"image": torch.randn(8, 3, 16, 16), "target": _labels()[:8], "index": torch.arange(8)}
    with torch.no_grad():
        model.cls["balanced"].weight.fill_(1.0)
    m.on_epoch_start(1)  # COMIC epoch 2 < 3
    assert m.training_step(model, batch)["recalled"].eq(0).all()
    m.on_epoch_start(2)  # COMIC epoch 3
    assert m.training_step(model, batch)["recalled"].sum() > 0


# ------------------------------------------------------------------------------ HTB
def test_htb_inverse_distill_variant_matches_its_formula() -> None:
    gen = torch.Generator().manual_seed(5)
    zb, zh, zt = (torch.randn(6, C, generator=gen, dtype=torch.float64) for _ in range(3))
    lh, lt = torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)

    def kd(student: np.ndarray, teacher: np.ndarray) -> float:
        p, q = _sigmoid(student), _sigmoid(teacher)
        return float(-(q * np.log(p) + (1 - q) * np.log(1 - p)).sum(1).mean())

    w_h = 3.0**2 / (1.0**2 + 3.0**2)  # inverse: the head branch has the lower loss, weighs more
    ref = w_h * kd(zb.numpy(), zh.numpy()) + (1 - w_h) * kd(zb.numpy(), zt.numpy())
    got = htb_loss(zb, zh, zt, lh, lt, gamma=2.0, weighting="inverse", term="distill")
    assert_close(got, torch.tensor(ref, dtype=torch.float64))
    zb.requires_grad_()
    zh.requires_grad_()
    htb_loss(zb, zh, zt, lh, lt, gamma=2.0, weighting="inverse", term="distill").backward()
    assert zb.grad is not None and zh.grad is None  # teachers get no gradient


def test_htb_release_direction_and_term_by_hand() -> None:
    """The released HeadTailBalancerLoss: w_h = L_h^2 / (L_h^2 + L_t^2) (the branch with the
    HIGHER loss weighs more) and terms PFM(softmax(z_h) * softmax(z_b)); by hand, 1 image."""
    zb = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # softmax = (1/2, 1/2)
    zh = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)  # softmax = (3/4, 1/4)
    zt = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # softmax = (1/2, 1/2)
    lh, lt = torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)
    seen = []

    def fake_pfm(x: torch.Tensor) -> torch.Tensor:  # identity "loss": the sum of its input
        seen.append(x.detach().clone())
        return x.sum()

    got = htb_loss(zb, zh, zt, lh, lt, gamma=2.0, pfm=fake_pfm)
    assert_close(seen[0], torch.tensor([[3 / 8, 1 / 8]], dtype=torch.float64))
    assert_close(seen[1], torch.tensor([[1 / 4, 1 / 4]], dtype=torch.float64))
    w_h = 1.0 / (1.0 + 9.0)  # the tail branch has the higher loss (3): it gets 9/10
    assert_close(got, torch.tensor(w_h * 0.5 + (1 - w_h) * 0.5, dtype=torch.float64))
    zh2 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    zt2 = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    got = htb_loss(zb, zh2, zt2, lh, lt, gamma=2.0, pfm=lambda x: x[0, 0])
    assert_close(got, torch.tensor(0.1 * 0.25 + 0.9 * 0.375, dtype=torch.float64))
    inv = htb_loss(zb, zh2, zt2, lh, lt, gamma=2.0, weighting="inverse", pfm=lambda x: x[0, 0])
    assert_close(inv, torch.tensor(0.9 * 0.25 + 0.1 * 0.375, dtype=torch.float64))
    with pytest.raises(ValueError):
        htb_loss(zb, zh, zt, lh, lt, gamma=2.0)  # the release term needs the PFM


def test_htb_is_off_by_default_and_balanced_scores_are_evaluated() -> None:
    prm = COMICParams()
    assert prm.htb is False and prm.eval_logits == "balanced"
    assert prm.htb_weighting == "release" and prm.htb_term == "release"


# ------------------------------------------------------------------------------ sampler views
def test_reversed_view_draws_classes_in_inverse_frequency() -> None:
    counts = torch.tensor(TASK.class_counts, dtype=torch.float32)
    target = torch.zeros(10, C)
    target[torch.arange(10), torch.arange(10) % C] = 1.0  # every class present, one per row
    target[0, 3] = 1.0  # a multi-label row
    torch.manual_seed(0)
    n = 40000
    rows, classes = view_rows(target, counts.max() / counts, n)
    assert target[rows, classes].eq(1).all()  # each drawn row holds its drawn class
    freq = torch.bincount(classes, minlength=C).float() / n
    expected = (1 / counts) / (1 / counts).sum()
    assert_close(freq, expected, atol=0.01, rtol=0.05)
    assert freq[4] / freq[0] == pytest.approx(16.0, rel=0.15)  # n_head / n_tail = 80 / 5
    per_class_rows = target[rows].sum(0)
    assert per_class_rows[4] > 4 * per_class_rows[0]  # tail images far more often than head


def test_balanced_view_draws_present_classes_uniformly() -> None:
    target = torch.zeros(8, C)
    target[:, 0] = 1.0  # class 0 in every row
    target[0, 2] = 1.0  # class 2 once; classes 1, 3, 4 absent from the batch
    torch.manual_seed(1)
    rows, classes = view_rows(target, torch.ones(C), 20000)
    freq = torch.bincount(classes, minlength=C).float() / 20000
    assert_close(freq, torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0]), atol=0.015, rtol=0)
    assert (rows[classes == 2] == 0).all()
    rows, classes = view_rows(torch.zeros(4, C), torch.ones(C), 10)  # no positives: uniform
    assert (classes == -1).all() and rows.max() < 4


# ------------------------------------------------------------------------------ classifier, TDE
def test_cosine_classifier_and_tde_logits() -> None:
    torch.manual_seed(0)
    prm = COMICParams(tde_alpha=2.0, scale=16.0, norm_offset=1 / 32)
    net = COMICNet(build_model("small_cnn", C), C, prm)
    feats = torch.randn(4, net.proj["head"].out_features)
    mean = torch.randn(feats.shape[1])
    x = feats / feats.norm(dim=1, keepdim=True)
    c = mean / mean.norm()
    for branch in ("head", "tail"):
        w = net.cls[branch].weight
        w_n = w / (w.norm(dim=1, keepdim=True) + 1 / 32)
        cos = x @ c
        v = x - cos[:, None] * c if branch == "head" else x + 2.0 * cos[:, None] * c
        assert_close(net.logits(branch, feats, mean), 16.0 * v @ w_n.t())
        assert_close(net.logits(branch, feats), 16.0 * x @ w_n.t())
    head_v = x - (x @ c)[:, None] * c
    assert_close(head_v @ c, torch.zeros(4), atol=1e-6, rtol=0)  # mean direction removed
    zero = torch.zeros(feats.shape[1])
    assert_close(net.logits("tail", feats, zero), net.logits("tail", feats))
    clf = CosineClassifier(3, 2, scale=2.0, offset=0.0)
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, -2.0]]))
    assert_close(clf(torch.tensor([[1.0, 0.0, 0.0]])), torch.tensor([[2.0, 0.0]]))


# ------------------------------------------------------------------------------ method
def _method(**params) -> tuple[COMIC, COMICNet]:
    torch.manual_seed(0)
    m = methods.create_method("comic", params, TASK)
    m.set_train_targets(_labels())
    net = m.configure_model(build_model("small_cnn", C))
    m.on_epoch_start(0)
    return m, net  # type: ignore[return-value]


def test_moving_means_follow_the_momentum_update() -> None:
    m, _ = _method()
    d = m.means.shape[1]
    first, second = torch.randn(3, d), torch.randn(3, d)
    m.on_batch_end({}, {"view_means": first, "recalled": torch.zeros(3, C)})
    m.on_batch_end({}, {"view_means": second, "recalled": torch.zeros(3, C)})
    assert_close(m.means, 0.9 * first + second)


def test_each_branch_is_scored_on_its_own_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a view that reverses the batch, the head/tail PFM use the reversed labels."""
    import methods.comic as mc

    m, net = _method(htb=False, rlc_weight=0.0, attention=False)
    monkeypatch.setattr(mc, "view_rows", lambda t, w, n: (torch.arange(n).flip(0), None))
    batch = {"image": torch.randn(6, 3, 16, 16), "target": _labels()[:6], "index": torch.arange(6)}
    net.eval()  # BatchNorm in eval: features do not depend on the batch
    loss = m.training_step(net, batch)["loss"]
    feats = net.branch_features(batch["image"])
    attn_of = lambda y: attention_scores(y, m.cooc)  # noqa: E731
    kw = dict(gamma_pos=0.0, gamma_neg=3.0, clip=0.05, gamma_class_ng=1.2)
    w = m.pfm_weights
    rev = torch.arange(6).flip(0)
    y, y_rev = batch["target"], batch["target"][rev]
    parts = {"balanced": pfm_loss(net.logits("balanced", feats["balanced"]), y, attn_of(y), w, **kw)}
    for b in ("head", "tail"):
        parts[b] = pfm_loss(net.logits(b, feats[b][rev]), y_rev, attn_of(y_rev), w, **kw)
    expected = sum(parts.values()) + sum(parts.values()) / 3  # h + t + b + mean(h, t, b)
    assert_close(loss, expected)


def test_attention_is_trained_or_absent() -> None:
    m, net = _method()
    batch = {"image": torch.randn(6, 3, 16, 16), "target": _labels()[:6], "index": torch.arange(6)}
    m.training_step(net, batch)["loss"].backward()
    assert net.attention is not None and net.attention.w_q.weight.grad.abs().sum() > 0
    m2, net2 = _method(attention=False)
    assert net2.attention is None
    assert not any("attention" in name for name, _ in net2.named_parameters())


def test_frozen_trunk_and_classifier_lr_scale() -> None:
    m, net = _method(freeze_trunk=True, cls_lr_scale=0.5)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("backbone.") for n in trainable)
    net.train()
    assert not net.backbone.training
    assert m.lr_scale("cls.head.weight") == 0.5 and m.lr_scale("proj.head.weight") == 1.0


def test_state_round_trips_with_means_and_recalled_counts() -> None:
    m, net = _method()
    batch = {"image": torch.randn(6, 3, 16, 16), "target": _labels()[:6], "index": torch.arange(6)}
    out = m.training_step(net, batch)
    m.on_batch_end(batch, {k: v.detach() for k, v in out.items()})
    state = json.loads(json.dumps({k: v.tolist() if isinstance(v, torch.Tensor) else v
                                   for k, v in m.state_dict().items()}))
    fresh, _ = _method()
    fresh.load_state_dict(state)
    assert_close(fresh.means, m.means)
    assert_close(fresh.recalled, m.recalled)


def _dist_worker(rank: int, world: int) -> dict:
    from tuner.distributed import TorchDist

    m = methods.create_method("comic", {}, TASK)
    m.dist = TorchDist()
    m.configure_model(build_model("small_cnn", C))
    d = m.means.shape[1]
    means = torch.full((3, d), float(rank + 1))
    recalled = torch.full((3, C), float(rank + 1))
    m.on_batch_end({}, {"view_means": means, "recalled": recalled})
    return {"means": m.means, "recalled": m.recalled}


def test_two_workers_share_means_and_recalled_counts() -> None:
    from tuner.distributed import run_workers

    out = run_workers(_dist_worker, 2)
    for rank in range(2):
        assert_close(out[rank]["means"], torch.full_like(out[rank]["means"], 1.5))
        assert_close(out[rank]["recalled"], torch.full((3, C), 3.0))


def test_shipped_space_tunes_the_issue_knobs() -> None:
    raw = yaml.safe_load((ROOT / "search_spaces/comic.yaml").read_text())
    tuned = {k for k, v in raw["params"].items() if isinstance(v, dict)}
    assert {"tau", "margin", "compute_epoch", "gamma_neg", "gamma_pos", "gamma_class_ng",
            "prior_exponent", "rlc_weight", "scale", "tde_alpha", "cls_lr_scale"} <= tuned
    assert isinstance(raw["train"]["lr"], dict)
    assert raw["data"] == {**raw["data"], "label_regime": "missing", "rate": 0.6}


# ------------------------------------------------------------------------------ dataset-level views
def test_dataset_level_sampler_weights_by_hand() -> None:
    """Counts n = (3, 2). Reversed: class 0 w.p. (1/3)/(1/3 + 1/2) = 0.4, class 1 0.6, then a
    uniform image of it: P = (0.4/3, 0.4/3 + 0.6/2, 0.6/2, 0.4/3). Balanced: 1/2 each."""
    y = torch.tensor([[1.0, 0], [1, 1], [0, 1], [1, 0]])
    w = view_sample_weights(y)
    head = w["head"] / w["head"].sum()
    tail = w["tail"] / w["tail"].sum()
    assert_close(head, torch.tensor([0.4 / 3, 0.4 / 3 + 0.3, 0.3, 0.4 / 3], dtype=torch.float64))
    assert_close(tail, torch.tensor([0.5 / 3, 0.5 / 3 + 0.25, 0.25, 0.5 / 3], dtype=torch.float64))
    m, _ = _method()
    assert set(m.view_weights(0)) == {"head", "tail"}
    m2, _ = _method(views="batch")
    assert m2.view_weights(0) is None


def test_head_and_tail_branches_train_on_the_dataset_views() -> None:
    """With the data layer's view rows in the batch, each branch's PFM uses its own view's
    images and labels (not a resample of the batch)."""
    m, net = _method(rlc_weight=0.0, attention=False, freeze_trunk=False)
    y = _labels()
    gen = torch.Generator().manual_seed(9)
    imgs = torch.randn(12, 3, 16, 16, generator=gen)
    batch = {"image": imgs[:4], "target": y[:4], "index": torch.arange(4),
             "head_image": imgs[4:9], "head_target": y[4:9], "head_index": torch.arange(4, 9),
             "tail_image": imgs[9:], "tail_target": y[9:12], "tail_index": torch.arange(9, 12)}
    net.eval()  # BatchNorm in eval: features do not depend on the batch
    loss = m.training_step(net, batch)["loss"]
    kw = dict(gamma_pos=0.0, gamma_neg=3.0, clip=0.05, gamma_class_ng=1.2)
    parts = {}
    for b, sl in (("balanced", slice(0, 4)), ("head", slice(4, 9)), ("tail", slice(9, 12))):
        feats = net.branch_features(imgs[sl])[b]
        parts[b] = pfm_loss(net.logits(b, feats), y[sl], attention_scores(y[sl], m.cooc),
                            m.pfm_weights, **kw)
    assert_close(loss, sum(parts.values()) + sum(parts.values()) / 3)
