"""What model sources build once and keep under cache_dir: written atomically, by one process."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf


def config_hash(*parts: Any) -> str:
    """12 hex digits of sha256 over the JSON of `parts` (DictConfigs resolved)."""
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atomic_save_pretrained(model, tokenizer, dest: Path) -> None:
    """Write to a temporary sibling directory, then rename: a crash never leaves a half-written checkpoint."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # e.g. save_pretrained on a rank other than 0 writes no model
            raise RuntimeError(f"save_pretrained wrote no model to {tmp}; not caching an incomplete checkpoint")
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same build first; keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_once(path: Path, build: Callable[[], None]) -> None:
    """Run `build` (which creates path) unless path exists, once across processes: concurrent jobs (a sweep's
    runs) wait on a file lock while one builds, then load its result. In a multi-rank job rank 0 builds while the
    others wait at a barrier: transformers' save_pretrained writes weights on rank 0 only."""
    import torch.distributed as dist
    from filelock import FileLock

    ranks = dist.is_available() and dist.is_initialized()
    if not path.exists() and (not ranks or dist.get_rank() == 0):
        locks = path.parent.parent / ".locks"  # beside the cache's folders, not in them: they hold only results
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"{path.parent.name}__{path.name}.lock")):
            if not path.exists():  # another process may have built it while this one waited
                build()
    if ranks:
        dist.barrier()
