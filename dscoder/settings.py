"""Settings: flag > DSCODER_* environment > $XDG_CONFIG_HOME/dscoder/config.toml > defaults.

Every field starts as "unset" (None) for the sampling knobs, so that the model's own
generation_config.json can fill what the user did not choose (see `Settings.generation`).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from dscoder.errors import UsageError
from dscoder.events import GenerationSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ENGINES = ("auto", "native", "transformers")
EXPERT_DTYPES = ("bf16", "int8")  # bf16: the model's dtype; int8: dscoder.model.quant
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the hub's default model
    device: str = "auto"
    gpu_memory: str | None = None
    expert_dtype: str = "bf16"  # int8: routed experts at one byte a weight (dscoder.model.quant)
    dtype: str | None = None
    context_length: int | None = None
    threads: int | None = None  # CPU threads for torch; None: default_threads() on a CPU run
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None
    verbose: bool = False
    debug: bool = False
    pretty: bool = True
    history: bool = True
    code_theme: str = "monokai"
    server: str | None = None  # URL or unix:PATH of a server to use; "off": always in-process
    keep_alive: str | None = None  # a duration: how long a background server stays after use
    api_key: str | None = None  # the key a server requires (serve) or is sent (client mode)
    # engine switches, for experiments and benchmarks (passed to load_engine; see README)
    cuda_graphs: bool = True  # DSCODER_CUDA_GRAPHS=0: eager decode
    compile: bool = True  # DSCODER_COMPILE=0: no torch.compile of the resident decode step
    capture_ahead: bool = True  # DSCODER_CAPTURE_AHEAD=0: decode graphs captured on need only
    offload_policy: str = "lru"  # expert cache eviction under --gpu-memory
    prefetch_depth: int = 1  # MoE layers ahead whose experts a decode step starts copying
    routing_trace: str | None = None  # a file to record which experts each layer picks
    engine: str = "auto"  # auto, native or transformers (dscoder.engines)
    trust_remote_code: bool = False  # run a checkpoint's own Python code (transformers engine)

    def generation(self, defaults: GenerationSettings) -> GenerationSettings:
        """Our choices over the model's defaults (from its generation_config.json)."""
        chosen = {k: getattr(self, k) for k in ("max_tokens", "temperature", "top_p", "top_k", "seed")}
        merged = replace(defaults, **{k: v for k, v in chosen.items() if v is not None})
        if self.stop:
            merged = replace(merged, stop=tuple(dict.fromkeys(defaults.stop + self.stop)))
        return merged


def unescape(text: str) -> str:
    r"""Turn \n, \t, \r and \\ into the characters: a stop string is often a newline."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (unescape(value),)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(unescape(v) for v in value)
    raise ValueError("expected a string or a list of strings")


def _str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    return float(value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "model": _str, "device": _str, "gpu_memory": _str, "expert_dtype": _str, "dtype": _str, "context_length": _int,
    "threads": _int,
    "max_tokens": _int, "temperature": _float, "top_p": _float, "top_k": _int, "seed": _int,
    "stop": _stop, "system": _str, "verbose": _bool, "debug": _bool, "pretty": _bool,
    "history": _bool, "code_theme": _str, "server": _str, "keep_alive": _str, "api_key": _str,
    "engine": _str, "trust_remote_code": _bool,
}
_CONVERT.update({  # the engine switches
    "cuda_graphs": _bool, "compile": _bool, "capture_ahead": _bool, "offload_policy": _str,
    "prefetch_depth": _int, "routing_trace": _str,
})
assert set(_CONVERT) == {f.name for f in fields(Settings)}


def default_threads(cpus: int | None = None) -> int:
    """Torch's CPU threads when --threads is not given: every core this process may use but
    one, at most 8. Torch's own default (all physical cores) makes every thread wait for the
    slowest, so one other busy process can make a reply several times slower; beyond 8 threads
    a batch-1 decode gains little."""
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not on Linux
            cpus = os.cpu_count() or 1
    return max(1, min(cpus - 1, 8))


def env_name(key: str) -> str:
    return "DSCODER_" + key.upper()


def config_path(env: Mapping[str, str]) -> Path:
    if env.get("DSCODER_CONFIG"):
        return Path(env["DSCODER_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "dscoder" / "config.toml"


def state_dir(env: Mapping[str, str]) -> Path:
    """Where history lives: $XDG_STATE_HOME/dscoder (never the home directory itself)."""
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dscoder"


def _convert(key: str, value: Any, where: str) -> Any:
    try:
        return _CONVERT[key](value)
    except (TypeError, ValueError) as e:
        raise UsageError(f"Bad value for {key} in {where}: {e}.") from None


SEED_MAX = 2**64 - 1  # the largest seed torch's generators take


def _from_file(path: Path, named: bool = False, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The settings in a config file; `named`: DSCODER_CONFIG named it, so it must exist.
    Values of the keys in `skip` (given by a higher layer) are not converted: a bad one that
    would be overridden anyway is no error."""
    if named and not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UsageError(f"DSCODER_CONFIG names {path}, which {what}; "
                         "point it at a config.toml or unset it.")
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise UsageError(f"Cannot read the config file {path}: {e}.") from None
    unknown = sorted(set(data) - set(_CONVERT))
    if unknown:
        raise UsageError(f"Unknown setting {unknown[0]!r} in {path}; "
                         f"known settings: {', '.join(sorted(_CONVERT))}.")
    return {k: _convert(k, v, str(path)) for k, v in data.items() if k not in skip}


def _from_env(env: Mapping[str, str], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    out = {k: _convert(k, env[env_name(k)], env_name(k)) for k in _CONVERT
           if env_name(k) in env and k not in skip}
    if _bool_env(env, "DSCODER_NOHISTORY"):
        out["history"] = False
    if "NO_COLOR" in env and env["NO_COLOR"] != "":  # https://no-color.org
        out["pretty"] = False
    return out


def _bool_env(env: Mapping[str, str], name: str) -> bool:
    return name in env and _convert("history", env[name], name)


def _gpu_memory_ok(text: str) -> bool:
    """'auto' (free GPU memory less a margin, see dscoder/offload/setup.py) or a size the engine
    reads with the same parser (12GiB, 24GB, 12G, 512MiB, 1000000)."""
    from dscoder.offload.sizes import parse_size  # torch-free

    if text.strip().lower() == "auto":
        return True
    try:
        parse_size(text)
    except UsageError:
        return False
    return True


def validate(s: Settings) -> Settings:
    def bad(msg: str) -> UsageError:
        return UsageError(msg)
    if s.device not in DEVICES and not re.fullmatch(r"cuda:\d+", s.device):
        raise bad(f"Unknown device {s.device!r}; use auto, cuda, cuda:N or cpu.")
    if s.dtype is not None and s.dtype not in DTYPES:
        raise bad(f"Unknown dtype {s.dtype!r}; use one of {', '.join(DTYPES)}.")
    if s.engine not in ENGINES:
        raise bad(f"Unknown engine {s.engine!r}; use auto, native or transformers.")
    if s.gpu_memory is not None and not _gpu_memory_ok(s.gpu_memory):
        raise bad(f"Cannot read GPU memory {s.gpu_memory!r}; "
                  "write it like 12GiB, 24GB, 512MiB or auto.")
    check_expert_dtype(s.expert_dtype)
    for key in ("max_tokens", "context_length", "threads"):
        if getattr(s, key) is not None and getattr(s, key) < 1:
            raise bad(f"{key.replace('_', '-')} must be at least 1.")
    if s.temperature is not None and not math.isfinite(s.temperature):
        raise bad(f"temperature must be a finite number (0 is greedy), not {s.temperature}.")
    if s.temperature is not None and s.temperature < 0:
        raise bad("temperature must be 0 (greedy) or more.")
    if s.seed is not None and not 0 <= s.seed <= SEED_MAX:
        raise bad(f"seed must be a whole number from 0 to {SEED_MAX}.")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise bad("top-p must be above 0 and at most 1.")
    if s.top_k is not None and s.top_k < 0:
        raise bad("top-k must be 0 (off) or more.")
    if any(stop == "" for stop in s.stop):
        raise bad("A stop string cannot be empty.")
    if s.keep_alive is not None:
        parse_duration(s.keep_alive)
    if s.server not in (None, "off") and not re.match(r"(https?://|unix:)", s.server):
        raise bad(f"Cannot use server {s.server!r}; give a URL (http://host:port) or unix:PATH.")
    _validate_engine_switches(s)
    return s


def check_expert_dtype(value: str) -> None:
    """--expert-dtype is bf16 or int8 (the settings and load_engine both check it)."""
    if value not in EXPERT_DTYPES:
        raise UsageError(f"Unknown expert dtype {value!r} (--expert-dtype, DSCODER_EXPERT_DTYPE); "
                         "use bf16 (the model's own dtype) or int8.")


def _validate_engine_switches(s: Settings) -> None:
    from dscoder.offload.policy import POLICIES  # torch-free

    if s.offload_policy not in POLICIES:
        raise UsageError(f"Unknown offload_policy {s.offload_policy!r} (DSCODER_OFFLOAD_POLICY); "
                         f"use one of {', '.join(POLICIES)}.")
    if s.prefetch_depth < 0:
        raise UsageError(f"prefetch_depth (DSCODER_PREFETCH_DEPTH) must be 0 or more, not "
                         f"{s.prefetch_depth}.")


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """'30m', '1h', '90s', '2d' or seconds; 'forever' (or -1) is None: no limit."""
    t = text.strip().lower()
    if t in ("forever", "inf", "-1"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|)", t)
    if not m:
        raise UsageError(f"Cannot read the duration {text!r}; write it like 30s, 30m, 2h or forever.")
    return float(m.group(1)) * _UNITS[m.group(2)]


def load_settings(flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Merge the layers; `flags` holds only what was given on the command line (None = not given)."""
    env = os.environ if env is None else env
    given = {k: v for k, v in flags.items() if v is not None and not (k == "stop" and not v)}
    # A layer's value is read only if no higher layer sets the key (DSCODER_TEMPERATURE=abc
    # is no error under -t 0); stop strings add up across layers only by the flag's choice.
    from_env_keys = frozenset(k for k in _CONVERT if env_name(k) in env)
    merged: dict[str, Any] = {}
    merged.update(_from_file(config_path(env), named=bool(env.get("DSCODER_CONFIG")),
                             skip=frozenset(given) | from_env_keys))
    merged.update(_from_env(env, skip=frozenset(given)))
    for key, value in given.items():
        merged[key] = _stop(list(value)) if key == "stop" else value
    return validate(Settings(**merged))
