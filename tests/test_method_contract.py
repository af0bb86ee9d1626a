"""The contract every registered method honours; a new method is tested by registering it."""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

import methods
from methods import Batch, Method, TaskInfo
from tuner.errors import ConfigError

TASK = TaskInfo(
    num_classes=5, num_train=20, class_counts=(10, 5, 3, 2, 1), max_epochs=4,
    groups={"head": (0, 1), "medium": (2,), "tail": (3, 4)},
    class_names=("zero", "one", "two", "three", "four"),
)
NAMES = methods.list_methods()
#: methods whose ``loss(logits, batch)`` is the whole method
LOGIT_NAMES = [n for n in NAMES if methods.get_method_class(n).logit_loss]


def make_batch(seed: int, b: int = 6) -> tuple[Tensor, Batch]:
    """Seeded ``(B, C)`` logits and a batch with images, 0/1 targets and row indices."""
    gen = torch.Generator().manual_seed(seed)
    c = TASK.num_classes
    logits = (2.0 * torch.randn(b, c, generator=gen)).requires_grad_()
    batch = {
        "image": torch.rand(b, 3, 8, 8, generator=gen),
        "target": (torch.rand(b, c, generator=gen) < 0.4).float(),
        "index": torch.randperm(TASK.num_train, generator=gen)[:b],
    }
    return logits, batch


def train_targets(seed: int = 11) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(TASK.num_train, TASK.num_classes, generator=gen) < 0.4).float()
    targets[targets.sum(1) == 0, 0] = 1.0
    return targets


def make(name: str, epoch: int = 0) -> Method:
    m = methods.create_method(name, None, TASK)
    m.set_train_targets(train_targets())
    m.on_fit_start(torch.nn.Identity())
    m.on_epoch_start(epoch)
    return m


def make_with_model(name: str, epoch: int = 0, seed: int = 0) -> tuple[Method, torch.nn.Module]:
    """A method set up the way the loop does it, with its configured small model."""
    from tuner.backbones import build_model

    torch.manual_seed(seed)
    m = methods.create_method(name, None, TASK)
    m.set_train_targets(train_targets())
    model = m.configure_model(build_model("small_cnn", TASK.num_classes))
    m.on_fit_start(model)
    m.on_epoch_start(epoch)
    return m, model


def model_batch(seed: int, b: int = 6) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(TASK.num_train, generator=gen)[:b]
    return {
        "image": torch.randn(b, 3, 16, 16, generator=gen),
        "target": train_targets()[index],
        "index": index,
    }


def assert_state_equal(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, Tensor):
            assert_close(actual[key], value, rtol=0, atol=0, msg=key)
        else:
            assert actual[key] == value, key


def _bad_values(meta: Mapping[str, Any]) -> list[Any]:
    """Values just outside a field's declared range (or not among its choices)."""
    if meta["choices"] is not None:
        return ["not-a-choice"]
    bad: list[Any] = []
    if meta["low"] is not None:
        bad.append(meta["low"] if meta["low_open"] else meta["low"] - 1)
    if meta["high"] is not None:
        bad.append(meta["high"] if meta["high_open"] else meta["high"] + 1)
    return bad + [float("nan")]


FIELD_CASES = [
    (name, field, bad)
    for name in NAMES
    for field, meta in methods.get_method_class(name).Params.field_specs().items()
    for bad in _bad_values(meta)
]


def test_registry_lists_the_shipped_methods() -> None:
    assert {"bce", "asl", "hill", "splc"} <= set(NAMES)
    for name in NAMES:
        assert methods.get_method_class(name).name == name


def test_unknown_method_lists_registered_names() -> None:
    with pytest.raises(ConfigError) as info:
        methods.get_method_class("nope")
    message = str(info.value)
    assert "nope" in message
    assert all(name in message for name in NAMES)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_loss_is_a_finite_scalar(name: str) -> None:
    for epoch in range(TASK.max_epochs):
        logits, batch = make_batch(seed=epoch)
        value = make(name, epoch).loss(logits, batch)
        assert value.shape == ()
        assert torch.isfinite(value)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_gradients_reach_the_logits(name: str) -> None:
    logits, batch = make_batch(seed=1)
    make(name).loss(logits, batch).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_training_step_returns_loss_and_logits(name: str) -> None:
    logits, batch = make_batch(seed=2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, TASK.num_classes))
    out = make(name).training_step(model, batch)
    assert out["loss"].shape == ()
    assert out["logits"].shape == logits.shape
    out["loss"].backward()
    assert model[1].weight.grad is not None


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_state_dict_round_trips_into_a_fresh_instance(name: str) -> None:
    m = make(name, epoch=3)
    logits, batch = make_batch(seed=3)
    m.on_batch_end(batch, {"loss": m.loss(logits, batch), "logits": logits.detach()})
    m.on_epoch_end(3)
    fresh = make(name)
    fresh.load_state_dict(m.state_dict())
    assert_state_equal(fresh.state_dict(), m.state_dict())
    assert_close(fresh.loss(logits, batch), m.loss(logits, batch))


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_method_pickles(name: str) -> None:
    m = make(name, epoch=2)
    clone = pickle.loads(pickle.dumps(m))
    assert type(clone) is type(m)
    assert clone.params == m.params
    assert_state_equal(clone.state_dict(), m.state_dict())
    logits, batch = make_batch(seed=4)
    assert_close(clone.loss(logits, batch), m.loss(logits, batch))


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_same_seed_gives_the_same_loss(name: str) -> None:
    first = make(name).loss(*make_batch(seed=5))
    second = make(name).loss(*make_batch(seed=5))
    assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_loss_follows_the_input_dtype(name: str) -> None:
    logits, batch = make_batch(seed=6)
    as_double = {**batch, "target": batch["target"].long()}
    value = make(name).loss(logits.detach().double(), as_double)
    assert value.dtype == torch.float64
    assert_close(value.float(), make(name).loss(logits, batch).detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_loss_runs_on_the_logits_device(name: str) -> None:
    logits, batch = make_batch(seed=7)
    cuda_batch = {key: value.cuda() for key, value in batch.items()}
    value = make(name).loss(logits.detach().cuda(), cuda_batch)
    assert value.device.type == "cuda"
    assert_close(value.cpu(), make(name).loss(logits, batch).detach())


@pytest.mark.parametrize("name", NAMES)
def test_default_params_construct_and_round_trip(name: str) -> None:
    cls = methods.get_method_class(name)
    params = cls.Params()
    assert methods.make_params(name) == params
    assert cls.Params.from_dict(params.to_dict()) == params
    for field, spec in cls.Params.field_specs().items():
        assert getattr(params, field) == spec["default"]
        assert spec["doc"], f"{name}.{field} needs a doc line"


@pytest.mark.parametrize("name", NAMES)
def test_params_are_frozen(name: str) -> None:
    params = methods.get_method_class(name).Params()
    for field in dataclasses.fields(params):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(params, field.name, getattr(params, field.name))


@pytest.mark.parametrize("name,field,bad", FIELD_CASES)
def test_out_of_range_value_names_the_field(name: str, field: str, bad: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        methods.make_params(name, {field: bad})


@pytest.mark.parametrize("name", NAMES)
def test_unknown_hyperparameter_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="not_a_knob"):
        methods.get_method_class(name).Params.from_dict({"not_a_knob": 1})


@pytest.mark.parametrize("name", NAMES)
def test_wrong_params_type_is_refused(name: str) -> None:
    class Other(methods.MethodParams):
        pass

    with pytest.raises(ConfigError):
        methods.get_method_class(name)(Other(), TASK)


# ------------------------------------------------------------------ through a model, every method
@pytest.mark.parametrize("name", NAMES)
def test_model_training_step_trains_every_parameter_it_owns(name: str) -> None:
    m, model = make_with_model(name)
    batch = model_batch(seed=20)
    out = m.training_step(model, batch)
    assert out["loss"].shape == ()
    assert torch.isfinite(out["loss"])
    assert out["logits"].shape == (len(batch["index"]), TASK.num_classes)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    m.on_batch_end(batch, {k: v.detach() if isinstance(v, Tensor) else v for k, v in out.items()})
    m.on_epoch_end(0)


@pytest.mark.parametrize("name", NAMES)
def test_predict_gives_finite_scores(name: str) -> None:
    m, model = make_with_model(name)
    model.eval()
    with torch.no_grad():
        scores = m.predict(model, model_batch(seed=21)["image"])
    assert scores.shape == (6, TASK.num_classes)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("name", NAMES)
def test_model_state_round_trips_after_an_epoch(name: str) -> None:
    m, model = make_with_model(name, epoch=1)
    for seed in range(3):
        batch = model_batch(seed=30 + seed)
        out = m.training_step(model, batch)
        m.on_batch_end(batch, {k: v.detach() if isinstance(v, Tensor) else v
                               for k, v in out.items()})
    m.on_epoch_end(1)
    state = pickle.loads(pickle.dumps(m.state_dict()))
    fresh, fresh_model = make_with_model(name, epoch=0, seed=1)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(state)
    assert_state_equal_deep(fresh.state_dict(), m.state_dict())
    batch = model_batch(seed=40)
    torch.manual_seed(5)
    first = m.training_step(model, batch)["loss"]
    torch.manual_seed(5)
    second = fresh.training_step(fresh_model, batch)["loss"]
    assert_close(second, first)


@pytest.mark.parametrize("name", NAMES)
def test_sample_weights_are_none_or_valid(name: str) -> None:
    m, _ = make_with_model(name)
    weights = m.sample_weights(0)
    if weights is not None:
        weights = torch.as_tensor(weights)
        assert weights.shape == (TASK.num_train,)
        assert torch.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0


def assert_state_equal_deep(actual: Any, expected: Any, where: str = "state") -> None:
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_state_equal_deep(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, Tensor):
        assert_close(actual, expected, rtol=0, atol=0, msg=where)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_equal_deep(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where
