"""Which modules a FourierFT config selects, decided as PEFT decides it.

Mirrors PEFT's ``check_target_module_exists``: ``exclude_modules`` first, ``modules_to_save`` never
adapted, then ``target_modules`` (a regex matched against the whole name, or a list of names / suffixes),
narrowed by ``layers_to_transform`` / ``layers_pattern``.
"""

from __future__ import annotations

import re
from typing import Protocol

from fourier_convert.patterns import config_match


class Selection(Protocol):
    """The config fields that select modules, as FourierFT's and LoRA's configs both hold them."""

    @property
    def target_modules(self) -> list[str] | str | None: ...
    @property
    def exclude_modules(self) -> list[str] | str | None: ...
    @property
    def layers_to_transform(self) -> list[int] | int | None: ...
    @property
    def layers_pattern(self) -> list[str] | str | None: ...
    @property
    def modules_to_save(self) -> list[str]: ...


def _suffix_match(key: str, names: list[str] | set[str]) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            wrapped = rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
            match = config_match("match", wrapped, key, "layers_pattern", pattern)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_targeted(settings: Selection, key: str) -> bool:
    """Whether PEFT would put an adapter layer (FourierFT or LoRA) on module ``key``.

    Args:
        settings: The adapter's config (its selection fields).
        key: Module path in the adapter's name space (e.g. ``model.layers.0.self_attn.q_proj``).

    Returns:
        True when the config selects the module.

    Example:
        >>> from fourier_convert.io.adapter import parse_settings
        >>> from pathlib import Path
        >>> s = parse_settings({"peft_type": "FOURIERFT", "target_modules": ["q_proj"],
        ...                     "layers_to_transform": [1]}, Path("adapter_config.json"))
        >>> is_targeted(s, "model.layers.1.self_attn.q_proj"), is_targeted(s, "model.layers.0.self_attn.q_proj")
        (True, False)
    """
    exclude = settings.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if config_match("fullmatch", exclude, key, "exclude_modules"):
                return False
        elif _suffix_match(key, exclude):
            return False
    if any(config_match("match", rf"(^|.*\.){m}($|\..*)", key, "modules_to_save", m) for m in settings.modules_to_save):
        return False
    targets = settings.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return config_match("fullmatch", targets, key, "target_modules") is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = settings.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, settings.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers
