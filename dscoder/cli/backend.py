"""Where the CLI gets its tokenizer and engine: the one seam that tests replace.

`BACKEND` is looked up at call time, so tests swap in `tests/fakes.FakeBackend` (in process:
`monkeypatch.setattr(backend, "BACKEND", FakeBackend())`; in a subprocess or a pty: run
`python tests/fakes.py ARGS...`, which installs the fake and calls `main`). Nothing here imports
torch at import time: the tokenizer (for --show-prompt) needs only the `tokenizers` library, and
the engine is imported inside `load_engine`, the only place that generates.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from dscoder.errors import DscoderError, UsageError
from dscoder.settings import Settings

Warn = Callable[[str], None]
Progress = Callable[[int, int], None]  # (bytes loaded, bytes in all)


class Backend(Protocol):
    def model_name(self, settings: Settings) -> str: ...
    def load_tokenizer(self, settings: Settings) -> Any: ...
    def context_length(self, settings: Settings) -> int | None: ...
    def load_engine(self, settings: Settings, warn: Warn, info: Warn | None = None,
                    progress: Progress | None = None) -> Any: ...
    def pull(self, name: str) -> Path: ...


class RealBackend:
    def model_name(self, settings: Settings) -> str:
        from dscoder import hub

        return settings.model or hub.DEFAULT_MODEL

    def _model_dir(self, settings: Settings) -> Path:
        from dscoder import hub

        return Path(hub.resolve_model(self.model_name(settings)))

    def _known_model_missing(self, settings: Settings) -> bool:
        """A DeepSeek-Coder-V2 hub id that is not in the local cache: its tokenizer and context
        window are known without it (for --show-prompt and for a remote engine)."""
        from dscoder import hub

        name = self.model_name(settings)
        return hub.is_coder_v2(name) and not Path(name).exists() and hub.cached_model(name) is None

    def load_tokenizer(self, settings: Settings) -> Any:
        from dscoder.engines import choose_engine, load_tokenizer_for

        if self._known_model_missing(settings):
            from dscoder.tokenizer import load_bundled_tokenizer

            return load_bundled_tokenizer()
        model_dir = self._model_dir(settings)
        choose_engine(model_dir, settings.engine)  # --engine native on another model: say so now
        return load_tokenizer_for(model_dir)

    def context_length(self, settings: Settings) -> int | None:
        """The window --show-prompt trims to without loading weights: the flag, else the config's."""
        if settings.context_length:
            return settings.context_length
        if self._known_model_missing(settings):
            from dscoder.hub import CODER_V2_CONTEXT

            return CODER_V2_CONTEXT
        try:
            config = json.loads((self._model_dir(settings) / "config.json").read_text(encoding="utf-8"))
            return int(config["max_position_embeddings"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def load_engine(self, settings: Settings, warn: Warn, info: Warn | None = None,
                    progress: Progress | None = None) -> Any:
        from dscoder import signals
        from dscoder.engines import choose_engine

        model_dir = self._model_dir(settings)  # a missing model is the first thing to hear about
        engine = choose_engine(model_dir, settings.engine)  # config.json read once for both
        lock_shards_early(model_dir, settings, engine)
        parse_tokenizer_early(model_dir, engine)
        from dscoder.profile import StartupProfile, process_age

        profile = StartupProfile()
        age = process_age()
        if age is not None:  # the interpreter's start, the CLI's imports, the settings, the input
            profile.add("before import", age)
        with profile.phase("import"):
            # The only import of torch on the way to generating. torch's start-up swallows a
            # KeyboardInterrupt (during its numpy import) and a second import then fails half-way,
            # so Ctrl-C/SIGTERM wait until the import is done, and are delivered then.
            with signals.deferred():
                from dscoder.torch_import import import_torch

                import_torch()  # with its Python meta kernels deferred: 0.3 s less
                from dscoder.engine import load_engine
            signals.check()
            check_device(settings.device, warn)
        threads = set_cpu_threads(settings)
        if threads and settings.verbose and info:
            info(f"CPU threads: {threads}")

        return load_engine(model_dir, device=settings.device, profile=profile,
                           gpu_memory=settings.gpu_memory, expert_dtype=settings.expert_dtype,
                           dtype=None if settings.dtype in (None, "auto") else settings.dtype,
                           context_length=settings.context_length, progress=progress,
                           log=info if settings.verbose else None, warn=warn, notice=info,
                           cuda_graphs=settings.cuda_graphs, compile=settings.compile,
                           capture_ahead=settings.capture_ahead,
                           offload_policy=settings.offload_policy,
                           prefetch_depth=settings.prefetch_depth,
                           routing_trace=settings.routing_trace or None, engine=settings.engine,
                           trust_remote_code=settings.trust_remote_code)

    def pull(self, name: str, code: bool = False) -> Path:
        from dscoder import hub

        return Path(hub.pull(name, code=code))

    def download_size(self, name: str) -> int | None:
        from dscoder import hub

        return hub.download_size(name)


def lock_shards_early(model_dir: Path, settings: Settings, engine: str) -> None:
    """Start page-locking the checkpoint's shards while torch imports (dscoder.page_lock): the
    native engine copies a model in the checkpoint's dtype to the GPU from them by DMA, and
    under --gpu-memory serves the offloaded experts from them (dscoder.offload.mapped). On an
    H100 machine that took 0.9 s for Lite's 31 GB, which the import (1.1-1.5 s) now hides,
    along with creating the CUDA context. Without a budget they are copied to the GPU as well
    (page_lock's staging), where it has room for the model twice: by a helper process
    (dscoder.stage_helper), and what it does not stage, by page_lock's thread."""
    from dscoder import page_lock, stage_helper
    from dscoder.engines import shard_files

    ordinal = cuda_ordinal(settings.device)
    if (ordinal is None or settings.dtype not in (None, "auto") or settings.expert_dtype != "bf16"
            or not page_lock.ENABLED or engine != "native"):
        return
    shards = shard_files(model_dir)
    if shards:  # a whole model on the GPU: its shards are staged there too, where it has room
        stage = not settings.gpu_memory
        helper = stage_helper.start(shards, ordinal) if stage and stage_helper.ENABLED else None
        page_lock.start_early(shards, ordinal, stage=stage, helper=helper)


def parse_tokenizer_early(model_dir: Path, engine: str) -> None:
    """Have a helper process parse the native engine's tokenizer while torch imports
    (dscoder.tokenizer_helper): 0.2-0.3 s that held the GIL on the way to the first token."""
    from dscoder import tokenizer_helper

    if engine == "native":
        tokenizer_helper.start(model_dir)


def cuda_ordinal(device: str) -> int | None:
    """The GPU a --device value loads onto (auto: the first, if there is one), else None."""
    if device in ("auto", "cuda"):
        return 0
    index = device.removeprefix("cuda:")
    return int(index) if device.startswith("cuda:") and index.isdigit() else None


def check_device(device: str, warn: Warn) -> None:
    """Say early and plainly what the GPU situation means for the user."""
    import torch

    if torch.cuda.is_available():
        return
    if device.startswith("cuda"):
        raise UsageError(f"--device {device} needs a CUDA GPU, but PyTorch sees none; check the "
                         "driver with nvidia-smi, or use --device cpu (slow).")
    if device == "auto":
        warn("No CUDA GPU found, so the model runs on the CPU: expect a long load and a few "
             "tokens per second at best (use --device cpu to silence this).")


def set_cpu_threads(settings: Settings) -> int | None:
    """torch's CPU thread count: --threads if given, else default_threads() when the model runs
    on the CPU (a GPU run leaves torch's default alone). The count set, or None."""
    import torch

    from dscoder.settings import default_threads

    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available())
    threads = settings.threads or (default_threads() if on_cpu else None)
    if threads:
        torch.set_num_threads(threads)
    return threads


BACKEND: Backend = RealBackend()


def get() -> Backend:
    return BACKEND


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    value = fn()
    return value, time.monotonic() - start


def explain_oom(error: BaseException) -> DscoderError | None:
    """A CUDA out-of-memory error, from torch or from the engine, as one sentence."""
    from dscoder.errors import OutOfMemory, is_out_of_memory

    if is_out_of_memory(error):
        return OutOfMemory("The GPU ran out of memory; give dscoder a smaller budget with "
                           "--gpu-memory (for example --gpu-memory 10GiB), a shorter "
                           "--context-length, or use --device cpu.")
    return None
