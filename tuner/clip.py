"""CLIP backbones through open_clip: OpenAI's RN50 and ViT-B/16 layouts and a tiny CPU config.

Vision-language methods (TailCLIP) replace the platform backbone with a :class:`ClipBackbone`:
an ``open_clip`` ``CLIP`` model (image tower, text tower, learnable logit scale) plus the
helpers a method needs: unit-norm image and text embeddings, the clamped scale
:math:`\\exp(t) \\le 100` and the library's BPE tokenizer (its vocabulary ships inside the
wheel, so tokenizing works offline).

Weights come only from a local file the user names (:func:`load_clip_weights`); nothing is
downloaded. Without a file the model starts from random initialisation, with a warning.
Accepted files: a ``state_dict`` saved with ``torch.save`` (read with ``weights_only=True``,
optionally under a ``state_dict`` / ``model_state_dict`` key and ``module.`` / ``model.`` /
``clip.`` prefixes), a ``.safetensors`` file, or OpenAI's released TorchScript archive
(``RN50.pt``, ``ViT-B-16.pt``: read with ``torch.jit.load``, which runs no Python pickle code).
Position embeddings are interpolated when ``image_size`` differs from the file's.

``open_clip`` is imported lazily: ``import methods`` (done by every CLI and test) must not pay
its few seconds of import time.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuner.errors import ConfigError

__all__ = [
    "ARCHS",
    "MAX_LOGIT_SCALE",
    "ClipBackbone",
    "build_clip",
    "clip_config",
    "load_clip_weights",
    "resolve_weights_path",
    "save_clip_weights",
    "tokenize",
]

#: architectures: a tiny CPU configuration and OpenAI CLIP's RN50 / ViT-B/16 layouts
ARCHS = ("tiny", "RN50", "ViT-B-16")
#: CLIP clamps the learned logit scale exp(t) at 100
MAX_LOGIT_SCALE = 100.0

#: a CLIP-style model small enough to train from scratch on CPU: ViT with 8 px patches (a
#: 48 px input is a 6x6 grid; DigitsMLT's 24 px images are upsampled to it), 2 layers of
#: width 96, a 2-layer text transformer over open_clip's 49,408-token BPE vocabulary with 32
#: positions
_TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 96, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2, "mlp_ratio": 2.0},
}
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_PREFIXES = ("module.", "model.", "clip.")


def clip_config(arch: str, image_size: int = 0) -> dict[str, Any]:
    """open_clip model config of ``arch`` (in :data:`ARCHS`), with ``image_size`` if > 0."""
    if arch not in ARCHS:
        raise ConfigError(f"clip_arch={arch!r} is not supported; use one of {list(ARCHS)}")
    if arch == "tiny":
        cfg = copy.deepcopy(_TINY)
    else:
        import open_clip

        cfg = copy.deepcopy(open_clip.get_model_config(arch))
    if image_size:
        cfg["vision_cfg"]["image_size"] = int(image_size)
    return {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}


def tokenize(texts: Sequence[str], context_length: int) -> Tensor:
    """``(len(texts), context_length)`` int64 BPE tokens (open_clip's tokenizer, offline).

    Texts longer than ``context_length`` tokens are cut, keeping the end-of-text token.
    """
    import open_clip

    return open_clip.tokenize(list(texts), context_length=context_length)


class ClipBackbone(nn.Module):
    """An open_clip ``CLIP`` with unit-norm embeddings and the clamped logit scale.

    Attributes:
        clip: the open_clip model (``visual``, text transformer, ``logit_scale``).
        arch: the architecture name.
        image_size: the side the image tower expects; other sizes are resized bilinearly.
        context_length: text positions (tokenize with this length).
    """

    def __init__(self, clip: nn.Module, arch: str, image_size: int, context_length: int):
        super().__init__()
        self.clip = clip
        self.arch = arch
        self.image_size = int(image_size)
        self.context_length = int(context_length)

    def encode_image(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, D)`` unit-norm embeddings."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                   mode="bilinear", align_corners=False)
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        """``(T, L)`` tokens -> ``(T, D)`` unit-norm embeddings."""
        return F.normalize(self.clip.encode_text(tokens), dim=-1)

    def logit_scale(self) -> Tensor:
        """The scalar :math:`\\min(\\exp(t), 100)` (CLIP's temperature, learnable)."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE).reshape(())

    def forward(self, images: Tensor) -> Tensor:
        """Image embeddings (the loop never calls this; methods use the encoders)."""
        return self.encode_image(images)


def build_clip(
    arch: str = "tiny",
    weights: str | None = None,
    image_size: int = 0,
    quick_gelu: bool = True,
) -> ClipBackbone:
    """A CLIP model of ``arch``, from the local ``weights`` file or randomly initialised.

    Args:
        arch: one of :data:`ARCHS`.
        weights: a local weights file (see the module docstring); None = random init, warned.
        image_size: input side of the image tower; 0 = the architecture's (224, tiny 48).
        quick_gelu: QuickGELU activations, as in OpenAI's released weights (open_clip/LAION
            weights of the same layouts use GELU: set False for those).
    """
    from open_clip.model import CLIP

    cfg = clip_config(arch, image_size)
    model = CLIP(**cfg, quick_gelu=quick_gelu)
    if weights:
        load_clip_weights(model, weights)
    else:
        warnings.warn(
            f"CLIP {arch}: no weights file given, training starts from RANDOM initialisation "
            f"(set clip_weights to a local CLIP weights file for real use)",
            UserWarning, stacklevel=2,
        )
    vision = cfg["vision_cfg"]["image_size"]
    return ClipBackbone(model, arch, vision, cfg["text_cfg"]["context_length"])


def resolve_weights_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as an existing file; relative paths also try the search's start directory.

    Ray Tune runs each trial in its own directory and records where the search started in
    ``TUNE_ORIG_WORKING_DIR``, so a relative ``clip_weights`` keeps working inside a trial.
    """
    candidate = Path(path).expanduser()
    tries = [candidate]
    origin = os.environ.get("TUNE_ORIG_WORKING_DIR")
    if origin and not candidate.is_absolute():
        tries.append(Path(origin) / candidate)
    for item in tries:
        if item.is_file():
            return item
    raise ConfigError(f"clip_weights={str(path)!r} is not a file; give the path of a local "
                      f"CLIP weights file (nothing is downloaded), or leave it unset")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file, as a flat ``name -> tensor`` mapping."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if _is_torchscript(path):
        state = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        for key in _TORCHSCRIPT_EXTRAS:
            state.pop(key, None)
        return state
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(f"clip_weights={str(path)!r} is not a readable weights file "
                          f"({type(exc).__name__}); save a state_dict with torch.save") from None
    for key in ("state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"clip_weights={str(path)!r} does not hold a state_dict of tensors")
    return dict(state)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _resize_grid(pos: Tensor, length: int) -> Tensor:
    """Interpolate a ``(1 + g*g, D)`` position table (class token first) to ``length`` rows."""
    old, new = math.isqrt(pos.shape[0] - 1), math.isqrt(length - 1)
    grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pos)])


def _fit_positions(state: dict[str, Tensor], model: nn.Module) -> None:
    """Resize image (ViT and RN attention-pool) and text position tables to ``model``'s."""
    targets = dict(model.state_dict())
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key in state and key in targets and state[key].shape != targets[key].shape:
            state[key] = _resize_grid(state[key], targets[key].shape[0])
    key = "positional_embedding"
    if key in state and key in targets and state[key].shape[0] != targets[key].shape[0]:
        n = targets[key].shape[0]
        table = state[key].T.unsqueeze(0).float()
        state[key] = F.interpolate(table, size=n, mode="linear", align_corners=False)[0].T


def load_clip_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a local weights file into an open_clip ``CLIP`` (or a :class:`ClipBackbone`).

    Raises:
        ConfigError: the file is missing, unreadable, or does not fit the architecture.
    """
    clip = model.clip if isinstance(model, ClipBackbone) else model
    file = resolve_weights_path(path)
    state = _strip_prefixes(_read_state_dict(file))
    own = clip.state_dict()
    for name, _ in clip.named_buffers():  # e.g. attn_mask: traced archives store it
        if name not in own:
            state.pop(name, None)
    _fit_positions(state, clip)
    if "logit_scale" in state:
        state["logit_scale"] = state["logit_scale"].reshape(clip.logit_scale.shape)
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        missing = [k for k in clip.state_dict() if k not in state]
        unexpected = [k for k in state if k not in clip.state_dict()]
        detail = (f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                  f"(e.g. {unexpected[:2]})" if missing or unexpected
                  else str(exc).strip().splitlines()[-1][:200])
        raise ConfigError(f"clip_weights={str(path)!r} does not fit this CLIP architecture: "
                          f"{detail}; check clip_arch") from None


def save_clip_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save the open_clip ``state_dict`` of ``model`` so :func:`load_clip_weights` reads it."""
    clip = model.clip if isinstance(model, ClipBackbone) else model
    torch.save({k: v.detach().cpu() for k, v in clip.state_dict().items()}, path)
