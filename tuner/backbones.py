"""Backbones: torchvision ResNet-18/50/101 and a small CNN for the embedded benchmark on CPU.

Every model is a :class:`Classifier`: ``features(x)`` gives pooled ``(B, D)`` features and
``classifier`` (an ``nn.Linear``, found by name) maps them to ``(B, C)`` logits, so methods that
need features or class activation maps can use them. Pretrained weights come only from a local
file the user names (loaded with ``torch.load(weights_only=True)``); nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from tuner.errors import ConfigError

BACKBONES = ("small_cnn", "resnet18", "resnet50", "resnet101")


class Classifier(nn.Module):
    """A trunk producing spatial feature maps, global average pooling and a linear classifier."""

    def __init__(self, trunk: nn.Module, feature_dim: int, num_classes: int,
                 pool: str = "avg") -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ConfigError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.pool = pool
        self.classifier = nn.Linear(feature_dim, num_classes)

    def feature_maps(self, x: Tensor) -> Tensor:
        """``(B, D, h, w)`` feature maps."""
        return self.trunk(x)

    def pool_maps(self, maps: Tensor) -> Tensor:
        """``(B, D, h, w)`` maps -> ``(B, D)`` (average, or max for ``pool="max"``); a method
        that computes its logits from :meth:`feature_maps` pools with this, so its training
        logits are the ones :meth:`forward` scores at evaluation."""
        return maps.amax(dim=(2, 3)) if self.pool == "max" else maps.mean(dim=(2, 3))

    def features(self, x: Tensor) -> Tensor:
        """``(B, D)`` globally pooled features (average, or max for ``pool="max"``)."""
        return self.pool_maps(self.feature_maps(x))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, C)`` logits."""
        return self.classifier(self.features(x))


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def small_cnn(width: int = 16) -> tuple[nn.Module, int]:
    """Four conv blocks and two 2x poolings: DigitsMLT's 24 px -> 6x6 maps.

    DigitsMLT (version 3) shows native 8x8 digits, so the stem keeps stride 1 (a stride-2
    stem cost 3-4 val mAP there); at width 16 an image costs about a third of what version
    2's width-32 stride-2 network on 48 px mosaics did, so an epoch of 2.9x more images costs
    about the same. The classifier pools with max (:func:`_trunk`): a digit fills one cell of
    nine, and averaging dilutes its evidence (+1.4 val mAP; ``benchmarks/RESULTS.md`` s. 7).
    """
    trunk = nn.Sequential(
        _conv_block(3, width),
        _conv_block(width, 2 * width),
        nn.MaxPool2d(2),
        _conv_block(2 * width, 4 * width),
        nn.MaxPool2d(2),
        _conv_block(4 * width, 4 * width),
    )
    return trunk, 4 * width


def _resnet(factory: Callable[..., nn.Module]) -> tuple[nn.Module, int]:
    net = factory(weights=None)
    dim = net.fc.in_features
    trunk = nn.Sequential(*(m for name, m in net.named_children() if name not in ("avgpool", "fc")))
    return trunk, dim


def _trunk(name: str) -> tuple[nn.Module, int, str]:
    """Trunk, feature width and global pooling of backbone ``name``."""
    if name == "small_cnn":
        return (*small_cnn(), "max")
    from torchvision import models

    return (*_resnet(getattr(models, name)), "avg")


def load_trunk_weights(model: Classifier, path: str | Path) -> None:
    """Load a torchvision-style state dict (``conv1.weight``, ..., ``fc.*`` ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pretrained weights file {path} does not exist; pass a local .pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"cannot read weights {path}: {exc}; expected a torch state dict") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    names = [n for n, _ in model.trunk.named_children()]
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in ("fc", "classifier"):
            continue
        if head in _TORCHVISION_ORDER and _TORCHVISION_ORDER.index(head) < len(names):
            renamed[f"{_TORCHVISION_ORDER.index(head)}.{rest}"] = value
        else:
            renamed[key] = value
    try:
        missing, unexpected = model.trunk.load_state_dict(renamed, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()[-1].strip()
        raise ConfigError(f"weights {path} do not fit the backbone: {first}") from None
    if missing or unexpected:
        raise ConfigError(
            f"weights {path} do not fit the backbone: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


_TORCHVISION_ORDER = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def build_model(name: str, num_classes: int, weights: str | None = None) -> Classifier:
    """A :class:`Classifier` with backbone ``name`` (random init unless ``weights`` is given)."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    trunk, dim, pool = _trunk(name)
    model = Classifier(trunk, dim, num_classes, pool)
    if weights:
        if name == "small_cnn":
            raise ConfigError("small_cnn has no pretrained weights; drop `weights` or use a resnet")
        load_trunk_weights(model, weights)
    return model
