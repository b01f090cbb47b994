"""Issue 11, the CLI half: interrupts, files, streams, bad settings and the REPL surviving."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from itertools import pairwise
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import SRC, invoke, isolated  # noqa: E402,F401  (isolated: an autouse fixture)

from dscoder import signals  # noqa: E402
from dscoder.cli.runtime import Interrupted, stream_reply  # noqa: E402
from dscoder.events import Finished, TextDelta  # noqa: E402
from dscoder.fileedit import TEMP_SUFFIX, read_text_file, remove_stale_temps, write_atomic  # noqa: E402
from dscoder.visible import EscapingStream, escape_controls  # noqa: E402


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- signals ---------------------------------------------------------------------------------

def test_deferred_interrupt_is_delivered_after_the_block_and_check_sees_a_swallowed_one():
    with signals.handled():
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done = True  # the block ran to its end
        assert done
        signals.reset()
        try:  # what torch's start-up does to a KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):
            signals.check()
        signals.reset()
        with pytest.raises(signals.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        assert signals.exit_code() == 143
        signals.reset()
        with signals.deferred(deliver=False):  # a commit: too late to stop, so it is not raised
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.received() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's handler back


def test_a_swallowed_interrupt_stops_insert_before_the_write(fake, src):
    def swallowed() -> None:  # an interrupt that something caught and ignored
        signals._state["received"] = signal.SIGINT

    fake.engine.on_generate = swallowed
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 130 and src.read_bytes() == SRC


def test_sigterm_is_exit_143_and_writes_nothing(tmp_path):
    src = tmp_path / "a.py"
    src.write_bytes(SRC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_")}
    env.update(DSCODER_FAKE_REPLY="    return a + b\\n" * 50, DSCODER_FAKE_DELAY="0.05",
               DSCODER_FAKE_CHUNK="1", XDG_STATE_HOME=str(tmp_path))
    p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fakes.py"), "insert",
                          str(src), "-l", "2"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    threading.Timer(1.5, p.send_signal, (signal.SIGTERM,)).start()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "Traceback" not in err and src.read_bytes() == SRC
    assert not list(tmp_path.glob(f".*{TEMP_SUFFIX}"))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_at_any_moment_of_start_up_exits_without_writing(tiny_checkpoint, tmp_path, sig, code):
    """The real CLI on the tiny checkpoint, interrupted at moments spread over start-up: the
    imports (torch's swallowed Ctrl-C), the load, generation. Always the code, never a write."""
    src = tmp_path / "a.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_")}
    env["XDG_STATE_HOME"] = str(tmp_path)
    for delay in (0.3, 0.6, 1.0, 1.4, 2.0):
        src.write_bytes(SRC)
        p = subprocess.Popen([sys.executable, "-m", "dscoder.cli.entry", "--model", str(tiny_checkpoint),
                              "--device", "cpu", "--dtype", "float32", "-n", "4", "insert", str(src),
                              "-l", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        if p.returncode == 0:  # it finished before the signal (a fast machine): a normal run
            continue
        if "Inserted" in err:  # the signal came after the write had been made: too late to stop it
            continue
        assert src.read_bytes() == SRC, (delay, p.returncode, err)
        if p.returncode == -sig or "Fatal Python error" in err:
            continue  # a loaded machine: Python itself was still starting, before any of our code
        assert p.returncode == code, (delay, err)
        assert "Traceback" not in err and "Unexpected" not in err, (delay, err)
        assert not list(tmp_path.glob(f".*{TEMP_SUFFIX}"))


# --- temporary files ---------------------------------------------------------------------------

def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, src):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".add.py.{dead}.abcd1234{TEMP_SUFFIX}"
    stale_backup = tmp_path / f".add.py~.{dead}.abcd1234{TEMP_SUFFIX}"
    live = tmp_path / f".add.py.{alive}.abcd1234{TEMP_SUFFIX}"
    other = tmp_path / f".add.py.1.{dead}.abcd1234{TEMP_SUFFIX}"  # belongs to "add.py.1"
    for p in (stale, stale_backup, live, other):
        p.write_text("x")
    original = read_text_file(src)
    write_atomic(original, original.text + "# more\n")
    assert not stale.exists() and not stale_backup.exists()
    assert live.exists() and other.exists()
    assert remove_stale_temps(src) == []


def test_sigkill_between_temp_and_rename_leaves_a_file_the_next_run_removes(fake, tmp_path, src):
    # a writer that dies (SIGKILL) right after its temporary file is complete
    code = ("import os, sys; sys.path.insert(0, %r)\n"
            "from dscoder import fileedit\n"
            "def die(*a): os.kill(os.getpid(), 9)\n"
            "fileedit._ensure_unchanged = die\n"
            "f = fileedit.read_text_file(%r)\n"
            "fileedit.write_atomic(f, f.text + 'x = 1\\n')\n") % (str(Path(__file__).parents[1]), str(src))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -9
    left = list(tmp_path.glob(f".add.py.*{TEMP_SUFFIX}"))
    assert len(left) == 1 and src.read_bytes() == SRC
    assert invoke(["insert", str(src), "-l", "2", "--dry-run"]).code == 0  # not a writing run
    assert left[0].exists()
    assert invoke(["insert", str(src), "-l", "2"]).code == 0
    assert not left[0].exists()


# --- insert: owner, hard links, backup folder, what a terminal is shown --------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_backup_keeps_the_owner(fake, src):
    os.chown(src, 65534, 65534)
    assert invoke(["insert", str(src), "-l", "2", "--backup"]).code == 0
    backup = Path(str(src) + "~")
    assert backup.read_bytes() == SRC
    assert (backup.stat().st_uid, backup.stat().st_gid) == (65534, 65534)
    assert (src.stat().st_uid, src.stat().st_gid) == (65534, 65534)


def test_hard_linked_file_is_edited_in_place_for_every_name(fake, tmp_path, src):
    link = tmp_path / "link.py"
    os.link(src, link)
    r = invoke(["insert", str(src), "-l", "2", "--backup"])
    assert r.code == 0, r.stderr
    assert link.read_bytes() == src.read_bytes() != SRC
    assert os.path.samefile(src, link) and "1 other hard link" in r.stderr
    assert Path(str(src) + "~").read_bytes() == SRC
    assert not list(tmp_path.glob(f".*{TEMP_SUFFIX}"))


def test_backup_path_that_is_a_folder_is_found_before_generation(fake, src):
    Path(str(src) + "~").mkdir()
    r = invoke(["insert", str(src), "-l", "2", "--backup"])
    assert r.code == 2 and "is a folder" in r.stderr
    assert fake.loads == 0 and src.read_bytes() == SRC


def test_insert_diff_shows_escape_sequences_while_the_file_gets_them(fake, src):
    fake.engine.reply = "    return a + b  # \x1b]0;pwned\x07\x1b[2J\n"
    r = invoke(["insert", str(src), "-l", "2"])
    assert r.code == 0
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in r.stderr
    assert b"\x1b]0;pwned\x07\x1b[2J" in src.read_bytes()


def test_answers_on_a_terminal_are_escaped_and_exact_in_a_pipe(fake, monkeypatch):
    fake.engine.reply = "hi \x1b]0;pwned\x07 there\r\n\x9b2J"
    r = invoke(["--no-pretty", "chat", "hi"])
    assert r.stdout == "hi \x1b]0;pwned\x07 there\r\n\x9b2J\n"  # a pipe: exactly the text
    from dscoder.ui.console import Terminal

    monkeypatch.setattr(Terminal, "stdout_is_tty", property(lambda self: True))
    for args in (["--no-pretty", "chat", "hi"], ["complete", "-"]):
        r = invoke(args, input="x", env={"NO_COLOR": "1"})
        assert r.code == 0
        assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\x9b" not in r.stdout
        assert "hi \\x1b]0;pwned\\x07 there\r\n\\x9b2J" in r.stdout


def test_insert_print_escapes_on_a_terminal_only(fake, src, monkeypatch):
    fake.engine.reply = "    return a  # \x1b[2J\n"
    r = invoke(["insert", str(src), "-l", "2", "--print"])
    assert r.stdout == "    return a  # \x1b[2J\n"  # a pipe: exactly the text
    from dscoder.ui.console import Terminal

    monkeypatch.setattr(Terminal, "stdout_is_tty", property(lambda self: True))
    r = invoke(["insert", str(src), "-l", "2", "--print"])
    assert r.stdout == "    return a  # \\x1b[2J\n" and src.read_bytes() == SRC


def test_escape_controls_keeps_text_newlines_and_tabs():
    assert escape_controls("a\tb\nc\r\nd\re\x00\u202e") == "a\tb\nc\r\nd\\x0de\\x00\\u202e"
    out: list[str] = []

    class Sink:
        def feed(self, t: str) -> None:
            out.append(t)

        def finish(self) -> None:
            out.append("|")

    s = EscapingStream(Sink())
    for piece in ("a\r", "\nb\r", "c\r"):
        s.feed(piece)
    s.finish()
    assert "".join(out) == "a\r\nb\\x0dc\\x0d|"


# --- piped input -------------------------------------------------------------------------------

@pytest.mark.parametrize("data, words", [(b"a\x00b", "binary data"), (b"caf\xe9", "not valid UTF-8")])
def test_bad_piped_input_is_exit_2_one_sentence(fake, data, words):
    for args in (["chat"], ["chat", "explain"], ["complete"]):
        r = invoke(args, input=data)
        assert r.code == 2 and words in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and fake.loads == 0


def test_bad_piped_input_under_the_c_locale(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSCODER_", "LC_", "LANG"))}
    env.update(LC_ALL="C", PYTHONUTF8="0", PYTHONIOENCODING="")
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "fakes.py"), "chat", "x"],
                       input=b"caf\xe9", capture_output=True, env=env, timeout=60)
    assert r.returncode == 2 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr


# --- standard streams --------------------------------------------------------------------------

def _sh(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_")}
    e.update(XDG_STATE_HOME=str(tmp_path), FAKE=str(Path(__file__).parent / "fakes.py"),
             PY=sys.executable, **env)
    return subprocess.run(["bash", "-c", "set -o pipefail; " + script], capture_output=True,
                          text=True, env=e, timeout=120)


def test_broken_pipe_downstream_is_exit_0_and_silent(tmp_path):
    long = "x" * 100_000  # written in 100 pieces, 10 ms apart: the reader is gone before the end
    for cmd in ('"$PY" "$FAKE" chat hi', 'echo "def f():" | "$PY" "$FAKE" complete'):
        r = _sh(f'{cmd} | head -c 1', tmp_path, DSCODER_FAKE_REPLY=long, DSCODER_FAKE_CHUNK="1000",
                DSCODER_FAKE_DELAY="0.01")
        assert (r.returncode, r.stdout, r.stderr) == (0, "x", ""), cmd


@pytest.mark.parametrize("redirect, words", [("> /dev/full", "No space left on device"),
                                             (">&-", "standard output: it is closed")])
def test_full_or_closed_stdout_is_one_sentence(tmp_path, redirect, words):
    r = _sh(f'"$PY" "$FAKE" chat hi {redirect}', tmp_path, DSCODER_FAKE_REPLY="hello")
    assert r.returncode == 1 and words in r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_closed_stdin_and_stderr(tmp_path, src):
    r = _sh('"$PY" "$FAKE" chat hi <&-', tmp_path, DSCODER_FAKE_REPLY="hello")
    assert (r.returncode, r.stdout) == (0, "hello\n")
    r = _sh('"$PY" "$FAKE" chat <&-', tmp_path)
    assert r.returncode == 2 and "Nothing to answer" in r.stderr
    # stderr closed or full: the diff has nowhere to go, the edit is still made, and nothing
    # meant for stderr lands in the file (descriptor 2 is not free for the temporary file)
    for redirect in ("2>&-", "2>/dev/full"):
        src.write_bytes(SRC)
        r = _sh(f'"$PY" "$FAKE" insert {src} -l 2 {redirect}', tmp_path,
                DSCODER_FAKE_REPLY="    return a + b\\n")
        assert r.returncode == 0 and src.read_bytes() == SRC.replace(b"    pass", b"    return a + b\n    pass")
    r = _sh('"$PY" "$FAKE" chat hi 2>&-', tmp_path, DSCODER_FAKE_REPLY="hello")
    assert (r.returncode, r.stdout) == (0, "hello\n")


# --- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--seed", "99999999999999999999999"], "seed must be a whole number from 0 to"),
    (["--seed", "-1"], "seed must be a whole number from 0 to"),
])
def test_bad_numbers_are_one_sentence_exit_2(fake, args, words):
    r = invoke([*args, "chat", "hi"])
    assert r.code == 2 and words in r.stderr and fake.loads == 0
    assert "Unexpected" not in r.stderr


def test_dscoder_config_naming_a_missing_file_is_an_error(fake, tmp_path):
    r = invoke(["chat", "hi"], env={"DSCODER_CONFIG": str(tmp_path / "nope.toml")})
    assert r.code == 2 and "DSCODER_CONFIG" in r.stderr and "does not exist" in r.stderr


def test_bad_environment_value_overridden_by_a_flag_is_no_error(fake, tmp_path):
    assert invoke(["chat", "hi"], env={"DSCODER_TEMPERATURE": "abc"}).code == 2
    r = invoke(["-t", "0", "chat", "hi"], env={"DSCODER_TEMPERATURE": "abc"})
    assert r.code == 0 and fake.engine.calls[-1]["settings"].temperature == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text('temperature = "warm"\n')
    r = invoke(["chat", "-t", "0.5", "hi"], env={"DSCODER_CONFIG": str(cfg)})
    assert r.code == 0 and fake.engine.calls[-1]["settings"].temperature == 0.5


def test_context_length_beyond_the_model_is_clamped_with_a_word(fake):
    class Config:
        max_position_embeddings = 4096

    fake.engine.config = Config()
    real_load = fake.load_engine

    def clamped(settings, *a, **k):
        engine = real_load(settings, *a, **k)
        engine.context_length = min(engine.context_length, 4096)
        return engine

    fake.load_engine = clamped
    r = invoke(["--context-length", "10000000", "chat", "hi"])
    assert r.code == 0
    assert "--context-length 10000000 is more than this model's window of 4096 tokens" in r.stderr


# --- stats of replies cut short ----------------------------------------------------------------

def _engine_events(cancel: threading.Event, interrupt_at: int | None = None):
    """Like the engine: checks `cancel` between tokens, and reports with its real numbers."""
    ids: list[int] = []
    reason = "length"
    try:
        for i in range(20):
            if interrupt_at is not None and i == interrupt_at:
                raise KeyboardInterrupt
            ids.append(100 + i)
            if i % 3 == 0:
                yield TextDelta(f"line {i}\n", (100 + i,))  # ids 101, 102... held back, no text
            if cancel.is_set():
                reason = "cancelled"
                break
    except KeyboardInterrupt:
        reason = "cancelled"
    yield Finished(reason, "text", tuple(ids), 50, 42, 0.1, 0.2, stats={"expert_hits": 7})


class _Null:
    def feed(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass


def test_max_lines_reply_reports_the_engines_numbers():
    cancel = threading.Event()
    f = stream_reply(_engine_events(cancel), _Null(), prompt_tokens=50, max_lines=2, cancel=cancel)
    assert f.text == "line 0\nline 3" and f.reason == "stop"
    assert (f.cached_tokens, f.stats) == (42, {"expert_hits": 7})
    assert f.token_ids == tuple(range(100, 104))  # the ids that produced no text included


def test_interrupted_reply_reports_the_engines_numbers():
    cancel = threading.Event()
    with pytest.raises(Interrupted) as e:  # Ctrl-C inside the engine's step
        stream_reply(_engine_events(cancel, interrupt_at=5), _Null(), prompt_tokens=50, cancel=cancel)
    f = e.value.finished
    assert f.reason == "cancelled" and f.cached_tokens == 42 and f.stats == {"expert_hits": 7}
    assert len(f.token_ids) == 5

    class Interrupting(_Null):  # Ctrl-C while the reply is drawn
        def feed(self, text: str) -> None:
            raise KeyboardInterrupt

    cancel = threading.Event()
    with pytest.raises(Interrupted) as e:
        stream_reply(_engine_events(cancel), Interrupting(), prompt_tokens=50, cancel=cancel)
    assert cancel.is_set() and e.value.finished.cached_tokens == 42


def test_engine_interrupted_in_a_step_yields_its_finished(tiny_engine, monkeypatch):
    from dscoder import engine as engine_mod
    from dscoder.events import GenerationSettings

    calls = {"n": 0}
    real = engine_mod.Session._forward

    def forward(self, ids):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(engine_mod.Session, "_forward", forward)
    s = tiny_engine.new_session()
    ids = tiny_engine.tokenizer.encode("def f():")
    events = []
    with pytest.raises(KeyboardInterrupt):  # read on past the Finished: the interrupt comes back
        for event in s.generate(ids, GenerationSettings(max_tokens=20, temperature=0), stop_ids=()):
            events.append(event)
    f = events[-1]
    assert isinstance(f, Finished) and f.reason == "cancelled" and len(f.token_ids) == 3


def test_max_tokens_cutting_a_character_drops_it(tiny_engine, monkeypatch):
    import torch

    from dscoder import decode_loop as loop_mod
    from dscoder.events import GenerationSettings

    tok = tiny_engine.tokenizer
    byte = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    a, b, c = byte[b"a"], byte[b"\xe4"], byte[b"\xbd"]  # "a", then 2 of the 3 bytes of "你"

    class Script:
        def __init__(self, *args) -> None:
            self.ids = iter([a, b, c])

        def __call__(self, logits, pos):
            return torch.tensor([next(self.ids)])

    monkeypatch.setattr(loop_mod, "Sampler", Script)  # the engines' shared loop samples
    events = list(tiny_engine.new_session().generate(
        tok.encode("x"), GenerationSettings(max_tokens=3, temperature=0), stop_ids=()))
    f = events[-1]
    assert f.reason == "length" and f.token_ids == (a, b, c)
    assert f.text == "a" and "".join(e.text for e in events[:-1]) == "a"


# --- the REPL survives -------------------------------------------------------------------------

class _Script:
    """Stands in for the prompt_toolkit LineReader: returns scripted lines, then Ctrl-D."""

    made: list = []

    def __init__(self, history, commands=(), on_hint=None) -> None:
        self.history = history
        _Script.made.append(self)

    def read(self, typed_ahead: str = ""):  # as LineReader.read
        from dscoder.ui.repl import Entry

        return Entry(_Script.lines.pop(0), pasted=False) if _Script.lines else None


def _repl(monkeypatch, fake, lines, env=None):
    from dscoder.ui import repl as repl_mod
    from dscoder.ui.console import Terminal

    _Script.lines, _Script.made = list(lines), []
    monkeypatch.setattr(repl_mod, "LineReader", _Script)
    monkeypatch.setattr(Terminal, "stdin_is_tty", property(lambda self: True))
    return invoke(["--no-pretty", "chat"], env=env)


def test_repl_survives_an_unexpected_error_and_keeps_the_conversation(fake, monkeypatch, tmp_path):
    real_generate = fake.engine.generate
    calls = {"n": 0}

    def flaky(prompt_ids, settings, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_generate(prompt_ids, settings, **kw)

    fake.engine.generate = flaky
    fake.engine.new_session = lambda: fake.engine
    fake.engine.reply = "ok"
    save = tmp_path / "c.json"
    r = _repl(monkeypatch, fake, ["first", "second", "third", f"/save {save}"])
    assert r.code == 0, r.stderr
    assert "illegal memory access" in r.stderr and "conversation is kept" in r.stderr
    import json

    messages = json.loads(save.read_text())["messages"]
    # the failed turn's message was taken back; the others and their answers are kept
    assert [m["content"] for m in messages] == ["first", "ok", "third", "ok"]


@pytest.mark.parametrize("make", ["read-only", "state-is-a-file", "history-is-a-folder"])
def test_unusable_history_falls_back_to_memory_before_loading(fake, monkeypatch, tmp_path, make):
    state = tmp_path / "state"
    if make == "state-is-a-file":
        state.write_text("x")
    elif make == "history-is-a-folder":
        (state / "dscoder" / "history").mkdir(parents=True)
    else:
        state.mkdir()
        monkeypatch.setattr(os, "access", lambda *a, **k: False)
        real_mkdir = Path.mkdir

        def read_only(self, *a, **k):
            if str(self).startswith(str(state)):
                raise PermissionError(13, "Permission denied")
            return real_mkdir(self, *a, **k)

        monkeypatch.setattr(Path, "mkdir", read_only)
    order = []
    fake.engine.reply = "ok"
    real_load = fake.load_engine
    fake.load_engine = lambda *a, **k: (order.append("load"), real_load(*a, **k))[1]
    r = _repl(monkeypatch, fake, ["hi"], env={"XDG_STATE_HOME": str(state)})
    assert r.code == 0, r.stderr
    assert r.stderr.count("warning: Cannot keep the input history") == 1
    assert _Script.made[0].history is None and order == ["load"]
    assert r.stdout.startswith("ok")
    from dscoder.errors import DscoderError

    fake.fail = DscoderError("the weights did not load")  # the warning came before the load
    r = _repl(monkeypatch, fake, ["hi"], env={"XDG_STATE_HOME": str(state)})
    assert r.code == 1 and "Cannot keep the input history" in r.stderr


def test_repl_ends_on_sigterm_during_a_reply_but_not_on_ctrl_c(fake, monkeypatch):
    fake.engine.interrupt_after = 1
    r = _repl(monkeypatch, fake, ["one", "two"])
    assert r.code == 0 and r.stderr.count("(interrupted)") == 2  # Ctrl-C: the session goes on

    def sigterm() -> None:
        signals._state["received"] = signal.SIGTERM

    fake.engine.on_generate = sigterm
    r = _repl(monkeypatch, fake, ["one", "two"])
    assert r.code == 143 and "(interrupted)" not in r.stderr


def test_diff_of_a_long_file_compares_only_the_change_and_numbers_it_right(tmp_path):
    import difflib

    from dscoder.fileedit import split_keepends, unified_diff

    lines = [f"line {i}\n" for i in range(5000)]
    p = tmp_path / "long.txt"
    p.write_text("".join(lines))
    original = read_text_file(p)
    new = "".join(lines[:2500] + ["new 1\n", "new 2\n"] + lines[2500:])
    name = p.as_posix().lstrip("/")
    whole = "".join(difflib.unified_diff(split_keepends(original.text), split_keepends(new),
                                         f"a/{name}", f"b/{name}"))
    got = unified_diff(original, new)
    assert got == whole and "@@ -2498,6 +2498,8 @@" in got
    # text that runs into the next line ("zz" + "line 2500"): the common end starts mid-line
    for new in ("".join(lines[:2500]) + "new\nzz" + "".join(lines[2500:]),
                "".join(lines[:2500]) + "".join(lines[2501:]),
                "zz" + "".join(lines), "".join(lines) + "tail"):
        whole = "".join(difflib.unified_diff(split_keepends(original.text), split_keepends(new),
                                             f"a/{name}", f"b/{name}"))
        whole = whole.replace("+tail", "+tail\n\\ No newline at end of file\n")
        assert unified_diff(original, new) == whole


def test_repl_after_overflow_reuses_the_prompt_prefix(fake, monkeypatch):
    fake.engine.reply = "an answer of a few words"
    turns = [f"question number {i} " + "why " * 20 for i in range(30)]
    r = _repl(monkeypatch, fake, turns, env={"DSCODER_CONTEXT_LENGTH": "1200",
                                              "DSCODER_MAX_TOKENS": "100"})
    assert r.code == 0, r.stderr
    prompts = fake.engine.prompts
    assert len(prompts) == 30 and max(len(p) for p in prompts) <= 1100
    changed = sum(1 for a, b in pairwise(prompts) if b[:len(a) - 1] != a[:len(a) - 1])
    assert 1 <= changed <= 8, changed  # cuts in batches, not one turn per turn
    assert r.stderr.count("left out of the prompt") == changed
