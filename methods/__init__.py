"""Method plug-ins. Importing this package registers every shipped method.

Every module of this package other than ``base`` and ``registry`` is imported here, so a new
method is one new file with a ``@register_method`` class.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from methods.base import Batch, Dist, Method, MethodParams, TaskInfo, hp
from methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    make_params,
    register_method,
)

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Batch",
    "Dist",
    "Method",
    "MethodParams",
    "TaskInfo",
    "create_method",
    "get_method_class",
    "hp",
    "list_methods",
    "make_params",
    "register_method",
]
