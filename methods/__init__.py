"""Method plug-ins. Importing this package registers every shipped method."""

from methods import asl, bce, hill, splc  # noqa: F401  (registration side effects)
from methods.base import Batch, Method, MethodParams, TaskInfo, hp
from methods.registry import (
    create_method,
    get_method_class,
    list_methods,
    make_params,
    register_method,
)

__all__ = [
    "Batch",
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
