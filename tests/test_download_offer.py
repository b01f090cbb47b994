"""A model that is not downloaded: on a terminal, one question (with the size), then the download
and the load; in a script, or when the answer is no, the clear error (exit 2). No network: the
hub is replaced by a stub backend."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import FakeBackend  # noqa: E402

from dscoder.cli import backend  # noqa: E402
from dscoder.cli.runtime import Runtime  # noqa: E402
from dscoder.errors import ExitCode  # noqa: E402
from dscoder.hub import NotDownloaded  # noqa: E402
from dscoder.settings import Settings  # noqa: E402
from dscoder.ui.console import Terminal  # noqa: E402


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class NotYetDownloaded(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.pulled: list[str] = []

    def load_engine(self, settings, warn, info=None, progress=None):
        if not self.pulled:
            raise NotDownloaded("deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct")
        return super().load_engine(settings, warn, info, progress)

    def download_size(self, name: str) -> int:
        return 31_420_000_000

    def pull(self, name: str) -> Path:
        self.pulled.append(name)
        return Path("/cache") / name


def _runtime(monkeypatch, answer: str, tty: bool = True) -> tuple[Runtime, NotYetDownloaded]:
    stub = NotYetDownloaded()
    monkeypatch.setattr(backend, "BACKEND", stub)
    stream = _Tty if tty else io.StringIO
    term = Terminal(stream(answer), stream(), stream(), pretty=False, err_color=False)
    return Runtime(Settings(), term), stub


@pytest.mark.parametrize("answer", ["\n", "y\n", "Yes\n"])
def test_on_a_terminal_one_question_then_download_and_load(monkeypatch, answer):
    rt, stub = _runtime(monkeypatch, answer)
    assert rt.engine() is stub.engine
    assert stub.pulled == ["deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct"]
    asked = rt.term.stderr.getvalue()
    assert asked.count("?") == 1 and "(31.4 GB)" in asked and "[Y/n]" in asked


@pytest.mark.parametrize("answer", ["n\n", "no\n", ""])  # "" is Ctrl-D
def test_no_means_the_clear_error(monkeypatch, answer):
    rt, stub = _runtime(monkeypatch, answer)
    with pytest.raises(NotDownloaded) as e:
        rt.engine()
    assert e.value.exit_code == ExitCode.USAGE and "dscoder pull" in e.value.message
    assert stub.pulled == []


def test_in_a_script_nothing_is_asked(monkeypatch):
    rt, stub = _runtime(monkeypatch, "y\n", tty=False)
    with pytest.raises(NotDownloaded):
        rt.engine()
    assert stub.pulled == [] and rt.term.stderr.getvalue() == ""


def test_cli_in_a_script_exits_2(monkeypatch):
    from cli_helpers import invoke

    monkeypatch.setattr(backend, "BACKEND", NotYetDownloaded())
    r = invoke(["chat", "hi"])
    assert r.code == ExitCode.USAGE and "is not in the Hugging Face cache" in r.stderr
    assert "Download it now" not in r.stderr
