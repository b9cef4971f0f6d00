"""Remembered verdicts of the config check: a ``config.json`` and a set of tensor shapes that fit.

Checking that a ``config.json`` fits its weights (:func:`fourier_convert.model_config.check_weights_fit`) imports
torch and transformers' modeling code: seconds, next to a fraction of a second for merging a small model. A
pipeline merges many adapters into the same base, so a passed check is remembered as an empty file named by the
SHA-256 of everything the verdict depends on: this package's and transformers' versions, the config's content
and every tensor's name and shape. Only passes are stored; a config that fails is checked (and refused) every
time. The folder is ``$FOURIER_CONVERT_CACHE``, else ``$XDG_CACHE_HOME/fourier-convert``, else
``~/.cache/fourier-convert``; ``FOURIER_CONVERT_CACHE=""`` turns remembering off. A folder that cannot be read or
written only means the check runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from fourier_convert import __version__

#: The environment variable naming the cache folder ("" turns the cache off).
CACHE_ENV = "FOURIER_CONVERT_CACHE"


def cache_folder() -> Path | None:
    """The folder verdicts are kept in, or None when ``FOURIER_CONVERT_CACHE`` is set to ``""``.

    Example:
        >>> cache_folder()  # doctest: +SKIP
        PosixPath('/home/me/.cache/fourier-convert/config-fit')
    """
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen) / "config-fit" if chosen else None
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "fourier-convert" / "config-fit"


def fit_key(config: Mapping[str, Any], shapes: Mapping[str, Sequence[int]]) -> str:
    """The SHA-256 naming the verdict on ``config`` with tensors of ``shapes``.

    Args:
        config: The content of ``config.json``.
        shapes: Tensor name -> shape.

    Returns:
        64 hex digits.

    Example:
        >>> len(fit_key({"model_type": "llama"}, {"lm_head.weight": (256, 64)}))
        64
    """
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "?"
    h = hashlib.sha256()
    h.update(json.dumps([__version__, transformers], default=str).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name in sorted(shapes):
        h.update(json.dumps([name, [int(d) for d in shapes[name]]]).encode())
    return h.hexdigest()


def known_fit(key: str) -> bool:
    """Whether a check with this :func:`fit_key` has passed before (False when the cache is off or unreadable).

    Example:
        >>> known_fit("0" * 64)
        False
    """
    folder = cache_folder()
    if folder is None:
        return False
    try:  # an entry of this cache's own making: a plain file (a link, even to a file, is not one)
        return stat.S_ISREG(os.lstat(folder / key).st_mode)
    except OSError:  # absent, a name too long, a folder that cannot be searched: not known, so the check runs
        return False


def remember_fit(key: str) -> None:
    """Record that the check with this :func:`fit_key` passed. Nothing happens (and nothing is raised) when the
    cache is off or its folder cannot be written.

    Example:
        >>> remember_fit(fit_key({"model_type": "llama"}, {}))
    """
    folder = cache_folder()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # a new empty file, never through a link (a dangling one planted under the key would create its target)
        os.close(os.open(folder / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    except OSError:  # there already (a link is left as it is), or the folder cannot be written
        return
