"""Compile once per machine, not once per process: torch.compile's caches on disk under
$XDG_CACHE_HOME/dscoder (default ~/.cache/dscoder).

Inductor's default cache lives in /tmp/torchinductor_$USER, which a reboot (or a fresh
container) empties, so every such start recompiled the decode step (10-15 s). The FX graph
cache and the AOTAutograd cache then let a later process skip Inductor and its Triton builds;
only Dynamo's trace of the step is redone. TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, when
the user set them, win.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
from collections.abc import MutableMapping
from pathlib import Path

CACHE_DIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def cache_root(env: MutableMapping[str, str] = os.environ) -> Path:
    """$XDG_CACHE_HOME/dscoder, or ~/.cache/dscoder (a relative XDG path is ignored, as the
    XDG spec says)."""
    base = env.get("XDG_CACHE_HOME", "")
    return Path(base if os.path.isabs(base) else Path.home() / ".cache") / "dscoder"


def configure_cache_dirs(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Point Inductor's and Triton's caches under cache_root() unless already set; both read
    these variables when they first compile, so this must run before the first compile."""
    root = cache_root(env)
    for var, sub in CACHE_DIRS.items():
        if not env.get(var):
            env[var] = str(root / sub)
    return {var: env[var] for var in CACHE_DIRS}


def enable_compile_caches() -> None:
    """Turn on the on-disk FX graph and AOTAutograd caches (defaults in recent torch; explicit
    here so that a torch with other defaults still reuses compiled kernels across processes)."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True


TRITON_KEY_FILE = "triton-key.json"


def prefetch_triton_key(root: Path | None = None) -> threading.Thread | None:
    """Have Triton's key of its own installation ready before the first kernel lookup in its
    cache, which waits for it. Triton computes that key in every process: a hash of its sources
    and of its 500 MB compiler library, 0.5 s of a thread in a warm `dscoder complete` on an
    H100 machine (py-spy), while the kernel builds' lookups waited on it. The key is kept in
    `root` (cache_root()) beside a fingerprint of the installation (every file's size and
    modification time, 5 ms): while the fingerprint holds, the kept key stands in for Triton's
    function, as Triton's own compile workers do it (triton.runtime.cache.triton_key replaced).
    Otherwise it is computed on a daemon thread (returned), which keeps it for the next process;
    hashing and reading release the GIL, so the reading threads keep their pace. Returns None
    where Triton is missing or has no such function, and where the kept key was used."""
    try:
        import triton
        from triton.runtime import cache
    except ImportError:
        return None
    compute = getattr(cache, "triton_key", None)
    if compute is None:
        return None
    path = (root or cache_root()) / TRITON_KEY_FILE
    fingerprint = installation_fingerprint(Path(triton.__file__).parent, getattr(triton, "__version__", ""))
    kept = _read_kept_key(path, fingerprint)
    if kept is not None:
        cache.triton_key = functools.lru_cache()(lambda: kept)  # as Triton's callers expect it
        return None

    def compute_and_keep() -> None:
        _keep_key(path, fingerprint, compute())

    thread = threading.Thread(target=compute_and_keep, name="dscoder-triton-key", daemon=True)
    thread.start()
    return thread


def installation_fingerprint(package: Path, version: str) -> str:
    """A digest of every file's path, size and modification time under `package` (bytecode
    caches left out: they come and go without the installation changing), and its version."""
    entries = [version, str(package.resolve())]
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in sorted(files):
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            entries.append(f"{os.path.relpath(os.path.join(directory, name), package)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()


def _read_kept_key(path: Path, fingerprint: str) -> str | None:
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, unreadable or damaged: computed again
        return None
    if not isinstance(kept, dict) or kept.get("fingerprint") != fingerprint:
        return None
    key = kept.get("key")
    return key if isinstance(key, str) and key else None


def _keep_key(path: Path, fingerprint: str, key: str) -> None:
    """Write the key whole or not at all (a temporary file renamed); a cache directory that
    cannot be written only means the next process computes the key again."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "key": key}), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
