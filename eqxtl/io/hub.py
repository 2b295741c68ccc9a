"""Where a checkpoint comes from: registry alias, Hugging Face Hub repo, local dir or file.

``resolve`` turns any ``source`` into local files without surprises: a cached hub file is
used offline; an uncached one is fetched only when the hub answers within a second or two,
otherwise a ``SourceError`` says what to do (no 24-second retry loop).
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import urllib.parse
from pathlib import Path

from ..errors import SourceError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def weight_files() -> tuple[str, ...]:
    """The weight file names looked for in a folder or a hub repo, in this order (every
    layout's ``files``)."""
    from ..models.registry import weight_files

    return weight_files()


def config_files() -> tuple[str, ...]:
    """The config files read beside the weights (every layout's ``config_files``)."""
    from ..models.registry import config_files

    return config_files()


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Local files of one checkpoint: the weights and, when there is one, ``config.json``."""

    weights: Path
    configs: dict[str, Path]
    """``{file name: path}`` of the ``config_files()`` found beside the weights."""
    description: str


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") in {"1", "ON"}


def _hub_reachable(timeout: float = 2.0) -> bool:
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download(
    repo: str, filename: str, revision: str | None, cache_dir, optional: bool = False
) -> Path | None:
    """One file from the hub (cache first); None when the repo has no such file (or, for an
    ``optional`` file, when it is not cached and the hub cannot be asked)."""
    from huggingface_hub import errors, hf_hub_download

    kwargs = dict(repo_id=repo, filename=filename, revision=revision, cache_dir=cache_dir)
    try:
        return Path(hf_hub_download(**kwargs, local_files_only=True))
    except (errors.LocalEntryNotFoundError, FileNotFoundError):
        pass
    if _offline() or not _hub_reachable():
        return None if optional else _raise_offline(repo, filename, revision)
    try:
        return Path(hf_hub_download(**kwargs))
    except errors.EntryNotFoundError:
        return None
    except errors.RepositoryNotFoundError as e:
        raise SourceError(f"No Hugging Face repo {repo!r} (or it is private): {e}") from None
    except errors.RevisionNotFoundError:
        raise SourceError(f"Repo {repo!r} has no revision {revision!r}.") from None


def _cached(repo: str, filename: str, revision: str | None, cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir, revision=revision)
    return isinstance(found, str)


def _raise_offline(repo: str, filename: str, revision: str | None):
    why = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached"
    rev = f" (revision {revision})" if revision else ""
    raise SourceError(
        f"{repo}/{filename}{rev} is not in the local Hugging Face cache and {why}.\n"
        "Either connect once to download it, or point at local weights: a directory with "
        "config.json + model.safetensors, or a .safetensors / .pth file."
    )


def resolve_hub(
    repo: str,
    *,
    revision: str | None = None,
    filenames: tuple[str, ...] | None = None,
    cache_dir=None,
) -> Resolved:
    """Fetch (or find in cache) the first of ``filenames`` that ``repo@revision`` holds, and
    the config files beside it. Files already in the local cache are preferred, so an
    offline machine finds whichever of them was downloaded. ``filenames``: default
    ``weight_files()``."""
    filenames = weight_files() if filenames is None else tuple(filenames)
    cached = [f for f in filenames if _cached(repo, f, revision, cache_dir)]
    for i, filename in enumerate(cached + [f for f in filenames if f not in cached]):
        weights = _download(repo, filename, revision, cache_dir, optional=i < len(filenames) - 1)
        if weights is not None:
            configs = {}
            for name in config_files():
                path = _download(repo, name, revision, cache_dir, optional=True)
                if path is not None:
                    configs[name] = path
            return Resolved(weights, configs, f"{repo}@{revision or 'main'}/{filename}")
    raise SourceError(
        f"Repo {repo!r}{' at ' + revision if revision else ''} holds none of {filenames}. "
        "Pass revision= (e.g. a 'refs/pr/N' branch that has safetensors) or a local file."
    )


def resolve_local(path: str | os.PathLike) -> Resolved:
    """A local directory (config.json + weights) or a single weights file."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in weight_files():
            if (path / name).is_file():
                return Resolved(path / name, _configs_in(path), str(path))
        found = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(found) == 1:
            return resolve_local(path / found[0])
        raise SourceError(
            f"{path} has no model.safetensors"
            + (f"; it has several weight files {found}: pass one of them." if found else ".")
        )
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise SourceError(
                f"{path} is not a checkpoint file (expected one of {WEIGHT_SUFFIXES})."
            )
        return Resolved(path, _configs_in(path.parent), str(path))
    raise SourceError(f"{path} does not exist.")


def _configs_in(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in config_files() if (folder / name).is_file()}


def looks_local(source: str | os.PathLike) -> bool:
    s = str(source)
    return (
        isinstance(source, os.PathLike)
        or Path(s).expanduser().exists()
        or s.startswith((".", "/", "~"))
        or s.endswith(WEIGHT_SUFFIXES)
        or not _REPO_ID.match(s)
    )
