"""Finding a model: a local directory, or a Hugging Face hub id in the local cache (or downloaded).

huggingface_hub is imported inside the functions: it pulls in an HTTP stack, and `dscoder --help`
must stay fast. The cache location and offline mode are read from the environment at call time
(huggingface_hub reads them once, at import), so HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE set by
a caller or a test always count.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from dscoder.errors import DscoderError, ModelNotFound

DEFAULT_MODEL = "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"
# What the engine needs: config, weights and index, tokenizer, chat template and generation
# settings. Remote code (*.py) is fetched only for --trust-remote-code; other formats (*.bin,
# *.gguf) never are.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
CODE_PATTERNS = ["*.py"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The released DeepSeek-Coder-V2 models (Lite and full, Base and Instruct, and their -0724
# updates) share one tokenizer, which dscoder ships (dscoder.tokenizer.load_bundled_tokenizer),
# and one context window, 163,840 tokens (max_position_embeddings in each config.json).
_CODER_V2 = re.compile(r"^deepseek-ai/DeepSeek-Coder-V2(-Lite)?-(Base|Instruct)(-0724)?$", re.I)
CODER_V2_CONTEXT = 163840
_TRUE = {"1", "true", "yes", "on"}


def hub_cache_dir() -> Path:
    """The hub cache, honouring HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE and HF_HOME as set now."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def is_offline() -> bool:
    """HF_HUB_OFFLINE as set now (it wins), else as huggingface_hub read it at import."""
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None and value.strip():
        return value.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_hub_id(name: str) -> bool:
    """``owner/name`` with no path syntax (no leading ./, /, ~, no more than one slash)."""
    return bool(_HUB_ID.match(name)) and ".." not in name


class NotDownloaded(ModelNotFound):
    """A hub id that is not in the local cache (the CLI may offer to download it)."""

    def __init__(self, repo_id: str) -> None:
        super().__init__(f"{repo_id} is not in the Hugging Face cache ({hub_cache_dir()}); run "
                         f"`dscoder pull {repo_id}` or pass a local directory with --model.")
        self.repo_id = repo_id


def download_size(repo_id: str) -> int:
    """Bytes that a download of ``repo_id`` fetches (the files ALLOW_PATTERNS selects), from the
    hub's file list; a failure to ask is one sentence, as for the download itself."""
    from fnmatch import fnmatch

    if is_offline():
        raise DscoderError(f"Cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it, or copy "
                           "the model here and pass its directory with --model.")
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
    except Exception as e:  # noqa: BLE001 -- any failure becomes one sentence, no traceback
        raise _download_error(repo_id, e) from e
    return sum(f.size or 0 for f in info.siblings or ()
               if any(fnmatch(f.rfilename, p) for p in ALLOW_PATTERNS))


def is_coder_v2(name: str) -> bool:
    """A hub id of a released DeepSeek-Coder-V2 model."""
    return bool(_CODER_V2.match(name))


def _local_model(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFound(f"{path} is not a directory; pass a model directory that holds "
                            f"config.json, or a hub id like {DEFAULT_MODEL}.")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{path} has no config.json; pass the directory of a "
                            "DeepSeek-Coder-V2 checkpoint.")
    return path


def cached_model(repo_id: str) -> Path | None:
    """The complete cached snapshot of ``repo_id`` (refs/main), or None; never touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), local_files_only=True,
                                      allow_patterns=ALLOW_PATTERNS))
    except (LocalEntryNotFoundError, OSError, ValueError):  # incomplete, missing, bad id
        return None
    return path if (path / "config.json").is_file() else None


def resolve_model(name: str | Path, *, download: bool = False, progress: bool = True) -> Path:
    """The model directory for ``name``: a local directory with config.json, or a hub id found
    in the local cache (downloaded first if ``download`` and it is not there)."""
    if isinstance(name, Path) or not is_hub_id(name) or Path(name).exists():
        return _local_model(Path(name).expanduser())
    cached = cached_model(name)
    if cached is not None:
        return cached
    if not download:
        raise NotDownloaded(name)
    return _download(name, progress=progress)


def pull(name: str, *, progress: bool = True, code: bool = False) -> Path:
    """Download (or complete, or update) ``name`` into the hub cache; progress goes to stderr.
    ``code``: also the model's own Python files (for --trust-remote-code)."""
    if not is_hub_id(name):
        raise ModelNotFound(f"{name!r} is not a hub id; give one like {DEFAULT_MODEL}.")
    return _download(name, progress=progress, code=code)


def _download(repo_id: str, *, progress: bool, code: bool = False) -> Path:
    if is_offline():
        raise DscoderError(f"Cannot download {repo_id}: HF_HUB_OFFLINE is set; unset it, or copy "
                           "the model here and pass its directory with --model.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:  # tqdm bars go to stderr, which is where progress belongs
        path = Path(snapshot_download(repo_id, cache_dir=hub_cache_dir(), allow_patterns=(
            ALLOW_PATTERNS + CODE_PATTERNS if code else ALLOW_PATTERNS)))
    except Exception as e:  # noqa: BLE001 -- any failure becomes one sentence, no traceback
        raise _download_error(repo_id, e) from e
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"{repo_id} was downloaded but has no config.json; "
                            "it is not a model checkpoint dscoder can run.")
    return path


def _download_error(repo_id: str, error: Exception) -> DscoderError:
    """One sentence for a failed download, by what went wrong."""
    from huggingface_hub import errors as hf

    detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, hf.GatedRepoError):
        return DscoderError(f"{repo_id} is gated; accept its licence on huggingface.co and "
                            "log in with `hf auth login`, then retry.")
    if isinstance(error, hf.RepositoryNotFoundError):
        return ModelNotFound(f"{repo_id} does not exist on Hugging Face (or needs a login); "
                             "check the name.")
    network = type(error).__module__.split(".")[0] in {"httpx", "httpx2", "httpcore", "requests"}
    if network or isinstance(error, (hf.LocalEntryNotFoundError, ConnectionError,
                                     hf.HfHubHTTPError)):
        return DscoderError(f"Cannot download {repo_id}: Hugging Face could not be reached "
                            f"({detail}); check the network connection and retry.")
    if isinstance(error, OSError):
        return DscoderError(f"Cannot download {repo_id} into {hub_cache_dir()} ({detail}); "
                            "check the free disk space and permissions, then retry.")
    return DscoderError(f"Cannot download {repo_id} ({type(error).__name__}: {detail}); "
                        "retry, or pass a local directory with --model.")
