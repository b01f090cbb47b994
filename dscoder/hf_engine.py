"""The transformers engine: any causal LM through AutoModelForCausalLM, behind the Engine API.

Generation is our own loop over ``model.forward`` with a transformers DynamicCache rather than
``model.generate`` with a streamer: each token is yielded as soon as it is sampled (no thread), the
Sampler and StopMatcher are the native engine's, and a Session keeps its cache between calls,
cropping it to the prefix the next prompt shares, so a chat turn only computes its new tokens.
With --gpu-memory, accelerate places what fits in the budget on the GPU and streams the rest from
host memory (device_map="auto" with max_memory).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from dscoder import shapes
from dscoder.decode_loop import plan_request, run_generation, stepwise
from dscoder.engine import common_prefix
from dscoder.errors import DscoderError, OutOfMemory, UsageError
from dscoder.events import Event, GenerationSettings

ACTIVATION_RESERVE = 1 << 30  # GPU room kept for activations and logits under --gpu-memory
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelInfo:
    """What the CLI and the loop read from the model's config."""

    model_type: str
    eos_token_id: int


@dataclass
class HFEngine:
    model: Any  # a transformers PreTrainedModel (possibly dispatched by accelerate)
    tokenizer: Any  # dscoder Tokenizer or ModelTokenizer
    config: ModelInfo
    context_length: int
    device: torch.device  # where input ids go and where sampling runs
    stop_ids: frozenset[int] = frozenset()  # default stops: generation_config EOS + end of turn
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    model_dir: Path | None = None
    under_budget: bool = False  # loaded under --gpu-memory: the GPU has no room to spare
    _session: HFSession | None = None

    @cached_property
    def forward_names(self) -> tuple[str, bool]:
        """forward()'s name for the cache (`cache` from transformers 5.24, where
        `past_key_values` is deprecated), and whether it takes logits_to_keep (prefill then
        computes the last position's logits only, not 2K x 32K of them); remote code may not."""
        import inspect

        params = inspect.signature(self.model.forward).parameters
        return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params

    def new_session(self) -> HFSession:
        return HFSession(self)

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                 stop_ids: Collection[int] | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        """One generation; consecutive calls share a cache, so a common prefix is reused."""
        if self._session is None:
            self._session = self.new_session()
        return self._session.generate(prompt_ids, settings, stop_ids=stop_ids, cancel=cancel)

    def close(self) -> None:
        self._session = None
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class HFSnapshot:
    """Keys and values of a sequence, kept outside its session (the server's prefix cache)."""

    tokens: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


class HFSession:
    """A conversation's transformers cache and the token ids it holds."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.tokens: list[int] = []  # ids whose keys and values are in the cache, in order
        self._cache: Any = None

    def reset(self) -> None:
        self.tokens, self._cache = [], None

    def _rewind(self, n: int) -> None:
        """Keep the first n cached tokens; a cache that cannot be cropped starts afresh."""
        if n < len(self.tokens) or (self._cache is not None
                                    and self._cache.get_seq_length() != len(self.tokens)):
            if n > 0 and self._cache is not None and crop_cache(self._cache, n):
                del self.tokens[n:]
            else:
                self.reset()

    def snapshot(self, device: torch.device | str | None = None) -> HFSnapshot | None:
        """A copy of the cached keys and values (None when nothing is cached, or for caches
        that are not plain per-layer tensors: sliding windows, recurrent states)."""
        n = len(self.tokens)
        layers = getattr(self._cache, "layers", None)
        if not n or not layers or not all(type(x).__name__ == "DynamicLayer" for x in layers):
            return None
        return HFSnapshot(tuple(self.tokens), tuple(
            (x.keys[..., :n, :].to(device or x.keys.device, copy=True),
             x.values[..., :n, :].to(device or x.values.device, copy=True)) for x in layers))

    def restore(self, snap: HFSnapshot, n: int) -> None:
        """Make the cache hold the first n ids of `snap` (copies, no forward pass)."""
        from transformers import DynamicCache

        n = min(n, len(snap.tokens))
        self.reset()
        cache = DynamicCache(config=self.engine.model.config)
        device = self.engine.device  # every layer computes there (accelerate brings offloaded
        for i, (k, v) in enumerate(snap.layers):  # weights to it), so its cache lives there
            cache.update(k[..., :n, :].to(device, copy=True), v[..., :n, :].to(device, copy=True), i)
        self._cache, self.tokens = cache, list(snap.tokens[:n])

    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ids to the cache; logits (1, V) fp32 of the last one on the engine's device.
        A forward that fails midway (Ctrl-C, out of memory) leaves the cache as it was."""
        engine = self.engine
        if self._cache is None:
            from transformers import DynamicCache

            self._cache = DynamicCache(config=engine.model.config)
        x = torch.tensor([list(ids)], dtype=torch.long, device=engine.device)
        cache_name, keep = engine.forward_names
        kwargs = {cache_name: self._cache, **({"logits_to_keep": 1} if keep else {})}
        try:
            with torch.inference_mode():
                out = engine.model(input_ids=x, use_cache=True, **kwargs)
        except BaseException:
            self._rewind(len(self.tokens))  # layers that already took these ids drop them
            raise
        self.tokens.extend(ids)
        return out.logits[:, -1].to(device=engine.device, dtype=torch.float32)

    def _prefill(self, ids: Sequence[int]) -> torch.Tensor:
        logits = None
        chunk = shapes.PREFILL_CHUNK  # the native engine's: bounds activations on long prompts
        for i in range(0, len(ids), chunk):
            logits = self._forward(ids[i:i + chunk])
        assert logits is not None
        return logits

    def generate(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
                 stop_ids: Collection[int] | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Event]:
        engine = self.engine
        settings = settings or engine.defaults
        prompt, stops, budget = plan_request(prompt_ids, settings, engine.context_length,
                                             stop_ids if stop_ids is not None else engine.stop_ids)
        return self._run(prompt, settings, stops, budget, cancel)

    def _run(self, prompt: list[int], settings: GenerationSettings, stop_ids: frozenset[int],
             budget: int, cancel: threading.Event | None) -> Iterator[Event]:
        engine = self.engine
        reused = min(common_prefix(self.tokens, prompt), len(prompt) - 1)  # last one gives logits
        self._rewind(reused)
        reused = len(self.tokens)
        yield from run_generation(
            lambda: self._prefill(prompt[reused:]), stepwise(lambda token: self._forward([token])),
            tokenizer=engine.tokenizer, settings=settings, device=engine.device,
            stop_ids=stop_ids, budget=budget, cancel=cancel, prompt_tokens=len(prompt),
            cached_tokens=reused)


def crop_cache(cache: Any, n: int) -> bool:
    """Cut every layer of a transformers cache to n tokens; False if it cannot be (sliding
    windows past their size, recurrent states). Layer by layer, because a forward that failed
    midway leaves the first layers longer than the rest."""
    try:
        if not getattr(cache, "is_croppable", True):
            return False
        layers = getattr(cache, "layers", None)
        if layers is None:  # transformers 4.x: crop() takes the length to keep
            cache.crop(n)
            return True
        for layer in layers:
            extra = layer.get_seq_length() - n
            if extra > 0:
                layer.crop(-extra)  # transformers 5: a negative count of tokens to remove
        return cache.get_seq_length() == n
    except (RuntimeError, ValueError, AttributeError):
        return False


# --- loading ----------------------------------------------------------------------------------

def _eos_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


def stop_ids_for(model_dir: Path, tokenizer: Any, config_eos: Any) -> frozenset[int]:
    """generation_config.json's EOS ids, the config's, the tokenizer's EOS (and DeepSeek's) and
    the template's end-of-turn token: the model may end a reply with any of them."""
    import json

    from dscoder.tokenizer import EOS_TOKEN

    # DeepSeek's end of text, in every DeepSeek tokenizer: what a Coder V1 Instruct model writes
    # after a fill-in-the-middle answer, though its tokenizer's EOS is <|EOT|>
    ids = _eos_ids(config_eos) | {tokenizer.eos_id, tokenizer.token_to_id(EOS_TOKEN)}
    try:
        gen = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
        ids |= _eos_ids(gen.get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        pass
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        try:
            ids.add(template.end_of_turn_id())
        except DscoderError:
            pass
    return frozenset(i for i in ids if i is not None)


def _kv_bytes_per_token(cfg: Any, dtype: torch.dtype) -> int:
    """Keys and values of one token in every layer (the usual attention layout)."""
    heads = getattr(cfg, "num_attention_heads", 1)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * item


def placement(cfg: Any, dev: torch.device, dtype: torch.dtype, gpu_memory: str | None, ctx: int,
              ctx_given: bool, log: Callable[[str], None] | None) -> tuple[dict[str, Any], int]:
    """from_pretrained's placement arguments, and the context window that fits the budget.

    Without a budget the model goes whole onto the device. With one, the KV cache of the context
    window and room for activations come off the top, and accelerate fills the rest of the
    budget with layers; the others stay in host memory and cross PCIe at every forward."""
    if not gpu_memory:
        return ({"device_map": {"": dev}} if dev.type == "cuda" else {}), ctx
    if dev.type != "cuda":
        raise UsageError("--gpu-memory needs a CUDA device; leave it out with --device cpu.")
    from dscoder.offload.setup import resolve_budget
    from dscoder.offload.sizes import format_size

    budget = resolve_budget(gpu_memory, dev)
    per_token = _kv_bytes_per_token(cfg, dtype)
    if not ctx_given and per_token * ctx > budget // 4:  # a long window would leave no weights
        ctx = max(2048, budget // 4 // per_token)
    weights = budget - per_token * ctx - ACTIVATION_RESERVE
    if weights <= 0:
        raise UsageError(f"--gpu-memory {gpu_memory} leaves no room for weights with a {ctx}-token "
                         f"context; give more memory or a smaller --context-length.")
    if log:
        log(f"GPU budget {format_size(budget)}: {format_size(weights)} for weights, "
            f"{format_size(per_token * ctx)} for a {ctx}-token KV cache")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return {"device_map": "auto", "max_memory": {index: weights, "cpu": _host_bytes()}}, ctx


def _host_bytes() -> int:
    from dscoder.offload.setup import host_available

    return int((host_available() or (64 << 30)) * 0.9)


def _explain(e: Exception, model_dir: Path) -> DscoderError:
    text = str(e)
    if "trust_remote_code" in text:
        return UsageError(f"{model_dir} needs code from its own repository to run; if you trust it, "
                          "pass --trust-remote-code (or set DSCODER_TRUST_REMOTE_CODE=1).")
    return DscoderError(f"transformers cannot load {model_dir}: {text.splitlines()[0] if text else e}")


def load_hf_engine(model_dir: Path, tokenizer: Any, *, device: torch.device,
                   dtype: str | None = None, gpu_memory: str | None = None,
                   context_length: int | None = None, trust_remote_code: bool = False,
                   defaults: GenerationSettings | None = None,
                   log: Callable[[str], None] | None = None) -> HFEngine:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dscoder.torch_import import load_deferred

    load_deferred()  # accelerate builds models on the meta device: torch's Python meta kernels
    if log is None:  # stderr is for our own progress and warnings; --verbose shows transformers'
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise _explain(e, model_dir) from None
    name = dtype or str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
                        or "float32").removeprefix("torch.")
    if name not in DTYPES:
        raise UsageError(f"Unknown dtype {name!r}; use float32, bfloat16 or float16.")
    dt = DTYPES[name]
    window = getattr(cfg, "max_position_embeddings", None) or 4096
    ctx = min(context_length or window, window)
    if ctx < 2:
        raise UsageError(f"--context-length must be at least 2, not {context_length}.")
    where, ctx = placement(cfg, device, dt, gpu_memory, ctx, context_length is not None, log)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt,
                                                     trust_remote_code=trust_remote_code, **where)
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemory("The model does not fit in GPU memory; set a budget with --gpu-memory "
                          "(for example --gpu-memory 6GiB) to keep some layers in host memory.") from e
    except (ValueError, OSError, KeyError) as e:
        raise _explain(e, model_dir) from None
    model.eval()
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    if gpu_memory and placed <= {"cpu", "disk"}:
        raise UsageError(f"--gpu-memory {gpu_memory} leaves no room on the GPU for any part of "
                         "this model; give it more, or leave it out to run with --device cpu.")
    if log:
        log(f"loaded {model_dir} with transformers ({type(model).__name__}) on "
            f"{_where(model, device)} in {name}, context {ctx}")
    info = ModelInfo(model_type=str(cfg.model_type), eos_token_id=tokenizer.eos_id)
    stops = stop_ids_for(model_dir, tokenizer, getattr(cfg, "eos_token_id", None))
    return HFEngine(model=model, tokenizer=tokenizer, config=info, context_length=ctx,
                    under_budget=bool(gpu_memory),
                    device=device, stop_ids=stops, defaults=defaults or GenerationSettings(),
                    model_dir=model_dir)


def _where(model: Any, device: torch.device) -> str:
    placed = getattr(model, "hf_device_map", None) or {}
    host = sum(1 for where in placed.values() if where in ("cpu", "disk"))
    return f"{device}, {host} of {len(placed)} modules in host memory" if host else str(device)
