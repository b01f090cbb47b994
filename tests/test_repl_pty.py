"""The chat REPL in a real pseudo-terminal (pexpect), on the fake engine.

Types a message and sees the streamed reply, interrupts a slow reply with Ctrl-C (the reply stops,
the prompt comes back, the session goes on), recalls history with Up, and leaves with Ctrl-D.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

HERE = Path(__file__).resolve().parent
UP, CTRL_C, CTRL_D, ENTER = "\x1b[A", "\x03", "\x04", "\r"
PROMPT = "Send a message"  # the placeholder of an empty prompt: the REPL waits for input


def spawn(tmp_path: Path, *args: str, reply: str, delay: float,
          extra_env: dict[str, str] | None = None) -> "pexpect.spawn":
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_") and k != "NO_COLOR"}
    env.update(TERM="xterm-256color", XDG_STATE_HOME=str(tmp_path / "state"),
               XDG_CONFIG_HOME=str(tmp_path / "config"), DSCODER_FAKE_REPLY=reply,
               DSCODER_FAKE_DELAY=str(delay), DSCODER_FAKE_CHUNK="4", **(extra_env or {}))
    child = pexpect.spawn(sys.executable, [str(HERE / "fakes.py"), *args], env=env,
                          encoding="utf-8", dimensions=(40, 100), timeout=15)
    return child


def test_chat_stream_interrupt_history_exit(tmp_path):
    slow = " ".join(f"word{i}" for i in range(400))
    child = spawn(tmp_path, "chat", reply="Sure: **bold** reply.\\n\\nSECOND-PARA " + slow, delay=0.02)
    try:
        child.expect_exact(PROMPT)
        child.send("hello there" + ENTER)
        child.expect_exact("SECOND-PARA")  # streamed while the reply is still going
        child.expect("word1[0-9] ")
        child.send(CTRL_C)
        child.expect_exact("(interrupted)")
        child.expect_exact(PROMPT)  # back at the prompt; the session goes on
        assert child.isalive()
        child.send("/show" + ENTER)
        child.expect_exact("messages: 2")  # the interrupted reply was kept
        child.expect_exact(PROMPT)
        child.send(UP)  # newest history entry first
        child.expect_exact("/show")
        child.send(UP)
        child.expect_exact("hello there")
        child.send(CTRL_C)  # clears the line; a second Ctrl-C would leave
        child.expect_exact(PROMPT)
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    history = tmp_path / "state" / "dscoder" / "history"
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert "hello there" in history.read_text()


def test_chat_multiline_and_paste_is_not_a_command(tmp_path):
    child = spawn(tmp_path, "chat", "--no-history", reply="ok", delay=0.0)
    try:
        child.expect_exact(PROMPT)
        # bracketed paste: one message, even with newlines and a leading slash
        child.send("\x1b[200~/not a command\nline two\x1b[201~" + ENTER)
        child.expect_exact("ok")
        child.expect_exact(PROMPT)
        child.send('"""' + ENTER + "first" + ENTER + 'last"""' + ENTER)
        child.expect_exact("ok")
        child.expect_exact(PROMPT)
        child.send("/save " + str(tmp_path / "c.json") + ENTER)
        child.expect_exact("Saved 4 messages")
        child.expect_exact(PROMPT)
        child.send(CTRL_C)
        child.expect_exact("Ctrl-C again")
        child.send(CTRL_C)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    import json

    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["content"] for m in saved["messages"]] == ["/not a command\nline two", "ok",
                                                         "first\nlast", "ok"]
    assert not (tmp_path / "state" / "dscoder" / "history").exists()


def test_typing_during_a_reply_is_not_echoed_into_it_and_waits_at_the_prompt(tmp_path):
    words = " ".join(f"w{i}" for i in range(150))
    child = spawn(tmp_path, "chat", "--no-history", reply=f"Reply: {words} REPLY-DONE", delay=0.02)
    term = Screen(child)
    try:
        term.expect(PROMPT)
        child.send("first" + ENTER)
        term.expect("w1")  # the reply is streaming
        child.send("zqxj typed" + ENTER + "ahead")  # keys pressed meanwhile, Enter included
        term.expect("REPLY-DONE")
        term.expect("tok/s")  # the stats line: the reply is over
        shown = term.settle()
        reply = shown[shown.index("Reply:"):shown.index("REPLY-DONE")]
        assert "zqxj" not in reply  # not echoed into the reply
        # the typed text starts the next prompt (its Enter a newline), and nothing was sent
        assert ">>> zqxj typed\nahead" in "\n".join(line.rstrip() for line in shown.splitlines())
        child.send(CTRL_C)  # clears it
        term.expect(PROMPT)
        child.send("/show" + ENTER)
        term.expect("messages: 2")  # the typed line was never sent as a message
        term.expect(PROMPT)
        child.send("second" + ENTER)  # the prompt still echoes and works
        term.expect("REPLY-DONE")
        term.expect(PROMPT)
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


CTRL_R, ESC = "\x12", "\x1b"


class Screen:
    """What a 100x40 terminal shows, by replaying everything the child wrote (pyte)."""

    def __init__(self, child: "pexpect.spawn") -> None:
        pyte = pytest.importorskip("pyte")
        self.child, self.screen = child, pyte.Screen(100, 40)
        self.stream = pyte.Stream(self.screen)
        # answer cursor-position requests as a real terminal does (prompt_toolkit asks for them)
        self.screen.write_process_input = child.send

    def expect(self, text: str) -> None:
        self.child.expect_exact(text)
        self.stream.feed(self.child.before + self.child.after)

    def finish(self) -> str:
        """Read to the child's exit; the screen's text."""
        self.child.expect(pexpect.EOF)
        self.stream.feed(self.child.before)
        return "\n".join(self.screen.display)

    def settle(self) -> str:
        """Wait until the child has drawn everything (nothing new for 0.5 s); the screen's text."""
        self.stream.feed(self.child.buffer)  # read by the last expect, after its match
        self.child.buffer = ""
        while True:
            try:
                self.stream.feed(self.child.read_nonblocking(1 << 16, timeout=0.5))
            except (pexpect.TIMEOUT, pexpect.EOF):
                return "\n".join(self.screen.display)


def test_ctrl_r_search_enter_sends_escape_edits_ctrl_c_leaves(tmp_path):
    child = spawn(tmp_path, "chat", "--no-history", reply="ok", delay=0.0)
    term = Screen(child)
    try:
        term.expect(PROMPT)
        child.send("/set temperature 0.5" + ENTER)
        term.expect("temperature: 0.5")
        term.expect(PROMPT)
        child.send("hello one" + ENTER)
        term.expect("ok")
        term.expect(PROMPT)
        # Ctrl-R finds the match; no placeholder is drawn after it
        child.send(CTRL_R + "temper")
        term.expect("temper")
        shown = term.settle()
        assert ">>> /set temperature 0.5" in shown and PROMPT not in shown
        child.send(ENTER)  # sends the match, and the search bar is gone
        term.expect("temperature: 0.5")
        term.expect(PROMPT)
        child.send("/show" + ENTER)  # typed text reaches the prompt again
        term.expect("messages: 2")
        term.expect(PROMPT)
        # Escape keeps the match on the line, to edit it
        child.send(CTRL_R + "hello")
        term.expect("hello")
        child.send(ESC)
        term.settle()
        child.send("\x05 more" + ENTER)  # Ctrl-E: to the end of the line (the cursor was on the match)
        term.expect("ok")
        term.expect(PROMPT)
        # Ctrl-C gives the search up: the bar closes and the line is empty again
        child.send(CTRL_R + "zzz")
        term.expect("zzz")
        child.send(CTRL_C)
        term.settle()
        child.send("/save " + str(tmp_path / "c.json") + ENTER)
        term.expect("Saved 4 messages")
        term.expect(PROMPT)
        child.send(CTRL_D)
        # the chat ended: the last prompt left no placeholder behind in the scrollback
        assert PROMPT not in term.finish()
    finally:
        child.close()
    assert child.exitstatus == 0
    import json

    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["content"] for m in saved["messages"]] == ["hello one", "ok", "hello one more", "ok"]


@pytest.mark.parametrize("plain", [{"NO_COLOR": "1"}, {"args": "--no-pretty"}])
def test_stats_line_without_colour_on_a_terminal(tmp_path, plain):
    args = ["--no-pretty"] if "args" in plain else []
    child = spawn(tmp_path, "chat", *args, "hi", reply="the answer", delay=0.0,
                  extra_env={k: v for k, v in plain.items() if k != "args"})
    term = Screen(child)
    try:
        term.expect("the answer")
        shown = term.finish()
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "reply" in shown and "tok/s" in shown
    assert "\x1b[" not in child.before  # and no colour


def test_insert_shows_a_spinner_with_the_token_count_then_erases_it(tmp_path):
    target = tmp_path / "f.py"
    target.write_text("a = 1\nb = 2\n")
    child = spawn(tmp_path, "insert", str(target), "--line", "2", "--dry-run",
                  reply="x = 0\\n" * 40, delay=0.03)
    term = Screen(child)
    try:
        term.expect("filling the gap before line 2")
        term.expect(" tokens")
        shown = term.finish()
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "filling the gap" not in shown and "(dry run" in shown


def test_typing_while_the_model_loads_waits_at_the_first_prompt(tmp_path):
    child = spawn(tmp_path, "chat", "--no-history", reply="ok", delay=0.0,
                  extra_env={"DSCODER_FAKE_LOAD_DELAY": "1.5"})
    term = Screen(child)
    try:
        term.expect("fake: loading")
        child.send("early" + ENTER + "bird")
        term.expect("dscoder chat with")
        shown = "\n".join(line.rstrip() for line in term.settle().splitlines())
        assert ">>> early\nbird" in shown and shown.count("early") == 1  # not echoed during load
        child.send(ENTER)  # now Enter sends it
        term.expect("ok")
        term.expect(PROMPT)
        child.send("/save " + str(tmp_path / "c.json") + ENTER)
        term.expect("Saved 2 messages")
        child.send(CTRL_D)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    import json

    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["messages"][0]["content"] == "early\nbird"
