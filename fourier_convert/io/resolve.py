"""Turning a user's ``--base`` / ``--adapter`` argument into a local folder.

Accepted forms: a local folder, ``folder:subfolder``, or a Hugging Face hub id (``user/repo``,
optionally ``user/repo:subfolder``), fetched through ``huggingface_hub`` so that its cache, ``HF_HOME``
and offline mode (``HF_HUB_OFFLINE=1``) are honoured.
"""

from __future__ import annotations

import re
from pathlib import Path

from fourier_convert.errors import InputFileError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def split_subfolder(spec: str, subfolder: str | None = None) -> tuple[str, str | None]:
    """Split ``path:name`` into ``(path, name)`` unless ``spec`` itself exists; an explicit ``subfolder``
    wins over the ``:name`` suffix.

    Example:
        >>> split_subfolder("user/repo:second")
        ('user/repo', 'second')
    """
    if Path(spec).exists() or ":" not in spec:
        return spec, subfolder
    head, _, tail = spec.rpartition(":")
    if not head or not tail:
        return spec, subfolder
    return head, subfolder or tail


def resolve_folder(
    spec: str,
    *,
    what: str,
    subfolder: str | None = None,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
) -> Path:
    """Resolve a local folder or hub id to a local folder.

    Args:
        spec: Local path or hub id, optionally with ``:subfolder``.
        what: ``"adapter"`` or ``"base"``: used in error messages.
        subfolder: Subfolder inside the resolved folder (overrides a ``:name`` suffix).
        allow_patterns: File patterns to fetch from the hub (everything when None).
        revision: Hub revision.

    Returns:
        The local folder (with the subfolder applied).

    Raises:
        InputFileError: Not a folder, not a hub id, or not available (offline and not cached).

    Example:
        >>> resolve_folder("fixtures/llama/adapter", what="adapter")  # doctest: +SKIP
        PosixPath('fixtures/llama/adapter')
    """
    path_spec, sub = split_subfolder(spec, subfolder)
    if sub and (Path(sub).is_absolute() or ".." in Path(sub).parts):
        raise InputFileError(
            f"{path_spec}:{sub}",
            f"the {what} subfolder {sub!r} leads out of {path_spec} (a named adapter is a folder inside it)",
            f"pass the other folder itself, or a name listed in {path_spec}",
        )
    local = Path(path_spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputFileError(str(local), f"the {what} must be a folder, found a file", "pass its folder")
        folder = local
    elif _HUB_ID.match(path_spec) and not path_spec.startswith((".", "/")):
        folder = _from_hub(path_spec, what=what, sub=sub, allow_patterns=allow_patterns, revision=revision)
    else:
        raise InputFileError(path_spec, f"{what} folder not found", "check the path")
    if sub:
        folder = folder / sub
        if not folder.is_dir():
            raise InputFileError(
                str(folder), f"{what} subfolder {sub!r} not found", f"list {folder.parent} for the adapter names"
            )
    return folder


def _from_hub(
    repo_id: str, *, what: str, sub: str | None, allow_patterns: list[str] | None, revision: str | None
) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise InputFileError(repo_id, f"{what} folder not found", "check the path") from None
    patterns = allow_patterns
    if patterns is not None and sub:
        patterns = [f"{sub}/{p}" for p in patterns]
    try:
        if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
            # A commit never changes: its cached snapshot is used as is (huggingface_hub 1.33 asks the hub about
            # it even offline, and fails).
            try:
                return Path(
                    snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
                )
            except LocalEntryNotFoundError:
                pass
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise InputFileError(
            repo_id,
            f"{what} is neither a local folder nor in the Hugging Face cache, and the hub cannot be reached",
            f"check the path, or download it first while online (hf download {repo_id})",
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(repo_id, f"cannot fetch the {what} from the hub ({first})", "check the id") from None
