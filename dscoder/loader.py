"""From a model name to a ready Engine: resolve, read the config, pick device and dtype, load."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dscoder.compile_cache import configure_cache_dirs, enable_compile_caches
from dscoder.config import ModelConfig
from dscoder.errors import OutOfMemory, UsageError
from dscoder.events import GenerationSettings
from dscoder.profile import StartupProfile, recording
from dscoder.warmup import Precompile, warm_up
from dscoder.weights import Progress, load_model

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; "
                         "use --device cpu (slow) or check the driver with nvidia-smi.")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"Unknown device {device!r}; use auto, cuda or cpu.") from e


def pick_dtype(dtype: str | None, cfg: ModelConfig) -> torch.dtype:
    name = dtype or cfg.torch_dtype
    if name not in DTYPES:
        raise UsageError(f"Unknown dtype {name!r}; use float32, bfloat16 or float16.")
    return DTYPES[name]


def generation_defaults(model_dir: Path) -> GenerationSettings:
    """Sampling defaults from generation_config.json (greedy when do_sample is false)."""
    path = model_dir / "generation_config.json"
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return GenerationSettings()
    base = GenerationSettings()
    if g.get("do_sample") is False:
        return GenerationSettings(temperature=0.0)
    return GenerationSettings(temperature=float(g.get("temperature", base.temperature)),
                              top_p=float(g.get("top_p", base.top_p)),
                              top_k=int(g.get("top_k", 0) or 0))


def load_engine(model: str | Path | None = None, *, device: str = "auto", dtype: str | None = None,
                gpu_memory: str | None = None, context_length: int | None = None,
                download: bool = False, progress: Progress | None = None,
                log: Callable[[str], None] | None = None, profile: StartupProfile | None = None):
    """Load a checkpoint (local dir or hub id) and return an Engine ready to generate: on a GPU
    the decode step is compiled and its first graph captured before this returns, so that the
    first reply decodes as fast as the next. `profile` (the engine's startup_profile) records
    where the time went."""
    profile = profile if profile is not None else StartupProfile()
    with recording(profile):
        return _load(model, device, dtype, gpu_memory, context_length, download, progress, log, profile)


def _load(model, device, dtype, gpu_memory, context_length, download, progress, log, profile):
    from dscoder.hub import DEFAULT_MODEL, resolve_model
    from dscoder.tokenizer import load_tokenizer

    with profile.phase("config"):
        model_dir = resolve_model(model or DEFAULT_MODEL, download=download)
        cfg = ModelConfig.from_file(model_dir / "config.json")
        dev = pick_device(device)
        dt = pick_dtype(dtype, cfg)
        ctx = min(context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if ctx < 2:
            raise UsageError(f"--context-length must be at least 2, not {context_length}.")
    # Not overlapped with loading the weights: parsing tokenizer.json holds the GIL for
    # whole calls, which stalled the reading threads as long as it ran.
    with profile.phase("tokenizer"):
        tokenizer = load_tokenizer(model_dir)
    configure_cache_dirs()  # before anything compiles (Triton kernels included)
    precompile = _start_precompile(cfg, dev, dt, gpu_memory, profile)
    try:
        engine = _load_model(model_dir, cfg, dev, dt, gpu_memory, ctx, context_length, tokenizer,
                             precompile, progress, log, profile)
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory("The model does not fit in GPU memory; set a budget with --gpu-memory "
                          "(for example --gpu-memory 12GiB) to keep experts in host memory.") from e
    if log:
        log(f"loaded {model_dir} on {dev} in {str(dt).removeprefix('torch.')}, "
            f"context {engine.context_length}")
    return engine


def _load_model(model_dir, cfg, dev, dt, gpu_memory, ctx, context_length, tokenizer, precompile,
                progress, log, profile):
    from dscoder.engine import Engine

    if gpu_memory:  # a budget: plan it, and offload the routed experts if they don't fit
        from dscoder.offload.setup import load_with_budget

        t = time.perf_counter()
        net, ctx, _ = load_with_budget(model_dir, cfg, dev, dt, gpu_memory, ctx,
                                       context_length is not None, progress=progress, log=log)
        # what is not reading weights: planning, moving experts to host memory, pinning them
        profile.add("pin experts", time.perf_counter() - t - profile.seconds.get("load weights", 0.0))
    else:
        net = load_model(model_dir, cfg, device=dev, dtype=dt, progress=progress)
    if os.environ.get("DSCODER_ROUTING_TRACE"):
        from dscoder.offload.setup import install_trace

        install_trace(net)
    net.set_context(ctx)
    use_graphs = _fast_decode(net, dev, precompile)
    engine = Engine(model=net, tokenizer=tokenizer, config=cfg, context_length=ctx,
                    defaults=generation_defaults(model_dir), model_dir=model_dir,
                    use_graphs=use_graphs, startup_profile=profile)
    if use_graphs:
        warm_up(engine, profile)
    return engine


def _compile_wanted(dev: torch.device) -> bool:
    env = os.environ
    return (dev.type == "cuda" and env.get("DSCODER_CUDA_GRAPHS", "1") != "0"
            and not env.get("DSCODER_ROUTING_TRACE") and env.get("DSCODER_COMPILE", "1") != "0")


def _start_precompile(cfg: ModelConfig, dev: torch.device, dt: torch.dtype, gpu_memory: str | None,
                      profile: StartupProfile) -> Precompile | None:
    """Compile the decode step while the weights load, when it will be compiled at all (a model
    resident on the GPU: no budget was given; under a budget the plan decides later)."""
    if gpu_memory or not _compile_wanted(dev):
        return None
    from dscoder.graphs import BUCKET

    enable_compile_caches()
    return Precompile(cfg, dev, dt, BUCKET, profile)


def _fast_decode(net, dev: torch.device, precompile: Precompile | None = None) -> bool:
    """Whether decode replays CUDA graphs, and, for a model resident on the GPU, whether the
    step is compiled (it fuses the step's small kernels). DSCODER_CUDA_GRAPHS=0 and
    DSCODER_COMPILE=0 turn each off; a routing trace needs the host at every layer, so it
    turns graphs off too."""
    env = os.environ
    if (dev.type != "cuda" or env.get("DSCODER_CUDA_GRAPHS", "1") == "0"
            or env.get("DSCODER_ROUTING_TRACE")):
        return False
    if net.offload is None and _compile_wanted(dev):
        if precompile is not None:
            precompile.install(net)
        else:
            enable_compile_caches()
            net.compile_decode()
    return True
