"""Model resolution: local directories, a fake Hugging Face cache, downloads (never the network)."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest

from dscoder import hub
from dscoder.errors import DscoderError, ExitCode, ModelNotFound
from dscoder.hub import DEFAULT_MODEL, pull, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_cache(cache: Path, repo_id: str, files: tuple[str, ...] = ("config.json",)) -> Path:
    """The hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}", encoding="utf-8")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    return snapshot


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replaces the real download with one that fails like an unreachable hub; records calls."""
    calls: list[dict] = []
    real = huggingface_hub.snapshot_download

    def fake(repo_id: str, **kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        import httpx2

        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_relative_directory_wins_over_hub_id(tmp_path: Path, monkeypatch, cache: Path) -> None:
    (tmp_path / "owner" / "name").mkdir(parents=True)
    (tmp_path / "owner" / "name" / "config.json").write_text("{}", encoding="utf-8")
    _fake_cache(cache, "owner/name")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("owner/name") == Path("owner/name")


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./missing", "~/no-such-dscoder-model"])
def test_missing_directory(name: str) -> None:
    with pytest.raises(ModelNotFound, match="is not a directory") as e:
        resolve_model(name)
    assert str(Path(name).expanduser()) in e.value.message
    assert e.value.exit_code == ExitCode.USAGE


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=f"{tmp_path} has no config.json"):
        resolve_model(tmp_path)


def test_cached_hub_id(cache: Path) -> None:
    snapshot = _fake_cache(cache, "owner/name", ("config.json", "model.safetensors"))
    assert resolve_model("owner/name") == snapshot
    assert resolve_model("owner/name", download=True) == snapshot  # cached: no download


def test_cache_under_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = _fake_cache(tmp_path / "home" / "hub", DEFAULT_MODEL)
    assert hub.hub_cache_dir() == tmp_path / "home" / "hub"
    assert resolve_model(DEFAULT_MODEL) == snapshot


def test_not_cached(cache: Path) -> None:
    _fake_cache(cache, "owner/other")
    with pytest.raises(ModelNotFound) as e:
        resolve_model("owner/name")
    msg = e.value.message
    assert "owner/name is not in the Hugging Face cache" in msg and str(cache) in msg
    assert "`dscoder pull owner/name`" in msg and "--model" in msg and "\n" not in msg


def test_cached_snapshot_without_config_is_not_a_model(cache: Path) -> None:
    _fake_cache(cache, "owner/name", ("tokenizer.json",))
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        resolve_model("owner/name")


def test_download_refused_when_offline(cache: Path) -> None:
    with pytest.raises(DscoderError, match="HF_HUB_OFFLINE is set") as e:
        resolve_model("owner/name", download=True)
    assert not isinstance(e.value, ModelNotFound) and e.value.exit_code == ExitCode.RUNTIME
    with pytest.raises(DscoderError, match="HF_HUB_OFFLINE is set"):
        pull("owner/name")


def test_download_network_error_is_one_sentence(cache: Path, no_network: list[dict]) -> None:
    with pytest.raises(DscoderError) as e:
        resolve_model("owner/name", download=True)
    msg = e.value.message
    assert msg.startswith("Cannot download owner/name: Hugging Face could not be reached")
    assert "name resolution" in msg and "\n" not in msg and "check the network" in msg
    download = no_network[-1]
    assert not download.get("local_files_only") and Path(download["cache_dir"]) == cache
    assert "*.safetensors" in download["allow_patterns"] and "*.py" not in download["allow_patterns"]


@pytest.mark.parametrize("error, expected", [
    (OSError(28, "No space left on device"), "check the free disk space"),
    (RuntimeError("something odd"), "RuntimeError: something odd"),
])
def test_download_other_errors(cache: Path, monkeypatch, error: Exception, expected: str) -> None:
    def fake(repo_id: str, **kw):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(DscoderError, match=expected):
        pull("owner/name")


def test_download_repository_not_found(cache: Path, monkeypatch) -> None:
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/x"))

    def fake(repo_id: str, **kw):
        raise RepositoryNotFoundError("404 Client Error.\nRepository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFound, match="owner/name does not exist on Hugging Face"):
        pull("owner/name")


def test_download_success(cache: Path, monkeypatch) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled

    seen: list[bool] = []

    def fake(repo_id: str, **kw):
        if kw.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        seen.append(are_progress_bars_disabled())
        return str(_fake_cache(Path(kw["cache_dir"]), repo_id))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    before = are_progress_bars_disabled()
    path = resolve_model("owner/name", download=True, progress=False)
    assert path == cache / "models--owner--name" / "snapshots" / COMMIT
    assert seen == [True] and are_progress_bars_disabled() == before  # restored


def test_pull_rejects_paths() -> None:
    with pytest.raises(ModelNotFound, match="not a hub id"):
        pull("./some/dir")


@pytest.mark.parametrize("name, ok", [
    ("deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct", True), ("a/b", True), ("a/b/c", False),
    ("./a", False), ("/a/b", False), ("~/a", False), ("../a", False), ("a/..", False), ("ab", False),
])
def test_is_hub_id(name: str, ok: bool) -> None:
    assert hub.is_hub_id(name) is ok


def test_download_size_counts_only_what_a_download_fetches(monkeypatch, cache) -> None:
    from types import SimpleNamespace

    files = {"config.json": 1_000, "model-00001.safetensors": 9_000_000_000,
             "model.safetensors.index.json": 20_000, "pytorch_model.bin": 5_000_000_000,
             "modeling_deepseek.py": 70_000, "README.md": 9_000}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, **kw: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=n, size=s) for n, s in files.items()]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub.download_size("owner/name") == 1_000 + 9_000_000_000 + 20_000


def test_download_size_unreachable_hub_is_one_sentence(monkeypatch, cache) -> None:
    def unreachable(self, repo_id, **kw):
        import httpx2

        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(DscoderError, match="could not be reached"):
        hub.download_size("owner/name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DscoderError, match="HF_HUB_OFFLINE is set"):
        hub.download_size("owner/name")
