"""CoNeS: closed-form negative weights against a numerical optimiser, CAM prototypes of planted
patterns, confidence / correlation updates against hand-computed formulas, several workers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.optimize import minimize
from sklearn.cluster import KMeans
from torch import nn
from torch.testing import assert_close

import methods
from methods import cones as cones_mod
from methods.base import TaskInfo
from methods.cones import (
    CoNeS,
    CoNeSParams,
    cam_prototypes,
    centroid_similarity,
    cooccurrence_correlation,
    negative_weights,
    normalise_correlation,
)
from tuner.backbones import Classifier, build_model
from tuner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _task(c: int = 4, n: int = 12) -> TaskInfo:
    return TaskInfo(num_classes=c, num_train=n, class_counts=(1,) * c, max_epochs=3,
                    label_regime="candidate")


def _candidates(n: int, c: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, c, generator=gen) < 0.4).float()
    s[s.sum(1) == 0, 0] = 1.0
    return s


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("r", [2.0, 3.0])
def test_simplex_weights_solve_their_optimisation_problem(r: float) -> None:
    """min sum_c phi_c^r l_c  s.t. phi >= 0, sum_c phi_c = xi, over the non-candidates."""
    gen = torch.Generator().manual_seed(int(r))
    logits = 2.0 * torch.randn(5, 6, generator=gen, dtype=torch.float64)
    s = _candidates(5, 6, seed=3).double()
    phi = negative_weights(logits, s, r, "simplex")
    for i in range(len(s)):
        neg = (s[i] == 0).numpy()
        loss = np.log1p(np.exp(logits[i].numpy()))[neg]  # -log(1 - sigmoid(z))
        xi = 1.0 / neg.sum()
        res = minimize(
            lambda x, loss=loss: float(np.sum(x**r * loss)), np.full(neg.sum(), xi / neg.sum()),
            method="SLSQP", bounds=[(0.0, xi)] * int(neg.sum()),
            constraints=[{"type": "eq", "fun": lambda x, xi=xi: np.sum(x) - xi}],
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        assert res.success, res.message
        assert_close(phi[i][s[i] == 0], torch.from_numpy(res.x), rtol=1e-4, atol=1e-7)
        closed = float(np.sum(phi[i][s[i] == 0].numpy() ** r * loss))
        assert closed <= res.fun * (1 + 1e-9)


@pytest.mark.parametrize("r", [1.5, 2.0, 3.0, 5.0])
def test_weights_are_nonnegative_and_sum_as_the_formula_says(r: float) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = 3.0 * torch.randn(8, 7, generator=gen, dtype=torch.float64)
    s = _candidates(8, 7, seed=4).double()
    s[0] = 1.0  # a row without non-candidates: all weights 0
    xi = 1.0 / (s == 0).sum(1).clamp(min=1).double()
    simplex = negative_weights(logits, s, r, "simplex")
    power = negative_weights(logits, s, r, "sum_power")
    for phi in (simplex, power):
        assert (phi >= 0).all()
        assert (phi[s > 0] == 0).all()
    has = (s == 0).any(1)
    assert_close(simplex.sum(1)[has], xi[has])
    assert_close(power.pow(r - 1).sum(1)[has], xi[has].pow(r - 1))
    assert (simplex[0] == 0).all() and (power[0] == 0).all()
    if r == 2.0:
        assert_close(simplex, power)


def test_sum_power_is_the_released_formula() -> None:
    """phi = xi (r l)^(-1/(r-1)) / (sum (r l)^-1)^(1/(r-1)) written out directly (no eps)."""
    r = 3.0
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    s = _candidates(4, 5, seed=2).double()
    p = torch.sigmoid(logits)
    inv = (1.0 / (r * -torch.log(1 - p))) * (1 - s)
    xi = 1.0 / (5 - s.sum(1, keepdim=True))
    expected = inv ** (1 / (r - 1)) * xi / inv.sum(1, keepdim=True) ** (1 / (r - 1))
    assert_close(negative_weights(logits, s, r, "sum_power"), expected)


def test_release_normaliser_is_the_default_by_hand() -> None:
    """r = 3, one candidate and two non-candidates with r l = 1 and 4 (l = softplus(z)):
    a = 1/(r l) = (1, 1/4), xi = 1/2. Release: xi sqrt(a) / sqrt(sum a) = (0.4472, 0.2236);
    textbook: xi sqrt(a) / sum sqrt(a) = (1/3, 1/6)."""
    assert CoNeSParams().neg_weight_norm == "sum_power"
    losses = torch.tensor([1 / 3, 4 / 3], dtype=torch.float64)
    z = torch.log(torch.expm1(losses))  # softplus(z) = l
    logits = torch.cat([torch.tensor([0.7], dtype=torch.float64), z]).unsqueeze(0)
    s = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    root = math.sqrt(1.25)
    release = torch.tensor([[0.0, 0.5 / root, 0.25 / root]], dtype=torch.float64)
    assert_close(negative_weights(logits, s, 3.0), release)  # the default norm
    assert_close(negative_weights(logits, s, 3.0, "simplex"),
                 torch.tensor([[0.0, 1 / 3, 1 / 6]], dtype=torch.float64))
    method = CoNeS(CoNeSParams(), _task(3, 1))
    assert method.params.neg_weight_norm == "sum_power"


def test_weights_stay_finite_for_extreme_logits() -> None:
    logits = torch.tensor([[-200.0, -50.0, 0.0, 40.0, 120.0]])
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    for norm in ("simplex", "sum_power"):
        phi = negative_weights(logits, s, 3.0, norm)
        assert torch.isfinite(phi).all() and (phi >= 0).all()


def test_r_ws_must_exceed_one() -> None:
    with pytest.raises(ConfigError, match="r_ws"):
        CoNeSParams(r_ws=1.0)
    with pytest.raises(ConfigError, match="r_ws"):
        negative_weights(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1.0)
    with pytest.raises(ConfigError, match="memory_size"):
        CoNeSParams(n_clusters=8, memory_size=4)


# ----------------------------------------------------------------------------- CAMs
def _planted(d: int = 6, c: int = 3) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Feature maps where class k's CAM fires only on a planted patch; class 2 never fires.

    Channel k (< c) carries class k's evidence (W = [I | 0]); channels >= c are context.
    """
    torch.manual_seed(0)
    fmap = torch.zeros(2, d, 6, 6)
    fmap[:, c:] = torch.rand(2, d - c, 6, 6)  # context everywhere, no class evidence
    v0 = torch.tensor([1.0, 0, 0, 2.0, 0, 0])
    v1 = torch.tensor([0, 1.0, 0, 0, 3.0, 0])
    fmap[0, :, 1:3, 1:3] = v0.view(-1, 1, 1)
    fmap[1, :, 3:5, 2:4] = v1.view(-1, 1, 1)
    fmap[1, 0, 0, 5] = 0.05  # weak class-0 evidence: under tau = 0.1 of the peak
    weight = torch.cat([torch.eye(c), torch.zeros(c, d - c)], dim=1)
    return fmap, weight, [v0, v1]


def test_cam_prototypes_land_on_the_planted_class() -> None:
    fmap, weight, (v0, v1) = _planted()
    sums, valid, pixels = cam_prototypes(fmap, weight, tau=0.1)
    assert valid.tolist() == [True, True, False]
    assert pixels == 2 * 6 * 6
    assert_close(sums[0], 4 * v0)  # the 2x2 patch only; the weak pixel is screened out
    assert_close(sums[1], 4 * v1)
    assert (sums[2] == 0).all()
    low, _, _ = cam_prototypes(fmap, weight, tau=0.01)  # now the weak pixel passes
    assert_close(low[0], 4 * v0 + fmap[1, :, 0, 5])


def test_training_step_pushes_planted_prototypes_into_memory() -> None:
    fmap, weight, (v0, v1) = _planted()
    model = Classifier(nn.Identity(), feature_dim=6, num_classes=3)
    with torch.no_grad():
        model.classifier.weight.copy_(weight)
    method = CoNeS(CoNeSParams(), _task(c=3, n=4))
    method.set_train_targets(torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]]))
    method.on_epoch_start(0)
    batch = {"image": fmap, "target": method.candidates[:2], "index": torch.tensor([0, 1])}
    out = method.training_step(model, batch)
    method.on_batch_end(batch, {k: v.detach() for k, v in out.items()})
    assert method.memory_count.tolist() == [1, 1, 0]
    for k, v in enumerate((v0, v1)):
        cos = torch.nn.functional.cosine_similarity(method.memory[k, 0], v, dim=0)
        assert_close(cos, torch.tensor(1.0))
        assert_close(method.memory[k, 0], 4 * v / 72)


# ----------------------------------------------------------------------------- confidence, loss
def test_confidence_targets_and_loss_follow_the_formulas() -> None:
    c, n = 4, 6
    s = _candidates(n, c, seed=5)
    prm = CoNeSParams(beta=0.3, r_ws=2.5, conf_momentum=0.9, neg_weight_norm="simplex")
    method = CoNeS(prm, _task(c, n))
    method.set_train_targets(s)
    gen = torch.Generator().manual_seed(3)
    method.correlation = normalise_correlation(torch.rand(c, c, generator=gen))
    index = torch.tensor([4, 1, 2])
    logits = torch.randn(3, c, generator=gen, dtype=torch.float64)
    # reference in numpy, straight from the spec
    p = 1 / (1 + np.exp(-logits.numpy()))
    sb = s[index].double().numpy()
    lmat = method.correlation.double().numpy()
    q = (p @ lmat) * sb
    q /= q.sum(1, keepdims=True)
    old = method.confidence[index].double().numpy()
    new = 0.9 * old + 0.1 * q
    got = method.updated_confidence(logits, index, s[index].double())
    assert_close(got.double(), torch.from_numpy(new), rtol=1e-6, atol=1e-7)
    t = (new > 1 / sb.sum(1, keepdims=True)).astype(float)
    neg_loss = np.log1p(np.exp(logits.numpy()))
    phi = np.where(sb == 0, (2.5 * neg_loss) ** (-1 / 1.5), 0.0)
    phi = phi / phi.sum(1, keepdims=True) / (sb == 0).sum(1, keepdims=True)
    omega = sb + phi

    def bce(z: np.ndarray, y: np.ndarray) -> np.ndarray:
        return -(y * np.log(1 / (1 + np.exp(-z))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-z))))

    z = logits.numpy()
    expected = bce(z, sb).sum(1).mean() + 0.3 * (omega * bce(z, t)).sum(1).mean()

    class Fixed(nn.Module):  # feature maps whose pooled features are the logits, W = I
        def __init__(self) -> None:
            super().__init__()
            self.classifier = nn.Linear(c, c, bias=False).double()
            with torch.no_grad():
                self.classifier.weight.copy_(torch.eye(c))

        def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def pool_maps(self, maps: torch.Tensor) -> torch.Tensor:
            return maps.mean(dim=(2, 3))

    batch = {"image": logits.view(3, c, 1, 1), "target": s[index].double(), "index": index}
    out = method.training_step(Fixed(), batch)
    assert_close(out["loss"].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                 atol=1e-6)


# ----------------------------------------------------------------------------- correlation
def test_initial_correlation_is_the_conditional_cooccurrence() -> None:
    s = _candidates(30, 5, seed=8)
    arr = s.numpy()
    cond = np.zeros((5, 5))
    for i in range(5):
        rows = arr[:, i] == 1
        for j in range(5):
            if j != i:
                cond[i, j] = arr[rows, j].sum() / rows.sum()
    row = cond / cond.sum(1, keepdims=True)
    np.fill_diagonal(row, 1.0)
    released = cond / cond.sum(1)  # the release's broadcast: (i, j) / row-sum of j
    np.fill_diagonal(released, 1.0)
    assert_close(cooccurrence_correlation(s, "row"), torch.from_numpy(row).float())
    assert_close(cooccurrence_correlation(s, "transposed"), torch.from_numpy(released).float())


def _clustered_memory(method: CoNeS, counts: list[int], dirs: list[int], d: int = 8) -> None:
    gen = torch.Generator().manual_seed(0)
    for k, (n, axis) in enumerate(zip(counts, dirs)):
        for _ in range(n):
            proto = torch.zeros(len(counts), d)
            proto[k] = 0.05 * torch.rand(d, generator=gen)
            proto[k, axis] += 1.0
            proto[k, (axis + 1) % d] += torch.rand(1, generator=gen).item()
            method.push_prototypes(proto, torch.arange(len(counts)) == k)


def test_correlation_update_fits_each_class_once_and_matches_sklearn(monkeypatch) -> None:
    c = 4
    prm = CoNeSParams(n_clusters=3, memory_size=10, corr_momentum=0.5)
    method = CoNeS(prm, _task(c, 6))
    method.set_train_targets(_candidates(6, c, seed=1))
    # classes 0 and 1 live along axis 0, class 2 along axis 4; class 3 has too few entries
    _clustered_memory(method, counts=[14, 12, 10, 2], dirs=[0, 0, 4, 0])
    assert method.memory_count.tolist() == [14, 12, 10, 2]
    before = method.correlation.clone()
    fits = []
    real = cones_mod.kmeans_centroids
    monkeypatch.setattr(cones_mod, "kmeans_centroids", lambda x, k: fits.append(len(x)) or real(x, k))
    method.on_epoch_end(0)
    assert fits == [10, 10, 10]  # once per class with >= k prototypes, ring buffer of 10
    # reference: sklearn centroids of the most recent 10 entries, mean pairwise cosine
    cents = []
    for k in range(3):
        pts = method.memory[k].double().numpy()
        km = KMeans(n_clusters=3, random_state=42, n_init="auto").fit(pts).cluster_centers_
        cents.append(km / np.linalg.norm(km, axis=1, keepdims=True))
    sim = np.zeros((c, c))
    for a in range(3):
        for b in range(3):
            sim[a, b] = (cents[a] @ cents[b].T).mean()
    mixed = before.double().numpy().copy()
    for a in range(3):
        for b in range(3):
            if a != b:
                mixed[a, b] = 0.5 * mixed[a, b] + 0.5 * sim[a, b]
    np.fill_diagonal(mixed, 0.0)
    expected = mixed / mixed.sum(1, keepdims=True)
    np.fill_diagonal(expected, 1.0)
    assert_close(method.correlation, torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)
    assert sim[0, 1] > 0.9 > 0.5 > sim[0, 2]


def test_centroid_similarity_skips_missing_classes() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim, valid = centroid_similarity([a, None, a])
    assert valid.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    assert_close(sim[0, 2], torch.tensor(0.5))  # cosines 1, 0, 0, 1 -> mean 0.5


# ----------------------------------------------------------------------------- model, optimizer
def test_classifier_gets_its_lr_multiplier_and_models_are_checked() -> None:
    method = CoNeS(CoNeSParams(classifier_lr_mult=10.0), _task())
    model = method.configure_model(build_model("small_cnn", 4))
    scales = {name: method.lr_scale(name) for name, _ in model.named_parameters()}
    assert scales["classifier.weight"] == scales["classifier.bias"] == 10.0
    assert {v for k, v in scales.items() if not k.startswith("classifier.")} == {1.0}
    with pytest.raises(ConfigError, match="Classifier"):
        method.configure_model(nn.Linear(3, 4))


@pytest.mark.parametrize("backbone", ["small_cnn", "resnet18"])  # max- and average-pooled
def test_training_logits_are_the_logits_evaluation_scores(backbone: str) -> None:
    """The loss must be taken on the logits that ``predict`` (the model's forward) scores:
    small_cnn pools by max, so CAM logits averaged over the maps would train another model."""
    torch.manual_seed(0)
    model = build_model(backbone, 3).eval()  # BatchNorm in eval mode: both passes agree
    method = CoNeS(CoNeSParams(), _task(c=3, n=4))
    method.configure_model(model)
    method.set_train_targets(torch.tensor([[1.0, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1]]))
    images = torch.randn(4, 3, 24, 24)
    batch = {"image": images, "target": method.candidates, "index": torch.arange(4)}
    with torch.no_grad():
        out = method.training_step(model, batch)
        assert_close(out["logits"], method.predict(model, images))


def test_state_restores_without_the_label_table() -> None:
    method = CoNeS(CoNeSParams(n_clusters=2), _task(4, 6))
    method.set_train_targets(_candidates(6, 4, seed=2))
    _clustered_memory(method, counts=[3, 3, 3, 3], dirs=[0, 1, 2, 3])
    method.on_epoch_end(0)
    fresh = CoNeS(CoNeSParams(n_clusters=2), _task(4, 6))
    fresh.load_state_dict(method.state_dict())
    assert_close(fresh.candidates, method.candidates)
    for key in ("confidence", "correlation", "memory", "memory_count"):
        assert_close(getattr(fresh, key), getattr(method, key), rtol=0, atol=0)


# ----------------------------------------------------------------------------- several workers
def _worker_model(c: int) -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()), 8, c)


def _worker_images(seed: int) -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))


def _two_workers(rank: int, world: int) -> dict:
    from tuner.distributed import TorchDist

    c, s = 3, _candidates(8, 3, seed=6)
    method = methods.create_method("cones", {"n_clusters": 1}, _task(c, 8))
    method.dist = TorchDist()
    method.set_train_targets(s)
    model = _worker_model(c)
    method.on_epoch_start(0)
    for step in range(2):
        index = torch.arange(8)[rank * 4 + 2 * step : rank * 4 + 2 * step + 2]
        batch = {"image": _worker_images(10 * step + rank)[:2], "target": s[index],
                 "index": index}
        out = method.training_step(model, batch)
        method.on_batch_end(batch, {k: v.detach() for k, v in out.items()})
    method.on_epoch_end(0)
    return {k: v for k, v in method.state_dict().items() if k != "current_epoch"}


def test_two_workers_share_memories_correlation_and_merged_confidence() -> None:
    from tuner.distributed import run_workers

    out = run_workers(_two_workers, 2)
    for key in ("confidence", "correlation", "memory", "memory_count"):
        assert_close(out[0][key], out[1][key], rtol=0, atol=0, msg=key)
    # reference, one process: prototype sums of both shards added, confidence rows per shard
    c, s = 3, _candidates(8, 3, seed=6)
    model = _worker_model(c)
    ref = methods.create_method("cones", {"n_clusters": 1}, _task(c, 8))
    ref.set_train_targets(s)
    for step in range(2):
        parts = []
        for rank in range(2):
            index = torch.arange(8)[rank * 4 + 2 * step : rank * 4 + 2 * step + 2]
            images = _worker_images(10 * step + rank)[:2]
            with torch.no_grad():
                fmap = model.feature_maps(images)
                logits = model.classifier(fmap.mean(dim=(2, 3)))
            parts.append(cam_prototypes(fmap, model.classifier.weight, 0.1))
            ref.confidence[index] = ref.updated_confidence(logits, index, s[index])
        sums = parts[0][0] + parts[1][0]
        valid = parts[0][1] | parts[1][1]
        ref.push_prototypes(sums / (parts[0][2] + parts[1][2]), valid)
    assert_close(out[0]["memory"], ref.memory, rtol=1e-5, atol=1e-7)
    assert_close(out[0]["memory_count"], ref.memory_count)
    assert_close(out[0]["confidence"], ref.confidence, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- search space
def test_space_tunes_the_cones_knobs() -> None:
    from tuner.space import load_space

    space = load_space(ROOT / "search_spaces/cones.yaml")
    tuned = set(space.tunables())
    for key in ("method/r_ws", "method/beta", "method/tau_cam", "method/n_clusters",
                "method/conf_momentum", "method/corr_momentum", "method/classifier_lr_mult",
                "train/lr", "train/warmup_frac"):
        assert key in tuned, key
    raw = yaml.safe_load((ROOT / "search_spaces/cones.yaml").read_text())
    assert raw["data"]["label_regime"] == "candidate" and raw["data"]["rate"] == 0.2
    assert math.isclose(raw["params"]["r_ws"]["uniform"][0], 1.5)
