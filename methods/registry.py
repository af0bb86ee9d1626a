"""A small name -> method-class registry; the CLI and the tests enumerate it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from methods.base import Method, MethodParams, TaskInfo
from tuner.errors import ConfigError

_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` reachable as ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a non-empty `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; a one-line error lists the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}; registered methods: {', '.join(list_methods())}"
        ) from None


def make_params(name: str, values: Mapping[str, Any] | None = None) -> MethodParams:
    """The method's frozen hyperparameters from a (partial) mapping; defaults fill the rest."""
    return get_method_class(name).Params.from_dict(dict(values or {}))


def create_method(name: str, values: Mapping[str, Any] | None, task: TaskInfo) -> Method:
    """Instantiate method ``name`` with hyperparameters ``values`` for ``task``."""
    cls = get_method_class(name)
    return cls(cls.Params.from_dict(dict(values or {})), task)
