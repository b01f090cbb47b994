"""From a model name to a ready Engine: resolve, read the config, pick device and dtype, load."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from dscoder import cuda_capture, page_lock
from dscoder.compile_cache import configure_cache_dirs, prefetch_triton_key
from dscoder.config import ModelConfig
from dscoder.errors import BadCheckpoint, OutOfMemory, UsageError
from dscoder.events import GenerationSettings
from dscoder.kernel_prebuild import KernelPrebuild, resident_steps
from dscoder.profile import StartupProfile, recording
from dscoder.shapes import BUCKET, cache_capacity, decode_rows
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
    """Sampling defaults from generation_config.json (greedy when do_sample is false); no file
    means our defaults, a bad one is refused with one sentence per problem."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return GenerationSettings()
    try:
        g = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"Cannot read {path}: {e}.") from e
    if not isinstance(g, dict):
        raise BadCheckpoint(f"{path} holds a JSON {type(g).__name__}, not an object of settings.")
    base, problems = GenerationSettings(), []

    def number(key: str, default: float, ok, rule: str) -> float:
        v = g.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            problems.append(f"{key} must be {rule}, not {v!r}.")
            return default
        return v

    do_sample = g.get("do_sample", True)
    if not isinstance(do_sample, bool):
        problems.append(f"do_sample must be true or false, not {do_sample!r}.")
    temperature = number("temperature", base.temperature, lambda v: v >= 0, "0 or more")
    top_p = number("top_p", base.top_p, lambda v: 0 < v <= 1, "above 0 and at most 1")
    top_k = number("top_k", 0, lambda v: v >= 0 and v == int(v), "a whole number, 0 or more")
    if problems:
        raise BadCheckpoint(f"{path} is not valid: {' '.join(problems)}")
    if do_sample is False:
        return GenerationSettings(temperature=0.0)
    return GenerationSettings(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))


def load_engine(model: str | Path | None = None, *, device: str = "auto", dtype: str | None = None,
                gpu_memory: str | None = None, context_length: int | None = None,
                download: bool = False, progress: Progress | None = None,
                log: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None,
                notice: Callable[[str], None] | None = None, cuda_graphs: bool = True,
                compile: bool = True, offload_policy: str = "lru", prefetch_depth: int = 1,
                routing_trace: str | Path | None = None, engine: str = "auto",
                trust_remote_code: bool = False, capture_ahead: bool = True,
                profile: StartupProfile | None = None, expert_dtype: str = "bf16"):
    """Load a checkpoint (local dir or hub id) and return an engine ready to generate: the native
    one for DeepSeek-V2 checkpoints, transformers' for other causal LMs (``engine`` overrides).
    On a GPU the native engine captures its first decode graph before this returns; its step
    compiles in the background after the first reply (dscoder.warmup, Engine.use_compiled_step).

    log: details for --verbose; warn: what the user must hear (a failed page-lock); notice: facts
    worth one line (the context window a budget sets). The engine switches (settings.py reads
    them from DSCODER_* and the config file): cuda_graphs and compile (decode speed-ups on CUDA),
    offload_policy and prefetch_depth (the expert cache under a budget), routing_trace (a file
    to record which experts each layer picks), capture_ahead (decode graphs of the next length
    bucket captured on a background thread before they are needed). profile: where the time
    goes (the native engine's startup_profile; --verbose prints it). expert_dtype "int8": the
    routed experts are quantized to one byte a weight while they load (dscoder.model.quant),
    resident or offloaded; "bf16" keeps the model's dtype."""
    from dscoder.engines import choose_engine, load_tokenizer_for
    from dscoder.hub import DEFAULT_MODEL, resolve_model
    from dscoder.settings import check_expert_dtype

    try:
        check_expert_dtype(expert_dtype)
        profile = profile if profile is not None else StartupProfile()
        with profile.phase("config"):
            model_dir = resolve_model(model or DEFAULT_MODEL, download=download)
        if choose_engine(model_dir, engine) == "transformers":
            from dscoder.hf_engine import load_hf_engine

            if expert_dtype != "bf16":
                raise UsageError(f"--expert-dtype {expert_dtype} needs the native engine (a "
                                 "DeepSeek-V2 checkpoint); the transformers engine loads the "
                                 "model's own dtype.")
            return load_hf_engine(model_dir, load_tokenizer_for(model_dir), device=pick_device(device),
                                  dtype=dtype, gpu_memory=gpu_memory, context_length=context_length,
                                  trust_remote_code=trust_remote_code,
                                  defaults=generation_defaults(model_dir), log=log)
        return _load_native(model_dir, device=device, dtype=dtype, gpu_memory=gpu_memory,
                            context_length=context_length, progress=progress, log=log, warn=warn,
                            notice=notice, cuda_graphs=cuda_graphs, compile=compile,
                            offload_policy=offload_policy, prefetch_depth=prefetch_depth,
                            routing_trace=routing_trace, capture_ahead=capture_ahead,
                            profile=profile, expert_dtype=expert_dtype)
    except BaseException:
        page_lock.unlock_deferred()  # a failed load keeps nothing locked for its reply
        raise
    finally:  # what the CLI page-locked early and the load did not take (dscoder.page_lock)
        page_lock.release_early()
        page_lock.unlock_deferred_later()  # and what it took, unless a first reply comes sooner


def _load_native(model_dir: Path, *, device: str, dtype: str | None, gpu_memory: str | None,
                 context_length: int | None, progress: Progress | None,
                 log: Callable[[str], None] | None, warn: Callable[[str], None] | None,
                 notice: Callable[[str], None] | None, cuda_graphs: bool, compile: bool,
                 offload_policy: str, prefetch_depth: int, routing_trace: str | Path | None,
                 capture_ahead: bool, profile: StartupProfile, expert_dtype: str):
    with recording(profile):
        return _native(model_dir, device, dtype, gpu_memory, context_length, progress, log, warn,
                       notice, cuda_graphs and not routing_trace, compile, offload_policy,
                       prefetch_depth, routing_trace, capture_ahead, profile, expert_dtype)


def _native(model_dir, device, dtype, gpu_memory, context_length, progress, log, warn, notice,
            graphs, compile, offload_policy, prefetch_depth, routing_trace, capture_ahead, profile,
            expert_dtype):
    from dscoder import tokenizer_helper
    from dscoder.engine import Engine
    from dscoder.tokenizer import load_tokenizer

    with profile.phase("config"):
        cfg = ModelConfig.from_file(model_dir / "config.json")
        defaults = generation_defaults(model_dir)  # a bad file is reported before the long load
        dev = pick_device(device)
        dt = pick_dtype(dtype, cfg)
        ctx = min(context_length or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if ctx < 2:
            raise UsageError(f"--context-length must be at least 2, not {context_length}.")
    # Not overlapped with loading the weights: parsing tokenizer.json holds the GIL for
    # whole calls, which stalled the reading threads as long as it ran. The CLI has a helper
    # process parse it while torch imports (dscoder.tokenizer_helper).
    with profile.phase("tokenizer"):
        tokenizer = tokenizer_helper.take(model_dir) or load_tokenizer(model_dir)
    # a model resident on the GPU decodes from CUDA graphs, and compiles its step in the
    # background (dscoder.warmup); a routing trace needs the host at every layer: no graphs
    use_graphs = dev.type == "cuda" and graphs
    configure_cache_dirs()  # before anything compiles (Triton kernels included)
    if dev.type == "cuda":
        prefetch_triton_key()  # ready by the first graph capture, which runs Triton kernels
    try:
        if gpu_memory:  # a budget: plan it, and offload the routed experts if they don't fit
            from dscoder.offload.setup import load_with_budget

            t = time.perf_counter()
            net, ctx, budget_plan = load_with_budget(
                model_dir, cfg, dev, dt, gpu_memory, ctx, context_length is not None,
                progress=progress, log=log, warn=warn, policy=offload_policy,
                prefetch_depth=prefetch_depth, expert_dtype=expert_dtype)
            # what is not allocating or reading weights: planning, and the experts' host copy
            # (moved, pinned) or their views into the locked shards (dscoder.offload.mapped)
            store = net.offload.store if net.offload is not None else None
            phase = "map experts" if store is not None and store.owner is not None else "pin experts"
            loading = sum(profile.seconds.get(name, 0.0) for name in ("allocate", "load weights"))
            profile.add(phase, time.perf_counter() - t - loading)
            if notice and budget_plan.window_notice():
                notice(budget_plan.window_notice())
        else:
            budget_plan = None
            net = _load_resident(model_dir, cfg, dev, dt, ctx, progress, expert_dtype, use_graphs,
                                 profile)
        if routing_trace:
            from dscoder.offload.setup import install_trace

            install_trace(net, routing_trace)
        if net.rope is None:  # a resident load sets it before its reads
            net.set_context(ctx)
        engine = Engine(model=net, tokenizer=tokenizer, config=cfg, context_length=ctx,
                        defaults=defaults, model_dir=model_dir, use_graphs=use_graphs,
                        budget_plan=budget_plan, startup_profile=profile,
                        capture_ahead=capture_ahead)
        if use_graphs:
            warm_up(engine, profile)
            if compile and net.offload is None:  # after the first reply (Engine.start_compile)
                engine.compile_step = partial(Precompile, net, BUCKET, profile)
    except BaseException as e:
        if gpu_memory:
            from dscoder.offload.setup import lift_budget

            # the budget capped the whole process: a failed load must not leave the cap on for
            # the next engine (a server loads another model, the GPU tests go on)
            lift_budget(dev)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise OutOfMemory("The model does not fit in GPU memory; set a budget with --gpu-memory "
                              "(for example --gpu-memory 12GiB) to keep experts in host memory.") from e
        raise
    if log:
        log(f"loaded {model_dir} on {dev} in {str(dt).removeprefix('torch.')}, context {ctx}")
    return engine


def _load_resident(model_dir: Path, cfg: ModelConfig, dev: torch.device, dt: torch.dtype, ctx: int,
                   progress: Progress | None, expert_dtype: str, use_graphs: bool,
                   profile: StartupProfile):
    """The whole model on `dev`. With graphs, the decode step's Triton kernels build on other
    threads while the weights are read (dscoder.kernel_prebuild), and this returns once they
    are built; no graph capture runs meanwhile in the process (the prebuild's dry run uses the
    GPU from another thread, see dscoder.cuda_capture)."""
    prebuild: KernelPrebuild | None = None

    def allocated(net) -> None:
        nonlocal prebuild
        net.set_context(ctx)
        if use_graphs:  # the first graph's rows, as Session.prepare_decode(0) will have them
            rows = decode_rows(0, cache_capacity(1, 0, ctx), net.decode_bounded_by_position())
            prebuild = KernelPrebuild(partial(resident_steps, net, rows), dev, profile)

    with cuda_capture.CAPTURE_LOCK:
        try:
            load = partial(load_model, model_dir, cfg, device=dev, dtype=dt, progress=progress,
                           expert_dtype=expert_dtype, allocated=allocated)
            try:
                net = load()
            except torch.cuda.OutOfMemoryError:
                if prebuild is not None or not page_lock.early_staged()[0]:
                    raise
                net = None  # (out of this block, the failed load's tensors are freed)
            if net is None:
                # The shards staged on the GPU hold the room the model needs (another process
                # took memory since they were staged): load from the page cache instead.
                page_lock.release_early(wait=True)
                net = load()
        finally:  # also after a failed read: the builds use the GPU until they end
            if prebuild is not None:
                with profile.phase("kernel builds"):
                    prebuild.wait()
    staged, seconds = page_lock.early_staged()
    if staged:  # copied to the GPU while torch imported (dscoder.page_lock): not in the load's time
        profile.add("staging (beside import)", seconds)
        profile.count("bytes staged", staged)
    return net


def release_model(net, device: torch.device, *, uncap: bool = False) -> None:
    """Free a loaded model's memory even while something still refers to the module: the
    parameters move to the meta device, the expert cache and the pinned host store are emptied,
    compiled code is dropped, and CUDA gets its cached blocks back. uncap: lift the allocator
    cap that a --gpu-memory budget set, so that a later engine can have its own."""
    import gc

    page_lock.unlock_deferred()  # the shards it was read from, if no reply has unlocked them
    if net.offload is not None:
        from dscoder.offload.setup import release_offload

        release_offload(net)
    compiled = net._compiled_layer is not None
    net._compiled_layer = None
    net.rope = None
    net.to(torch.device("meta"))
    if compiled:
        from torch import _dynamo

        _dynamo.reset()  # its caches hold the compiled step's guards and constants
    gc.collect()
    if device.type == "cuda":
        cuda_capture.synchronize(device)  # not while another engine captures a graph
        # cuBLAS keeps a workspace per handle and stream (32 MiB each on Hopper) in the caching
        # allocator; they belong to the engine's streams, so they go too
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()
        if uncap:
            from dscoder.offload.setup import lift_budget

            lift_budget(device)
