"""Which modules a FourierFT config selects, decided as PEFT decides it.

Mirrors PEFT's ``check_target_module_exists``: ``exclude_modules`` first, ``modules_to_save`` never
adapted, then ``target_modules`` (a regex matched against the whole name, or a list of names / suffixes),
narrowed by ``layers_to_transform`` / ``layers_pattern``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


def first_unadaptable(settings: Selection, shapes: Mapping[str, Sequence[int]]) -> tuple[str, str] | None:
    """The first module the config selects that no PEFT adapter layer can wrap: PEFT fails to load such an adapter
    (``ValueError: Target module ... is not supported``), whatever the file holds.

    Modules are seen through the base's tensors (``shapes``: module path + ``.`` + parameter name -> shape, in the
    adapter's name space). One that owns a ``weight`` of two or more dimensions (Linear, GPT-2's Conv1D,
    Embedding, convolutions) or an ``in_proj_weight`` (MultiheadAttention) may be adaptable, as the method decides;
    a norm or scale (its ``weight`` is 1-D) and a container (no weight of its own, only modules below it, e.g.
    ``model`` under ``target_modules: ".*"``) never are.

    Args:
        settings: The adapter's config (its selection fields).
        shapes: The base's tensor names and shapes.

    Returns:
        ``(module, what it is)`` for the first such module in the base's order, else None.

    Example:
        >>> from fourier_convert.io.adapter import parse_settings
        >>> from pathlib import Path
        >>> s = parse_settings({"peft_type": "FOURIERFT", "target_modules": ".*"}, Path("adapter_config.json"))
        >>> first_unadaptable(s, {"model.norm.weight": (64,), "lm_head.weight": (256, 64)})
        ('model', 'a container of 1 tensor(s) in modules below it, with no weight of its own')
    """
    owned: dict[str, dict[str, int]] = {}  # module -> its own parameters' dimensions
    for name, shape in shapes.items():
        parts = name.split(".")
        for i in range(1, len(parts)):
            owned.setdefault(".".join(parts[:i]), {})
        owned[".".join(parts[:-1])][parts[-1]] = len(shape)
    for module, params in owned.items():
        if not module or params.get("weight", 0) >= 2 or "in_proj_weight" in params:
            continue
        if not is_targeted(settings, module):
            continue
        if "weight" in params:
            return module, f"whose weight is {params['weight']}-D (a norm or scale, not a linear layer)"
        below = sum(1 for name in shapes if name.startswith(f"{module}."))
        return module, f"a container of {below} tensor(s) in modules below it, with no weight of its own"
    return None
