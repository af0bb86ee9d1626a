"""TailCLIP: its losses against the paper's formulas, the sampler weights, the CLIP weights file
and the method through the real loop (exact resume). The contract suite covers the rest."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch.testing import assert_close

import methods
from methods.base import TaskInfo
from methods.tailclip import (
    TailCLIP,
    balanced_asymmetric_elementwise,
    class_weights,
    contrastive_loss,
    max_normalise,
    occurrence_sample_weights,
    softmax_map,
)
from tuner.clip import build_clip, load_clip_weights, save_clip_weights, tokenize
from tuner.errors import ConfigError, DataError

NAMES = ("zero", "one", "two", "three")
TASK = TaskInfo(num_classes=4, num_train=10, class_counts=(6, 3, 1, 0), max_epochs=3,
                class_names=NAMES)


def tiny(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_clip("tiny", **kw)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def bal_reference(z, y, w, gp, gn, clip, eps) -> np.ndarray:
    """The balanced asymmetric loss of METHODS.md 5(b), element by element in float64.

    Max-normalisation guarded as in METHODS.md 5(f): a maximum below 1e-6 becomes max |z|.
    """
    b, c = z.shape
    x = z / (z.max() if z.max() >= 1e-6 else max(np.abs(z).max(), 1e-6))
    out = np.zeros_like(z)
    for i in range(b):
        for j in range(c):
            p = sigmoid(x[i, j])
            yt = (1 - eps) * y[i, j] + eps / c
            pm = min(1.0, 1 - p + clip)
            term = (1 + w[j]) * yt * math.log(p) + (1 - y[i, j]) * math.log(pm)
            base = 1 - p * yt - pm * (1 - y[i, j])
            out[i, j] = -term * base ** (gp * yt + gn * (1 - y[i, j]))
    return out


# ----------------------------------------------------------------------------- losses
def test_contrastive_loss_matches_symmetric_infonce() -> None:
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    u = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    s = 7.0 * (v @ u.T).numpy()
    img = np.mean([-s[i, i] + math.log(np.exp(s[i]).sum()) for i in range(5)])
    txt = np.mean([-s[i, i] + math.log(np.exp(s[:, i]).sum()) for i in range(5)])
    assert contrastive_loss(v, u, 7.0).item() == pytest.approx((img + txt) / 2, rel=1e-10)


@pytest.mark.parametrize("gp,gn,clip,eps", [(0.0, 4.0, 0.05, 0.1), (0.5, 2.5, 0.0, 0.2),
                                            (1.0, 9.8, 0.1, 0.0)])
def test_balanced_loss_matches_the_formula(gp, gn, clip, eps) -> None:
    g = torch.Generator().manual_seed(1)
    z = 30.0 * torch.rand(6, 4, generator=g, dtype=torch.float64) - 5.0
    y = (torch.rand(6, 4, generator=g) < 0.4).double()
    w = class_weights(TASK.class_counts, TASK.num_train, 1.25).double()
    got = balanced_asymmetric_elementwise(z, y, w, gp, gn, clip, eps)
    want = bal_reference(z.numpy(), y.numpy(), w.numpy(), gp, gn, clip, eps)
    assert_close(got, torch.from_numpy(want), rtol=1e-9, atol=1e-12)


def test_balanced_loss_reduces_to_bce_on_max_normalised_logits() -> None:
    g = torch.Generator().manual_seed(2)
    z = 20.0 * torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(5, 3, generator=g) < 0.5).double()
    x = (z / z.max()).numpy()
    bce = -(y.numpy() * np.log(sigmoid(x)) + (1 - y.numpy()) * np.log(1 - sigmoid(x)))
    got = balanced_asymmetric_elementwise(z, y, None, 0.0, 0.0, 0.0, 0.0)
    assert_close(got, torch.from_numpy(bce), rtol=1e-9, atol=1e-12)


def test_max_normalisation_is_guarded_against_non_positive_maxima() -> None:
    z = torch.tensor([[-2.0, -4.0], [-1.0, -8.0]], requires_grad=True)
    x = max_normalise(z)
    assert_close(x, z.detach() / 8.0)  # signs kept, |x| <= 1 (the release divides by -1)
    assert_close(max_normalise(torch.tensor([[3.0, -6.0]])), torch.tensor([[1.0, -2.0]]))
    zero = torch.zeros(2, 3, requires_grad=True)
    loss = balanced_asymmetric_elementwise(zero, torch.ones(2, 3), None, 0, 4, 0.05, 0.1).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()


def test_fractional_gamma_with_smoothing_stays_finite() -> None:
    # p <= clip makes the release's focal base -p*eps/C < 0: NaN under a fractional exponent
    z = torch.tensor([[10.0, -40.0, -35.0]], requires_grad=True)
    y = torch.tensor([[1.0, 0.0, 0.0]])
    loss = balanced_asymmetric_elementwise(z, y, None, 0.3, 4.5, 0.05, 0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- weights
def test_class_and_sample_weights_match_the_formula() -> None:
    targets = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]).float()
    counts, n, s = (6, 3, 1, 0), 10, 1.6
    inv = [n / max(c, 1) for c in counts]  # a never-observed class is counted once
    wc = [v**s / max(inv) ** s for v in inv]
    assert_close(class_weights(counts, n, s), torch.tensor(wc))
    raw = [sum(inv[c] for c in range(4) if row[c]) ** s for row in targets.tolist()]
    want = torch.tensor(raw, dtype=torch.float64) / max(raw)
    assert_close(occurrence_sample_weights(targets, counts, n, s), want)
    assert occurrence_sample_weights(targets, counts, n, s)[3] == 0  # no label: never drawn


def test_sample_power_is_tied_to_class_power_unless_given() -> None:
    targets = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0]] * 5).float()
    tied = methods.create_method("tailclip", {"class_power": 1.7}, TASK)
    own = methods.create_method("tailclip", {"class_power": 1.7, "sample_power": 1.0}, TASK)
    off = methods.create_method("tailclip", {"weighted_sampling": False}, TASK)
    for m in (tied, own, off):
        m.set_train_targets(targets)
    assert_close(tied.sample_weights(0),
                 occurrence_sample_weights(targets, TASK.class_counts, 10, 1.7))
    assert_close(own.sample_weights(0),
                 occurrence_sample_weights(targets, TASK.class_counts, 10, 1.0))
    assert off.sample_weights(0) is None


def test_bad_string_and_power_fields_are_refused() -> None:
    for values, field in [({"sample_power": -1.0}, "sample_power"), ({"prompt": 3}, "prompt"),
                          ({"captions": "file"}, "caption_file")]:
        with pytest.raises(ConfigError, match=field):
            methods.make_params("tailclip", values)
    with pytest.raises(ConfigError, match="class name"):
        methods.create_method("tailclip", {}, TaskInfo(2, 4, (2, 2), 1))


# ----------------------------------------------------------------------------- CLIP weights
def test_weights_file_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    source = tiny()
    path = tmp_path / "tiny.pt"
    save_clip_weights(source, path)
    torch.manual_seed(1)
    loaded = build_clip("tiny", weights=str(path))
    for key, value in source.state_dict().items():
        assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    wrapped = tmp_path / "wrapped.pt"  # a training checkpoint: state_dict key, module. prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.clip.state_dict().items()}},
               wrapped)
    again = tiny()
    load_clip_weights(again, wrapped)
    assert_close(again.clip.logit_scale, source.clip.logit_scale)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive_is_read(tmp_path) -> None:
    """OpenAI ships TorchScript archives (RN50.pt, ViT-B-16.pt): a traced CLIP stands in."""
    source = tiny().clip.eval()
    archive = torch.jit.trace_module(source, {"encode_image": torch.randn(1, 3, 48, 48),
                                              "encode_text": torch.zeros(1, 32, dtype=torch.long)})
    path = tmp_path / "traced.pt"
    torch.jit.save(archive, str(path))
    loaded = build_clip("tiny", weights=str(path))
    for key, value in source.state_dict().items():
        assert_close(loaded.clip.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_weights_of_another_image_size_are_interpolated(tmp_path) -> None:
    path = tmp_path / "64px.pt"
    save_clip_weights(tiny(image_size=64), path)
    model = build_clip("tiny", weights=str(path), image_size=48)
    assert model.encode_image(torch.randn(2, 3, 48, 48)).shape == (2, 64)


def test_missing_or_foreign_weights_are_one_clear_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        build_clip("tiny", weights=str(tmp_path / "nope.pt"))
    partial = tmp_path / "partial.pt"
    state = tiny().clip.state_dict()
    state.pop("logit_scale")
    torch.save(state, partial)
    with pytest.raises(ConfigError, match="does not fit"):
        build_clip("tiny", weights=str(partial))


def test_random_init_is_warned() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        build_clip("tiny")


# ----------------------------------------------------------------------------- the method
def _method(**values) -> tuple[TailCLIP, torch.nn.Module]:
    torch.manual_seed(0)
    m = methods.create_method("tailclip", values, TASK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = m.configure_model(torch.nn.Identity())
    m.on_epoch_start(0)
    return m, model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor([[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 1, 0]]).float()
    return {"image": torch.randn(4, 3, 48, 48, generator=g), "target": target,
            "index": torch.tensor([0, 3, 5, 7])}


def test_training_loss_is_contrastive_plus_lambda_balanced() -> None:
    m, model = _method(lambda_bal=2.0)
    batch = _batch()
    out = m.training_step(model, batch)
    with torch.no_grad():
        v = model.encode_image(batch["image"])
        captions = ["a photo of a zero", "a photo of a one, two", "a photo of a zero, three",
                    "a photo of a two"]
        u = model.encode_text(tokenize(captions, 32))
        e = model.encode_text(tokenize([f"a photo of a {n}" for n in NAMES], 32))
        scale = model.clip.logit_scale.exp()
        z = scale * v @ e.T
        w = class_weights(TASK.class_counts, TASK.num_train, 1.25)
        bal = bal_reference(z.double().numpy(), batch["target"].double().numpy(),
                            w.double().numpy(), 0.0, 4.0, 0.05, 0.1)
        want = contrastive_loss(v, u, scale) + 2.0 * bal.mean()  # the release: lambda x mean
    assert_close(out["logits"].detach(), z, rtol=1e-5, atol=1e-5)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-4)


def test_balanced_loss_does_not_train_the_text_tower() -> None:
    m, model = _method()
    out = m.training_step(model, _batch())
    m.balanced_loss(out["logits"], _batch()["target"]).backward()
    assert model.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert model.clip.token_embedding.weight.grad is None


def test_caption_file_supplies_the_captions(tmp_path) -> None:
    path = tmp_path / "captions.csv"
    path.write_text("index,caption\n" + "".join(f"{i},digits number {i}\n" for i in range(10)))
    m, _ = _method(captions="file", caption_file=str(path))
    m.set_train_targets(torch.ones(10, 4))
    want = tokenize([f"digits number {i}" for i in (0, 3, 5, 7)], 32)
    assert_close(m.caption_tokens(_batch()), want)
    path.write_text("index,caption\n0,only one\n")
    with pytest.raises(DataError, match="9 missing"):
        m.set_train_targets(torch.ones(10, 4))


def test_benchmark_caption_parquet_is_read_in_image_id_order(tmp_path) -> None:
    import pandas as pd

    ids = [f"img{i:02d}" for i in range(10)]
    texts = [f"a caption {i}" if i != 5 else None for i in range(10)]
    path = tmp_path / "captions.parquet"
    pd.DataFrame({"image_id": ids[::-1], "caption": texts[::-1]}).to_parquet(path)
    m, _ = _method(captions="file", caption_file=str(path))
    targets = torch.zeros(10, 4)
    targets[:, 1] = 1.0
    m.set_train_targets(targets)
    want = tokenize(["a caption 0", "a caption 3", "a photo of a one", "a caption 7"], 32)
    assert_close(m.caption_tokens(_batch()), want)  # row 5 has no caption: label-derived


def test_softmax_map_is_the_release_metric() -> None:
    g = np.random.default_rng(0)
    scores, targets = g.normal(size=(30, 4)), (g.random((30, 4)) < 0.4).astype(int)
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    want = 100 * np.mean([average_precision_score(targets[:, c], probs[:, c]) for c in range(4)])
    got = softmax_map(scores, targets, {"head": [0, 1]})
    assert got["mAP_softmax"] == pytest.approx(want)
    assert set(got) == {"mAP_softmax", "mAP_softmax_head"}


def test_loop_resume_continues_exactly() -> None:
    """Through tuner.loop.fit: stop after epoch 1, resume, get the uninterrupted run."""
    from tuner.backbones import build_model
    from tuner.loop import TrainConfig, TrainData, fit

    n, c = 24, 4
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = (torch.rand(n, c, generator=g) < 0.4).float()
    labels[labels.sum(1) == 0, 0] = 1.0
    seen_weights = []

    def batches(epoch, weights=None):
        seen_weights.append(weights)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, n, 12):
            yield {"image": images[order[start:start + 12]], "index": order[start:start + 12]}

    data = TrainData(batches, labels, 2, images, labels.numpy().astype(np.uint8))
    task = TaskInfo(c, n, tuple(int(v) for v in labels.sum(0)), 2, class_names=NAMES)
    cfg = TrainConfig.from_dict({"image_size": 16, "batch_size": 12, "max_epochs": 2})

    def run(resume=None, stop_after=None):
        reports = []

        def report(metrics, state):
            reports.append((metrics, copy.deepcopy(state)))
            if stop_after and metrics["epoch"] >= stop_after:
                raise StopIteration

        torch.manual_seed(0)
        method = methods.create_method("tailclip", {"clip_image_size": 16}, task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                fit(method, build_model("small_cnn", c), cfg, data, report, resume=resume,
                    device=torch.device("cpu"))
            except StopIteration:
                pass
        return reports

    full = run()
    resumed = run(resume=run(stop_after=1)[-1][1])
    assert [r[0]["epoch"] for r in resumed] == [2]
    for (a, _), (b, _) in zip(full[1:], resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_mAP"] == pytest.approx(b["val_mAP"], rel=1e-5)
    assert seen_weights[0] is not None and seen_weights[0].shape == (n,)


@pytest.mark.integration
def test_tiny_search_runs_end_to_end(digits_dir, tmp_path) -> None:
    """The shipped space through Ray Tune: 2 trials x 1 epoch, then the test-split score."""
    import json
    import shutil

    import pandas as pd
    import ray
    import yaml

    from tuner import search

    if ray.is_initialized():
        ray.shutdown()
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    root = Path(__file__).resolve().parents[1]
    space = yaml.safe_load((root / "search_spaces/tailclip.yaml").read_text())
    space["asha"] = {"max_epochs": 1, "grace_period": 1, "reduction_factor": 2}
    space["search"].update(num_trials=2, max_concurrent=2)
    path = tmp_path / "tailclip.yaml"
    path.write_text(yaml.safe_dump(space))
    code = search.main(["--method", "tailclip", "--space", str(path), "--out",
                        str(tmp_path / "exp"), "--name", "it", "--data-dir", str(data)])
    ray.shutdown()
    assert code == 0
    board = pd.read_csv(tmp_path / "exp" / "it" / "leaderboard.csv")
    assert len(board) == 2 and (board["status"] == "COMPLETE").all()
    assert board["val_mAP"].between(0, 100).all()
    test = json.loads((tmp_path / "exp" / "it" / "test_metrics.json").read_text())
    assert 0 <= test["mAP"] <= 100
