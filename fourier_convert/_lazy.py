"""Lazy package attributes (PEP 562), so that ``import fourier_convert`` and the CLI's ``--help`` do not import
torch, transformers or onnx until something that needs them is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, namespace: dict[str, Any], where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``where[name]`` (a module path) on first use of ``name`` and caches
    the value in ``namespace`` (the package's globals).

    Args:
        package: The package's ``__name__``, for the error message.
        namespace: The package's ``globals()``.
        where: Attribute name -> module that defines it.

    Returns:
        The ``__getattr__`` function.

    Example:
        >>> import fourier_convert as fc
        >>> fc.to_lora.__module__
        'fourier_convert.lora'
    """

    def getattr_(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return getattr_
