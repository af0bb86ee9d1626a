"""The shared training loop without Ray: reporting, exact resume, NaN guard, best weights."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import methods
from methods.base import Method, MethodParams, TaskInfo, hp
from tuner.backbones import build_model
from tuner.errors import NonFiniteLossError
from tuner.loop import (
    SCHEDULES,
    TrainConfig,
    TrainData,
    deterministic_torch,
    ema_decay_for,
    fit,
    lr_factor,
)

N, C, S = 48, 4, 16


def _data(seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g)
    labels = (torch.rand(N, C, generator=g) < 0.4).float()
    labels[:, 0] = (images[:, 0].float().mean((1, 2)) > 127).float()  # a learnable class

    def batches(epoch: int, weights=None):
        gen = torch.Generator().manual_seed(100 + epoch)
        if weights is None:
            order = torch.randperm(N, generator=gen)
        else:  # a with-replacement draw, like the streamed sampler
            order = torch.multinomial(torch.as_tensor(weights, dtype=torch.float), N, True,
                                      generator=gen)
        for start in range(0, N, 16):
            idx = order[start : start + 16]
            yield {"image": images[idx], "index": idx}

    return TrainData(batches, labels, steps_per_epoch=3, val_images=images,
                     val_targets=labels.numpy().astype(np.uint8),
                     groups={"head": [0, 1], "medium": [2], "tail": [3]})


def _task() -> TaskInfo:
    return TaskInfo(num_classes=C, num_train=N, class_counts=(20, 15, 10, 5), max_epochs=3)


def _cfg(**kw) -> TrainConfig:
    base = {"image_size": S, "batch_size": 16, "max_epochs": 3, "lr": 3e-3, "ema_decay": 0.9}
    return TrainConfig.from_dict({**base, **kw})


def _run(method_name: str, cfg: TrainConfig, resume=None, stop_after: int | None = None):
    reports: list[tuple[dict, dict]] = []

    class Stop(Exception):
        pass

    def report(metrics, state):
        reports.append((metrics, copy.deepcopy(state)))
        if stop_after is not None and metrics["epoch"] >= stop_after:
            raise Stop

    torch.manual_seed(0)
    model = build_model("small_cnn", C)
    method = (_TableMethod(_TableParams(), _task()) if method_name == "table"
              else methods.create_method(method_name, {}, _task()))
    try:
        fit(method, model, cfg, _data(), report, resume=resume, device=torch.device("cpu"))
    except Stop:
        pass
    return reports


def test_reports_every_epoch_with_explicit_epoch_and_metrics() -> None:
    reports = _run("bce", _cfg())
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    for metrics, state in reports:
        for key in ("val_mAP", "val_mAP_head", "val_mAP_tail", "val_CF1", "val_OF1",
                    "train_loss", "best_val_mAP"):
            assert math.isfinite(metrics[key]), key
        assert metrics["best_val_mAP"] == max(m["val_mAP"] for m, _ in reports[: metrics["epoch"]])
        assert state["epoch"] == metrics["epoch"]
        assert set(state) >= {"model", "step", "method", "rng", "best"}
    # peak memory, against the kernel's own high-water mark of this process (VmHWM, kB)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
               if line.startswith("VmHWM:")) / 1024
    peaks = [m["peak_rss_mb"] for m, _ in reports]
    assert peaks == sorted(peaks) and 0 < peaks[-1] <= hwm * 1.01 + 1
    assert peaks[-1] >= 0.5 * hwm


@dataclasses.dataclass(frozen=True)
class _TableParams(MethodParams):
    momentum: float = hp(0.5, 0.0, 1.0, doc="confidence EMA")


class _TableMethod(Method):
    """NDLP-like state: a per-image confidence table updated every batch, re-weighted
    sampling from it, an extra head from ``configure_model`` with its own LR scale."""

    name = "table-test"
    Params = _TableParams
    logit_loss = False

    def set_train_targets(self, targets):
        self.table = targets.clone()

    def configure_model(self, model):
        model.extra = torch.nn.Linear(C, C)
        return model

    def lr_scale(self, param_name):
        return 10.0 if param_name.startswith("extra.") else 1.0

    def training_step(self, model, batch):
        logits = model.extra(model(batch["image"]))
        target = self.table[batch["index"]].to(logits.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        return {"loss": loss, "logits": logits}

    def on_batch_end(self, batch, output):
        m = self.params.momentum
        idx = batch["index"].cpu()
        self.table[idx] = m * self.table[idx] + (1 - m) * output["logits"].detach().sigmoid().cpu()

    def sample_weights(self, epoch):
        return self.table.sum(1) + 0.1

    def state_dict(self):
        return {**super().state_dict(), "table": self.table.clone()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.table = state["table"].clone()


@pytest.mark.parametrize("name", ["splc", "hill", "table"])
def test_resume_continues_exactly(name: str) -> None:
    full = _run(name, _cfg())
    first = _run(name, _cfg(), stop_after=1)
    resumed = _run(name, _cfg(), resume=first[-1][1])
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    for (a, _), (b, _) in zip(full[1:], resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_mAP"] == pytest.approx(b["val_mAP"], rel=1e-5)
    for key, value in full[-1][1]["model"].items():
        torch.testing.assert_close(value, resumed[-1][1]["model"][key])
    for key, value in full[-1][1]["method"].items():  # the method's own state, e.g. tables
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, resumed[-1][1]["method"][key], rtol=1e-5, atol=1e-6)
        else:
            assert value == resumed[-1][1]["method"][key], key


def test_best_weights_are_the_best_validation_epoch() -> None:
    reports = _run("bce", _cfg())
    best = reports[-1][1]["best"]
    scores = [m["val_mAP"] for m, _ in reports]
    assert best["epoch"] == int(np.argmax(scores)) + 1
    assert best["val_mAP"] == max(scores)


class _NanParams(MethodParams):
    pass


class _NanMethod(Method):
    name = "nan-test"
    Params = _NanParams

    def loss(self, logits, batch):
        return logits.sum() * float("nan")


def test_non_finite_loss_stops_with_a_reason() -> None:
    method = _NanMethod(_NanParams(), _task())
    with pytest.raises(NonFiniteLossError, match="nan-test: training loss became nan at epoch 1"):
        fit(method, build_model("small_cnn", C), _cfg(), _data(), lambda m, s: None,
            device=torch.device("cpu"))


def test_schedule_is_defined_on_the_full_budget() -> None:
    cfg = _cfg(warmup_frac=0.2)
    total = 100
    factors = [lr_factor(s, total, cfg) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.04)
    assert max(factors) == pytest.approx(1.0, abs=1e-2)
    assert int(np.argmax(factors)) == 20
    assert factors[-1] == pytest.approx(0.0, abs=1e-6)
    assert lr_factor(50, total, _cfg(schedule="constant")) == 1.0


def test_each_schedule_gives_the_learning_rates_of_its_formula() -> None:
    """Hand-computed factors: 4 steps an epoch, warm-up 0.5 epoch = 2 steps (0.04 -> 1)."""
    def factors(schedule: str, total: int = 10, **kw: float) -> list[float]:
        cfg = _cfg(schedule=schedule, warmup_epochs=0.5, **kw)
        return [lr_factor(s, total, cfg, steps_per_epoch=4) for s in (0, 1, 2, 6, 10, 14)]

    warm = [0.04, 0.52]
    assert factors("constant") == pytest.approx(warm + [1.0, 1.0, 1.0, 1.0])
    # rsqrt: 1 / sqrt(1 + epochs since the warm-up) = 1, 1/sqrt(2), 1/sqrt(3), 1/2
    assert factors("rsqrt") == pytest.approx(warm + [1.0, 0.5**0.5, 3**-0.5, 0.5])
    # cosine over the 8 steps after the warm-up of a 10-step budget, 0 from the end on
    assert factors("cosine") == pytest.approx(warm + [1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert factors("cosine", total=18) == pytest.approx(
        warm + [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    # only cosine depends on the budget
    assert factors("rsqrt", total=18) == factors("rsqrt")
    assert factors("constant", total=1000) == factors("constant")
    # warm-up from warmup_frac when warmup_epochs is 0: 20% of 10 steps = 2 steps again
    frac = _cfg(schedule="constant", warmup_frac=0.2)
    assert [lr_factor(s, 10, frac, 4) for s in (0, 1, 2)] == pytest.approx(warm + [1.0])
    assert lr_factor(0, 10, _cfg(schedule="rsqrt", warmup_frac=0.0), 4) == 1.0


def test_the_loop_applies_the_schedule_whatever_the_budget() -> None:
    """Reported LR after each epoch of 3 steps, warm-up 1 epoch (3 steps): rsqrt gives
    1, 1/sqrt(2), 1/sqrt(3) x lr in a 3-epoch and in a 5-epoch run alike."""
    expected = [3e-3 * f for f in (1.0, 2**-0.5, 3**-0.5)]
    for budget in (3, 5):
        cfg = _cfg(schedule="rsqrt", warmup_epochs=1.0, max_epochs=budget)
        lrs = [m["lr"] for m, _ in _run("bce", cfg, stop_after=3)]
        assert lrs == pytest.approx(expected, rel=1e-9)


def test_ema_horizon_in_epochs_sets_the_decay() -> None:
    assert ema_decay_for(_cfg(ema_epochs=2.0, ema_decay=0.5), steps_per_epoch=3) == pytest.approx(
        1 - 1 / 6)
    assert ema_decay_for(_cfg(ema_epochs=0.0, ema_decay=0.5), steps_per_epoch=3) == 0.5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_killed_run_resumes_its_schedule_and_average_identically(schedule: str,
                                                                  tmp_path: Path) -> None:
    """Stopped after epoch 1, resumed from the checkpoint file (restricted loader): the
    learning rates, metrics and weights (model and EMA) of epochs 2-3 equal the unbroken run's."""
    from tuner.trainable import load_state_file

    cfg = _cfg(schedule=schedule, warmup_epochs=0.5, ema_epochs=1.0, ema_decay=0.0)
    full = _run("splc", cfg)
    first = _run("splc", cfg, stop_after=1)
    torch.save(first[-1][1], tmp_path / "state.pt")
    resumed = _run("splc", cfg, resume=load_state_file(tmp_path / "state.pt"))
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    for (a, _), (b, _) in zip(full[1:], resumed):
        assert a["lr"] == b["lr"]
        assert a["val_model"] == b["val_model"]
        assert a["val_mAP"] == pytest.approx(b["val_mAP"], rel=1e-6)
    for key, value in full[-1][1]["step"]["ema"].items():
        torch.testing.assert_close(value, resumed[-1][1]["step"]["ema"][key])
    for key, value in full[-1][1]["model"].items():
        torch.testing.assert_close(value, resumed[-1][1]["model"][key])


def test_train_config_validation_names_the_field() -> None:
    from tuner.errors import ConfigError

    with pytest.raises(ConfigError, match="lr must be in"):
        TrainConfig(lr=0.0)
    with pytest.raises(ConfigError, match="backbone must be one of"):
        TrainConfig(backbone="vgg")


def test_channels_last_trains_the_same_in_nhwc() -> None:
    seen: list[bool] = []
    bce = type(methods.create_method("bce", {}, _task()))

    class Recording(bce):
        def training_step(self, model, batch):
            nhwc = torch.channels_last
            conv = model.trunk[0][0].weight  # first conv: 4-D, so NHWC and NCHW differ
            seen.append(batch["image"].is_contiguous(memory_format=nhwc)
                        and conv.is_contiguous(memory_format=nhwc))
            return super().training_step(model, batch)

    def run(channels_last: bool) -> list[float]:
        seen.clear()
        torch.manual_seed(0)
        reports: list[dict] = []
        fit(Recording(Recording.Params(), _task()), build_model("small_cnn", C),
            _cfg(channels_last=channels_last, ema_decay=0.0), _data(),
            lambda m, s: reports.append(m), device=torch.device("cpu"))
        return [m["val_mAP"] for m in reports]

    nchw = run(False)
    assert seen and not any(seen)
    nhwc = run(True)
    assert seen and all(seen)
    assert nhwc == pytest.approx(nchw, abs=0.5)  # same training, another memory layout


def test_evaluation_leaves_ignored_entries_out() -> None:
    """The loop's evaluation passes the split's "ignore" state to the metrics."""
    import methods as registry
    from methods.base import TaskInfo
    from tuner.backbones import build_model
    from tuner.loop import TrainConfig, evaluate, predict
    from tuner.metrics import mean_ap

    torch.manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    targets = (torch.rand(30, 4) < 0.4).numpy().astype(np.uint8)
    targets[:4] = 1
    ignore = np.zeros_like(targets, dtype=bool)
    ignore[10:20, :2] = True
    targets[ignore] = 0
    task = TaskInfo(num_classes=4, num_train=30, class_counts=(5, 5, 5, 5), max_epochs=1)
    method = registry.create_method("bce", {}, task)
    model = build_model("small_cnn", 4)
    cfg = TrainConfig.from_dict({"image_size": 16})
    cpu = torch.device("cpu")
    scores = predict(method, model, images, 8, cpu)
    got = evaluate(method, model, images, targets, {}, cfg, cpu, ignore=ignore)["mAP"]
    assert got == pytest.approx(mean_ap(scores, targets, ignore=ignore)["mAP"])
    assert got != pytest.approx(mean_ap(scores, targets)["mAP"])


def test_deterministic_torch_without_filling_new_tensors() -> None:
    """Deterministic algorithms on, torch's NaN fill of every torch.empty off (its whole 5%
    cost per epoch); both back to torch's defaults when turned off. A short fit still repeats
    to the bit under these settings."""
    try:
        deterministic_torch(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.MaxPool2d(2),
                                        torch.nn.Flatten(), torch.nn.LazyLinear(C))
            x = torch.randn(8, 3, S, S)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            for _ in range(3):
                loss = model(x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert torch.equal(runs[0], runs[1])
    finally:
        deterministic_torch(False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.utils.deterministic.fill_uninitialized_memory is True
