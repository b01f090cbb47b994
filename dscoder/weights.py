"""Loading a DeepSeek-V2 checkpoint (original hub layout, sharded safetensors) into the model.

Tensors are read by several threads straight from the shard files into their final tensors
(dscoder.shard_reader); the routed experts of a layer are written into one stacked tensor per
layer, so no second full copy of the model ever exists in RAM.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from dscoder.config import ModelConfig
from dscoder.engines import INDEX, SINGLE
from dscoder.errors import BadCheckpoint
from dscoder.model.layers import FusedLinear
from dscoder.model.quant import SCALE_DTYPE, quantize_into, quantizes
from dscoder.model.transformer import Transformer
from dscoder.profile import StartupProfile, current
from dscoder.shard_reader import ShardEntry, read_header, read_parallel, why

EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def shard_index(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or from a single model.safetensors."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            text = index.read_text(encoding="utf-8")
        except (OSError, ValueError) as e:
            raise BadCheckpoint(f"Cannot read {index}: {why(e)}.") from e
        try:
            weight_map = json.loads(text)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not an object of file names")
            return dict(weight_map)
        except (ValueError, KeyError, TypeError) as e:
            raise BadCheckpoint(f"{index} is not a valid safetensors index ({e}).") from e
    single = model_dir / SINGLE
    if single.is_file():
        return {k: SINGLE for k in read_header(single)}
    raise BadCheckpoint(f"{model_dir} holds no {INDEX} or {SINGLE}; is it a complete checkpoint?")


@dataclass
class _Target:
    """Where one checkpoint tensor goes: a parameter, rows of a fused projection, or a slice of
    a stacked expert tensor."""

    param: str
    expert: int | None = None
    part: str | None = None  # gate_proj / up_proj / down_proj
    rows: tuple[int, int] | None = None  # of a FusedLinear's weight


def _target(key: str, fused: dict[str, tuple[str, int, int]]) -> _Target:
    if key in fused:
        param, r0, r1 = fused[key]
        return _Target(param=param, rows=(r0, r1))
    m = EXPERT_KEY.match(key)
    if m is None:
        return _Target(param=key)
    prefix, expert, part = m.group(1), int(m.group(2)), m.group(3)
    stacked = "w2" if part == "down_proj" else "w13"
    return _Target(param=f"{prefix}.{stacked}", expert=expert, part=part)


def fused_parts(model: Transformer) -> dict[str, tuple[str, int, int]]:
    """Checkpoint key -> (fused parameter, its first row, past its last row), for every part of
    every FusedLinear: `model.layers.1.mlp.shared_experts.gate_proj.weight` ->
    (`model.layers.1.mlp.shared_experts.gate_up_proj.weight`, 0, I)."""
    parts = {}
    for name, module in model.named_modules():
        if isinstance(module, FusedLinear):
            parent = name.rpartition(".")[0]
            row = 0
            for part, rows in module.parts.items():
                parts[f"{parent}.{part}.weight"] = (f"{name}.weight", row, row + rows)
                row += rows
    return parts


def expected_keys(model: Transformer) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The checkpoint tensors a model needs, with their shapes, in original key names."""
    cfg = model.cfg
    i = cfg.moe_intermediate_size
    fused = {param: [] for param, _, _ in fused_parts(model).values()}
    for key, (param, r0, r1) in fused_parts(model).items():
        fused[param].append((key, r1 - r0))
    for name, p in model.named_parameters():
        if name in fused:
            for key, rows in fused[name]:
                yield key, (rows, p.shape[1])
        elif name.endswith(".experts.w13"):
            prefix = name[: -len(".w13")]
            for e in range(cfg.n_routed_experts):
                yield f"{prefix}.{e}.gate_proj.weight", (i, cfg.hidden_size)
                yield f"{prefix}.{e}.up_proj.weight", (i, cfg.hidden_size)
        elif name.endswith(".experts.w2"):
            prefix = name[: -len(".w2")]
            for e in range(cfg.n_routed_experts):
                yield f"{prefix}.{e}.down_proj.weight", (cfg.hidden_size, i)
        else:
            yield name, tuple(p.shape)


LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# tensors some exporters add that carry nothing the model computes with (precomputed rope tables)
HARMLESS_EXTRA = re.compile(r"\.rotary_emb\.inv_freq$")


def check_tensors_match_config(model_dir: Path, cfg: ModelConfig, index: dict[str, str],
                               needed: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose tensors and config.json describe different models: a tensor the
    config does not use would be silently ignored, and one it needs would be missing."""
    def some(keys: list[str]) -> str:
        return keys[0] + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")

    layers = {int(m.group(1)) for k in index if (m := LAYER_KEY.match(k))}
    n = cfg.num_hidden_layers
    if layers and max(layers) + 1 != n:
        raise BadCheckpoint(f"The checkpoint in {model_dir} holds tensors for {max(layers) + 1} layers "
                            f"but its config.json says num_hidden_layers is {n}; the config does not "
                            "belong to these weights.")
    missing = [k for k in needed if k not in index]
    if missing:
        raise BadCheckpoint(f"The checkpoint in {model_dir} lacks the tensor {some(missing)}.")
    extra = sorted(k for k in index if k not in needed and not HARMLESS_EXTRA.search(k))
    if extra:
        raise BadCheckpoint(f"The checkpoint in {model_dir} holds the tensor {some(extra)} that its "
                            "config.json does not use; the config does not match the weights.")


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    # the router decides which experts run; the reference keeps it in fp32
    return torch.float32 if name.endswith(".mlp.gate.weight") else dtype


def load_model(model_dir: Path, cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype,
               expert_device: torch.device | None = None, pin_experts: bool = False,
               progress: Progress | None = None, profile: StartupProfile | None = None,
               expert_dtype: str | None = None,
               allocated: Callable[[Transformer], None] | None = None) -> Transformer:
    """Build the model on the meta device, then fill every parameter from the checkpoint.
    expert_dtype "int8": the routed experts are quantized as they load (dscoder.model.quant).
    allocated: called with the model once every parameter has its final memory, before any is
    read (dscoder.kernel_prebuild starts there); not called when experts are quantized (theirs
    comes after the reads)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    index = shard_index(model_dir)
    needed = dict(expected_keys(model))
    check_tensors_match_config(model_dir, cfg, index, needed)
    headers = {s: read_header(model_dir / s) for s in sorted(set(index[k] for k in needed))}
    meta = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}

    def destination(name: str) -> torch.Tensor:
        if name not in tensors:
            is_expert = ".experts.w" in name
            dev = (expert_device or device) if is_expert else device
            tensors[name] = torch.empty(meta[name].shape, dtype=param_dtype(name, dtype), device=dev,
                                        pin_memory=pin_experts and is_expert and dev.type == "cpu")
        return tensors[name]

    def entry(key: str) -> ShardEntry:
        return _entry(headers[index[key]], model_dir / index[key], key, needed[key])

    fused = fused_parts(model)
    stacks = _stacks(needed)
    expert_keys = {key for keys in stacks.values() for key in keys}
    quantized = stacks if quantizes(expert_dtype) else {}
    later = expert_keys if quantized else set()
    # experts on the meta device are not read: the caller serves them from elsewhere
    # (dscoder.offload.mapped: straight from the page-locked shards)
    elsewhere = expert_keys if expert_device is not None and expert_device.type == "meta" else set()
    profile = profile or current()
    t = time.perf_counter()  # the parameters take their memory from here on
    jobs = [(entry(key), _slot(destination, _target(key, fused), cfg)) for key in needed
            if key not in later and key not in elsewhere]
    for key in elsewhere:  # their parameters still exist, on the meta device
        destination(_target(key, fused).param)
    jobs.sort(key=lambda job: (str(job[0].path), job[0].begin))  # each shard read front to back
    total = sum(entry(key).nbytes for key in needed if key not in elsewhere)
    # the parameters take their memory now, the reads fill it in place
    result = model.load_state_dict(tensors, assign=True, strict=not quantized)
    if profile is not None:
        profile.add("allocate", time.perf_counter() - t)
    if allocated is not None and not quantized:
        allocated(model)
    t = time.perf_counter()
    read_parallel(jobs, _offset(progress, 0, total))
    done = sum(e.nbytes for e, _ in jobs)
    scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, keys in quantized.items():  # one stack at a time: never two full copies in RAM
        stack = torch.empty(meta[name].shape, dtype=dtype, device=device)
        part = [(entry(key), _slot(lambda _, s=stack: s, _target(key, {}), cfg)) for key in keys]
        read_parallel(part, _offset(progress, done, total))
        done += sum(e.nbytes for e, _ in part)
        scales[name] = _quantized(stack, expert_device or device)
        del stack
    if profile is not None:
        profile.add("load weights", time.perf_counter() - t)
        profile.count("bytes loaded", total)
    if quantized:
        if result.unexpected_keys or set(result.missing_keys) != set(quantized):
            raise AssertionError(f"quantized load left {result}")  # a bug, not a bad checkpoint
        for name in {n.rsplit(".", 1)[0] for n in quantized}:
            (q13, s13), (q2, s2) = scales[f"{name}.w13"], scales[f"{name}.w2"]
            model.get_submodule(name).set_quantized(q13, s13, q2, s2)
    return model


def _stacks(needed: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Stacked routed-expert parameter -> the checkpoint keys it is read from."""
    stacks: dict[str, list[str]] = {}
    for key in needed:
        t = _target(key, {})  # routed experts are never parts of a FusedLinear
        if t.expert is not None:
            stacks.setdefault(t.param, []).append(key)
    return stacks


def _quantized(stack: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 stack, fp32 scales) on `device`, computed where `stack` is (the GPU, when loading
    to one, quantizes a layer in milliseconds)."""
    q = torch.empty(stack.shape, dtype=torch.int8, device=stack.device)
    scale = torch.empty(stack.shape[:-1], dtype=SCALE_DTYPE, device=stack.device)
    quantize_into(stack, q, scale)
    return q.to(device), scale.to(device)


def _offset(progress: Progress | None, start: int, total: int) -> Progress | None:
    """A read's progress as part of the whole load: `start` bytes were read before it."""
    if progress is None:
        return None
    return lambda done, _: progress(start + done, total)


def _entry(header: dict[str, ShardEntry], path: Path, key: str, shape: tuple[int, ...]) -> ShardEntry:
    if key not in header:
        raise BadCheckpoint(f"The shard {path} does not contain {key} although the index says so.")
    entry = header[key]
    if entry.shape != shape:
        raise BadCheckpoint(f"The tensor {key} in {path} has shape {list(entry.shape)}, "
                            f"expected {list(shape)}.")
    return entry


def _slot(destination: Callable[[str], torch.Tensor], t: _Target, cfg: ModelConfig) -> torch.Tensor:
    """The (view of the) final tensor that a checkpoint tensor bound for `t` is read into."""
    dst = destination(t.param)
    if t.rows is not None:
        return dst[t.rows[0]:t.rows[1]]
    if t.expert is None:
        return dst
    if t.part == "down_proj":
        return dst[t.expert]
    i = cfg.moe_intermediate_size
    return dst[t.expert, 0:i] if t.part == "gate_proj" else dst[t.expert, i:2 * i]
