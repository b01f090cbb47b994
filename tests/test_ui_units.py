"""Settings layers, slash commands, the reply driver and the Markdown renderer, in isolation."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakes import FakeEngine  # noqa: E402

from dscoder.cli.conversation import EXIT, REGEN, ChatState, Conversation, fence, run_command, with_context  # noqa: E402
from dscoder.cli.runtime import Interrupted, stream_reply  # noqa: E402
from dscoder.errors import UsageError  # noqa: E402
from dscoder.events import GenerationSettings  # noqa: E402
from dscoder.settings import Settings, load_settings  # noqa: E402
from dscoder.ui.console import Terminal, muted_input  # noqa: E402
from dscoder.ui.render import MarkdownStream, PlainStream, render_lines  # noqa: E402
from dscoder.ui.repl import CappedFileHistory, unquote  # noqa: E402


def term(pretty: bool = False) -> Terminal:
    return Terminal(io.StringIO(), io.StringIO(), io.StringIO(), pretty=pretty, err_color=False)


# --- settings -------------------------------------------------------------------------------

def test_precedence_flag_env_file_default(tmp_path):
    cfg = tmp_path / "dscoder" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text('temperature = 0.1\ntop_p = 0.5\nseed = 1\nstop = ["END"]\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path), "DSCODER_TOP_P": "0.6", "DSCODER_SEED": "2"}
    s = load_settings({"seed": 3, "stop": None}, env)
    assert (s.temperature, s.top_p, s.seed, s.stop, s.device) == (0.1, 0.6, 3, ("END",), "auto")


def test_env_bools_no_color_and_nohistory():
    s = load_settings({}, {"HOME": "/nonexistent", "NO_COLOR": "1", "DSCODER_NOHISTORY": "1",
                           "DSCODER_VERBOSE": "yes"})
    assert (s.pretty, s.history, s.verbose) == (False, False, True)
    with pytest.raises(UsageError, match="DSCODER_VERBOSE"):
        load_settings({}, {"HOME": "/nonexistent", "DSCODER_VERBOSE": "maybe"})


@pytest.mark.parametrize("flags, words", [
    ({"device": "tpu"}, "Unknown device"), ({"top_p": 0.0}, "top-p"), ({"max_tokens": 0}, "max-tokens"),
    ({"gpu_memory": "lots"}, "GPU memory"), ({"dtype": "int4"}, "dtype"), ({"stop": [""]}, "empty")])
def test_bad_settings(flags, words):
    with pytest.raises(UsageError, match=words):
        load_settings(flags, {"HOME": "/nonexistent"})


@pytest.mark.parametrize("size", ["auto", "AUTO", " Auto ", "12GiB", "24GB", "12G", "512MiB",
                                  "1.5gib", "12000", "64B"])
def test_gpu_memory_sizes_and_auto(size):
    assert load_settings({"gpu_memory": size}, {"HOME": "/nonexistent"}).gpu_memory == size


@pytest.mark.parametrize("size", ["lots", "auto12", "12XB", "-1GiB", "GiB", ""])
def test_gpu_memory_garbage_is_one_sentence(size):
    with pytest.raises(UsageError) as info:
        load_settings({"gpu_memory": size}, {"HOME": "/nonexistent"})
    assert info.value.message.startswith("Cannot read GPU memory") and "auto" in info.value.message
    assert info.value.message.count(". ") == 0 and info.value.message.endswith(".")


def test_generation_fills_unset_from_model_defaults():
    g = Settings(temperature=0.0, stop=("\n",)).generation(GenerationSettings(top_p=0.9, stop=("X",)))
    assert (g.temperature, g.top_p, g.stop, g.max_tokens) == (0.0, 0.9, ("X", "\n"), 1024)


def test_stop_flag_understands_escapes():
    assert load_settings({"stop": ["\\n\\n", "a\\tb"]}, {"HOME": "/x"}).stop == ("\n\n", "a\tb")


# --- conversation and slash commands -----------------------------------------------------------

def test_fence_is_longer_than_any_backtick_run():
    assert fence("a ```` b") == "`````\na ```` b\n`````"
    assert with_context("why?", "x\n") == "```\nx\n```\n\nwhy?"


def test_slash_commands(tmp_path):
    t = term()
    state = ChatState(Conversation(), Settings(), "m")
    run_command("/set temperature 0", state, t)
    run_command("/set top-k 5", state, t)
    run_command("/set stop \\n", state, t)
    assert (state.settings.temperature, state.settings.top_k, state.settings.stop) == (0.0, 5, ("\n",))
    with pytest.raises(UsageError):
        run_command("/set temperature hot", state, t)
    with pytest.raises(UsageError):
        run_command("/frobnicate", state, t)
    run_command("/system Be terse.", state, t)
    state.conversation.add_user("q")
    state.conversation.add_assistant("partial", interrupted=True)
    assert state.conversation.prompt_messages() == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": "partial"}]
    run_command(f"/save {tmp_path / 'c.json'}", state, t)
    assert run_command("/regen", state, t) == REGEN
    assert state.conversation.messages == [{"role": "user", "content": "q"}]
    run_command("/clear", state, t)
    run_command(f"/load {tmp_path / 'c.json'}", state, t)
    assert state.conversation.messages[-1] == {"role": "assistant", "content": "partial",
                                               "interrupted": True}
    (tmp_path / "f.py").write_text("print(1)\n")
    run_command(f"/read {tmp_path / 'f.py'}", state, t)
    state.conversation.add_user("explain")
    assert state.conversation.messages[-1]["content"].endswith("```\nprint(1)\n```\n\nexplain")
    assert run_command("/bye", state, t) == EXIT


def test_unquote_triple_quoted_block():
    assert unquote('"""\nline 1\nline 2\n"""') == "line 1\nline 2"
    assert unquote("plain") == "plain"


def test_history_file_is_private_and_capped(tmp_path):
    path = tmp_path / "state" / "history"
    h = CappedFileHistory(path, cap=3)
    for i in range(6):
        h.store_string(f"entry {i}\nsecond line")
    h2 = CappedFileHistory(path, cap=3)
    assert list(h2.load_history_strings()) == [f"entry {i}\nsecond line" for i in (5, 4, 3)]
    assert path.stat().st_mode & 0o777 == 0o600


# --- the reply driver ----------------------------------------------------------------------------

def test_stream_reply_interrupt_keeps_partial_text():
    engine = FakeEngine(reply="abcdefghij", chunk=2, interrupt_after=3)
    t = term()
    with pytest.raises(Interrupted) as info:
        stream_reply(engine.generate([1, 2], GenerationSettings()), PlainStream(t), prompt_tokens=2)
    assert info.value.finished.text == "abcdef" and info.value.finished.reason == "cancelled"
    assert t.stdout.getvalue() == "abcdef\n"


def test_stream_reply_max_lines():
    engine = FakeEngine(reply="a\nb\nc\n", chunk=1)
    t = term()
    f = stream_reply(engine.generate([1], GenerationSettings()), PlainStream(t, newline=False),
                     prompt_tokens=1, max_lines=2)
    assert (f.text, f.reason, t.stdout.getvalue()) == ("a\nb", "stop", "a\nb")


# --- rendering -----------------------------------------------------------------------------------

def test_code_blocks_have_no_left_padding_and_no_trailing_blanks():
    lines = render_lines("Text\n\n```python\nx = 1\n```\n", width=40, code_theme="monokai",
                         color_system="truecolor")
    plain = [__import__("re").sub(r"\x1b\[[0-9;]*m", "", ln) for ln in lines]
    assert "x = 1\n" in plain and "Text\n" in plain


def test_markdown_stream_settles_lines_and_shows_everything_once():
    out = io.StringIO()
    t = Terminal(io.StringIO(), out, io.StringIO(), pretty=True, err_color=False)
    stream = MarkdownStream(t)
    text = "".join(f"line {i}\n\n" for i in range(20))
    for i in range(0, len(text), 5):
        stream.feed(text[i:i + 5])
    stream.finish()
    shown = __import__("re").sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert all(f"line {i}" in shown for i in range(20))


# --- typing while a reply streams ------------------------------------------------------------------

def test_muted_input_hides_and_keeps_typeahead_and_restores_on_ctrl_c():
    import os
    import select
    import time

    termios = pytest.importorskip("termios")
    master, slave = os.openpty()
    try:
        stream = os.fdopen(slave, "r", closefd=False)
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ECHO
        with pytest.raises(KeyboardInterrupt):
            with muted_input(stream) as typed:
                assert not termios.tcgetattr(slave)[3] & termios.ECHO
                assert termios.tcgetattr(slave)[3] & termios.ISIG  # Ctrl-C still interrupts
                os.write(master, b"typed ahead\rand half a li")  # Enter, then no Enter yet
                time.sleep(0.1)
                raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == before  # echo is back
        assert select.select([master], [], [], 0.1)[0] == []  # nothing was echoed to the screen
        assert typed.text == "typed ahead\nand half a li"  # kept, for the next prompt
        assert select.select([slave], [], [], 0.1)[0] == []  # and not left to be read twice
        os.write(master, b"x\n")  # afterwards the terminal echoes again
        assert select.select([master], [], [], 2)[0] and b"x" in os.read(master, 100)
    finally:
        os.close(master)
        os.close(slave)


def test_typed_text_drops_control_keys_and_never_ends_in_enter():
    from dscoder.ui.console import typed_text

    assert typed_text(b"fix \x1b[Athe bug\x1b[D\r") == "fix the bug"
    assert typed_text(b"two\r\nlines\n\n") == "two\nlines"
    assert typed_text("caf\u00e9\t\x07ok".encode()) == "caf\u00e9\tok"


def test_muted_input_leaves_non_terminals_alone():
    with muted_input(io.StringIO("abc")):
        pass
    with muted_input(sys.stdin if not sys.stdin.isatty() else io.StringIO()):
        pass


def test_show_system_set_and_read_speak_plainly(tmp_path):
    t = term()
    state = ChatState(Conversation(), Settings(), "m")
    run_command("/show", state, t)
    run_command("/system", state, t)
    run_command("/system be brief", state, t)
    run_command("/system", state, t)
    run_command("/set stop \\n\\n", state, t)
    run_command("/set verbose on", state, t)
    run_command("/set temperature 0.5", state, t)
    run_command("/show", state, t)
    (tmp_path / "three.py").write_text("a = 1\nb = 2\nc = 3\n")
    run_command(f"/read {tmp_path / 'three.py'}", state, t)
    (tmp_path / "one.txt").write_text("no newline at the end")
    run_command(f"/read {tmp_path / 'one.txt'}", state, t)
    said = t.stderr.getvalue()
    for python_value in ("None", "()", "'be brief'", "True"):
        assert python_value not in said
    assert "system: none" in said and "System message: be brief" in said
    assert 'stop: "\\n\\n"' in said and "verbose: on" in said and "temperature: 0.5" in said
    assert "top_p: model default" in said
    assert "(3 lines)" in said and "(1 line)" in said


def test_settings_fall_back_to_tomli_without_tomllib(tmp_path):
    """Python 3.10 has no tomllib: settings then read the config file with tomli (same API).
    Run in a fresh interpreter where `import tomllib` fails and `tomli` is a stand-in."""
    import subprocess

    if sys.version_info < (3, 11):  # here it is the real thing
        import dscoder.settings

        assert dscoder.settings.tomllib.__name__ == "tomli"
        return
    (tmp_path / "c.toml").write_text("temperature = 0.25\n")
    code = (
        "import sys, types, tomllib\n"
        "fake = types.ModuleType('tomli'); fake.loads = tomllib.loads\n"
        "fake.TOMLDecodeError = tomllib.TOMLDecodeError\n"
        "sys.modules['tomllib'] = None; sys.modules['tomli'] = fake\n"
        "import dscoder.settings as s\n"
        "assert s.tomllib is fake\n"
        f"print(s.load_settings({{}}, {{'DSCODER_CONFIG': {str(tmp_path / 'c.toml')!r}}}).temperature)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert (r.returncode, r.stdout.strip()) == (0, "0.25"), r.stderr


def test_threads_setting_default_and_torch(monkeypatch):
    from dscoder.cli import backend
    from dscoder.settings import default_threads

    assert [default_threads(n) for n in (1, 2, 4, 9, 64)] == [1, 1, 3, 8, 8]
    assert load_settings({}, {"DSCODER_THREADS": "2"}).threads == 2
    assert load_settings({"threads": 3}, {"DSCODER_THREADS": "2"}).threads == 3
    with pytest.raises(UsageError, match="threads must be at least 1"):
        load_settings({"threads": 0}, {})
    torch = pytest.importorskip("torch")
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend.set_cpu_threads(Settings(device="cpu")) == default_threads()
    assert backend.set_cpu_threads(Settings(device="auto", threads=5)) == 5
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend.set_cpu_threads(Settings(device="auto")) is None  # a GPU run: torch's default
    assert calls == [default_threads(), 5]
