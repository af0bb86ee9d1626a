"""Backbones: shapes, classifier by name, local weights only (random weights in the test)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

from tuner.backbones import BACKBONES, build_model
from tuner.errors import ConfigError


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
def test_logits_and_features_shapes(name: str) -> None:
    model = build_model(name, 7).eval()
    x = torch.randn(2, 3, 48, 48)
    assert model(x).shape == (2, 7)
    feats = model.features(x)
    assert feats.shape == (2, model.feature_dim)
    torch.testing.assert_close(model.classifier(feats), model(x))


def test_local_weights_file_is_loaded_into_the_trunk(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 5, weights=str(path))
    torch.testing.assert_close(model.trunk[0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.trunk[7][1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.classifier.out_features == 5


def test_bad_weights_and_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        build_model("resnet18", 5, weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "r50.pth"
    torch.save(models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="do not fit the backbone"):
        build_model("resnet18", 5, weights=str(wrong))
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        build_model("vgg", 5)
    assert "resnet101" in BACKBONES


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": object()}, evil)
    with pytest.raises(ConfigError, match="cannot read weights"):
        build_model("resnet18", 5, weights=str(evil))


def test_small_cnn_pools_by_max_and_resnets_by_average() -> None:
    x = torch.randn(2, 3, 24, 24)
    small = build_model("small_cnn", 3).eval()
    torch.testing.assert_close(small.features(x), small.feature_maps(x).amax(dim=(2, 3)))
    resnet = build_model("resnet18", 3).eval()
    torch.testing.assert_close(resnet.features(x), resnet.feature_maps(x).mean(dim=(2, 3)))


def test_unknown_pooling_is_refused() -> None:
    from torch import nn

    from tuner.backbones import Classifier

    with pytest.raises(ConfigError, match="pool must be 'avg' or 'max'"):
        Classifier(nn.Identity(), 4, 2, pool="sum")
