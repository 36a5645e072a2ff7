"""Datasets stored as files in a Hugging Face hub repository: a hub id, or a local directory laid out like it.

A hub id is fetched (only the files a task needs) into the Hugging Face hub cache; then both kinds go through the
same `datasets.load_dataset(<format>, data_files=...)`, so the small local fixtures of the tests exercise the code
a cluster run uses. Reading files by pattern, not by the repository's loading config, keeps one code path for both
and works offline from a cache filled by `hf download --repo-type dataset`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from klrl.errors import ConfigError

TRUE = ("1", "true", "yes", "on")


@dataclass
class DataSource:
    path: str = MISSING  # hub dataset id, or a local directory with the hub repository's layout
    revision: Optional[str] = None  # hub ids only: a branch, tag or commit


def is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).is_dir()


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_cache() -> Path:
    """The hub cache as huggingface_hub picks it, read from the environment now (its constants are import-time)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    return Path(os.environ.get("HF_HOME", os.path.join(xdg, "huggingface"))).expanduser() / "hub"


def in_hub_cache(repo: str, kind: str = "datasets") -> bool:
    """Whether some snapshot of `repo` is in the hub cache (not whether it holds every file a run needs)."""
    return any((hub_cache() / f"{kind}--{repo.replace('/', '--')}" / "snapshots").glob("*"))


def how_to_fetch(repo: str, what: str) -> str:
    return (
        f"pre-download it on a machine with network access (`hf download --repo-type dataset {repo}`, "
        f"or `huggingface-cli download --repo-type dataset {repo}` with older huggingface_hub) into the cache "
        f"this run sees (HF_HOME / HF_HUB_CACHE), or download it with --local-dir DIR and set {what}.path=DIR"
    )


def check_source(src, what: str) -> None:
    """Cheap: a local directory must exist; a hub id must be cached when the hub is switched off. Online, the
    files are fetched at run time."""
    path = str(src.path)
    if is_local(path):
        if not Path(path).expanduser().is_dir():
            raise ConfigError(f"{what}.path={path!r} is not a directory; give a hub dataset id or a local copy of one")
        return
    if offline() and not in_hub_cache(path):
        raise ConfigError(f"{what}.path={path!r} is not in the Hugging Face cache ({hub_cache()}) and the hub is "
                          f"off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); {how_to_fetch(path, what)}")


def local_root(src, patterns: list[str], what: str) -> Path:
    path = str(src.path)
    if is_local(path):
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(path, repo_type="dataset", revision=src.revision, allow_patterns=patterns,
                                 cache_dir=hub_cache(), local_files_only=offline())
    except Exception as e:  # offline without a cache, no network, unknown repo: one line with the remedy
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"{what}.path={path!r} could not be fetched ({type(e).__name__}: {first}); "
                          f"{how_to_fetch(path, what)}") from None
    return Path(root)


def load_rows(src, patterns: list[str], what: str) -> list[dict]:
    """Every row of the files matching `patterns` (relative to the repository root), in pattern then file order."""
    root = local_root(src, patterns, what)
    files = []
    for pattern in patterns:
        found = sorted(str(p) for p in root.glob(pattern))
        if not found:
            raise ConfigError(f"{what}.path={str(src.path)!r}: no file matches {pattern!r} under {root}")
        files += found
    from datasets import load_dataset

    fmt = "json" if files[0].endswith((".json", ".jsonl")) else "parquet"
    return load_dataset(fmt, data_files=files, split="train").to_list()


def fixed_subset(items: list, size: int, seed: int = 1234) -> list:
    """At most `size` items, the same ones for every run (order kept), so runs of a sweep are comparable."""
    if len(items) <= size:
        return list(items)
    import random

    keep = sorted(random.Random(seed).sample(range(len(items)), size))
    return [items[i] for i in keep]
