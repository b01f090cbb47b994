"""The CLI through its entry point, with the fake engine: options, errors, exit codes, prompts."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli_helpers import invoke, isolated  # noqa: E402,F401  (isolated: an autouse fixture)
from fakes import FakeBackend  # noqa: E402

from dscoder.cli import backend  # noqa: E402
from dscoder.errors import ModelNotFound  # noqa: E402

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"




@pytest.fixture
def fake(monkeypatch) -> FakeBackend:
    fb = FakeBackend(reply="The answer.")
    monkeypatch.setattr(backend, "BACKEND", fb)
    return fb


def test_help_lists_commands_and_exits_0():
    r = invoke(["--help"])
    assert r.code == 0
    for cmd in ("chat", "complete", "insert", "pull", "completion", "--gpu-memory", "--no-pretty"):
        assert cmd in r.stdout


def test_unknown_option_is_usage_error_without_traceback():
    r = invoke(["--frobnicate", "chat"])
    assert r.code == 2
    assert r.stderr == ("error: dscoder has no option --frobnicate; `dscoder --help` lists "
                        "them.\n")


def test_bad_value_is_one_sentence_exit_2(fake):
    r = invoke(["--temperature", "-1", "chat", "hi"])
    assert r.code == 2
    assert r.stderr.strip() == "error: temperature must be 0 (greedy) or more."
    assert fake.loads == 0


def test_one_shot_chat_prints_only_the_answer(fake):
    r = invoke(["chat", "hi", "there"])
    assert (r.code, r.stdout, r.stderr) == (0, "The answer.\n", "")
    assert fake.engine.prompt_text() == f"{BOS}User: hi there\n\nAssistant:"


def test_piped_stdin_is_fenced_context_and_message_the_instruction(fake):
    r = invoke(["chat", "review this"], input="x = 1\n```\n")
    assert r.code == 0
    assert fake.engine.prompt_text() == (f"{BOS}User: ````\nx = 1\n```\n````\n\nreview this\n\n"
                                         "Assistant:")


def test_piped_stdin_alone_is_the_message(fake):
    invoke(["chat"], input="write fizzbuzz\n")
    assert fake.engine.prompt_text() == f"{BOS}User: write fizzbuzz\n\n\nAssistant:"


def test_nothing_to_answer_is_usage_error(fake):
    r = invoke(["chat"], input="  \n")
    assert r.code == 2 and "Nothing to answer" in r.stderr


def test_system_and_settings_reach_the_engine(fake):
    r = invoke(["--temperature", "0", "-n", "7", "--stop", "\\n\\n", "--seed", "3", "chat",
                "--system", "Be brief.", "hi"])
    assert r.code == 0
    assert fake.engine.prompt_text().startswith(f"{BOS}Be brief.\n\nUser: hi")
    s = fake.engine.calls[-1]["settings"]
    assert (s.temperature, s.max_tokens, s.stop, s.seed) == (0.0, 7, ("\n\n",), 3)
    assert s.top_p == 0.95  # untouched knobs keep the model's defaults


def test_env_and_config_file_with_flag_winning(fake, tmp_path, monkeypatch):
    cfg = tmp_path / "config" / "dscoder"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('temperature = 0.9\ntop_k = 5\nmax_tokens = 11\n')
    monkeypatch.setenv("DSCODER_TOP_K", "7")
    invoke(["--max-tokens", "13", "chat", "hi"])
    s = fake.engine.calls[-1]["settings"]
    assert (s.temperature, s.top_k, s.max_tokens) == (0.9, 7, 13)


def test_bad_config_file_is_usage_error(fake, tmp_path):
    cfg = tmp_path / "config" / "dscoder"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text("temprature = 1\n")
    r = invoke(["chat", "hi"])
    assert r.code == 2 and "Unknown setting 'temprature'" in r.stderr


def test_json_output(fake):
    r = invoke(["chat", "--json", "hi"])
    data = json.loads(r.stdout)
    assert data["text"] == "The answer." and data["finish_reason"] == "eos"
    assert data["prompt_tokens"] == len(f"{BOS}User: hi\n\nAssistant:") - len(BOS) + 1
    assert {"decode_tokens_per_second", "prefill_seconds", "generated_tokens"} <= set(data)


def test_show_prompt_prints_exact_prompt_and_count_without_loading(fake):
    r = invoke(["chat", "--show-prompt", "hi"])
    assert r.code == 0 and fake.loads == 0
    assert r.stdout == f"{BOS}User: hi\n\nAssistant:"
    assert r.stderr.strip() == "[21 tokens]"  # BOS + one id per character


def test_show_prompt_on_complete_and_insert(fake, tmp_path):
    r = invoke(["complete", "--show-prompt", "--suffix", "B"], input="A")
    assert r.stdout == "<｜begin▁of▁sentence｜><｜fim▁begin｜>A<｜fim▁hole｜>B<｜fim▁end｜>"
    f = tmp_path / "f.py"
    f.write_text("a\nb\n")
    r = invoke(["insert", str(f), "--line", "2", "--show-prompt"])
    assert r.stdout == "<｜begin▁of▁sentence｜><｜fim▁begin｜>a\n<｜fim▁hole｜>b\n<｜fim▁end｜>"
    assert fake.loads == 0


def test_model_not_found_is_one_sentence(fake):
    fake.fail = ModelNotFound("x/y is not in the Hugging Face cache; run `dscoder pull x/y`.")
    r = invoke(["--model", "x/y", "chat", "hi"])
    assert r.code == 2
    assert r.stderr == "error: x/y is not in the Hugging Face cache; run `dscoder pull x/y`.\n"


def test_cuda_oom_suggests_gpu_memory_and_debug_shows_traceback(fake):
    fake.fail = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    r = invoke(["chat", "hi"])
    assert r.code == 1 and "--gpu-memory" in r.stderr and "Traceback" not in r.stderr
    r = invoke(["--debug", "chat", "hi"])
    assert r.code == 1 and "Traceback" in r.stderr


def test_unexpected_error_has_no_traceback(fake):
    fake.fail = ValueError("boom")
    r = invoke(["chat", "hi"])
    assert r.code == 1 and "boom" in r.stderr and "--debug" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_ctrl_c_exits_130_without_aborted(fake):
    fake.engine.interrupt_after = 1
    r = invoke(["chat", "hi"])
    assert r.code == 130
    assert "Aborted" not in r.stderr and "Traceback" not in r.stderr


def test_complete_prints_raw_continuation_with_fim_stops(fake, tmp_path):
    fake.engine.reply = "    return a + b\n\nprint(add(1, 2))\n"
    src = tmp_path / "a.py"
    src.write_text("def add(a, b):\n")
    r = invoke(["complete", str(src)])
    assert (r.code, r.stdout) == (0, "    return a + b\n\nprint(add(1, 2))\n")
    tok = fake.engine.tokenizer
    assert fake.engine.calls[-1]["stop_ids"] == {tok.eos_id, tok.fim_begin_id, tok.fim_hole_id,
                                                 tok.fim_end_id}
    assert fake.engine.prompt_text() == f"{BOS}def add(a, b):\n"


def test_complete_max_lines_and_stop_and_stdin(fake):
    fake.engine.reply = "one\ntwo\nthree\n"
    assert invoke(["complete", "--max-lines", "2", "-"], input="x").stdout == "one\ntwo"
    assert invoke(["--stop", "thr", "complete"], input="x").stdout == "one\ntwo\n"


def test_complete_suffix_file_makes_fim(fake, tmp_path):
    (tmp_path / "s.py").write_text("return x\n")
    invoke(["complete", "--suffix-file", str(tmp_path / "s.py")], input="def f():\n")
    assert fake.engine.prompt_text() == (
        f"{BOS}<｜fim▁begin｜>def f():\n<｜fim▁hole｜>return x\n<｜fim▁end｜>")
    r = invoke(["complete", "--suffix", "a", "--suffix-file", str(tmp_path / "s.py")], input="x")
    assert r.code == 2


def test_complete_missing_file(fake, tmp_path):
    r = invoke(["complete", str(tmp_path / "nope.py")])
    assert r.code == 2 and "nope.py" in r.stderr and fake.loads == 0


def test_completion_command_matches_generated_files():
    root = Path(__file__).resolve().parents[1]
    for shell, name in (("bash", "dscoder.bash"), ("zsh", "_dscoder"), ("fish", "dscoder.fish")):
        r = invoke(["completion", shell])
        assert r.code == 0
        assert r.stdout == (root / "completions" / name).read_text()
    assert invoke(["completion", "tcsh"]).code == 2


# --- global options after the subcommand ---------------------------------------------------------

def test_global_options_work_after_the_subcommand(fake, tmp_path):
    r = invoke(["chat", "--temperature", "0", "-n", "7", "--stop", "\\n\\n", "--seed", "3",
                "--top-p", "0.5", "--top-k", "4", "--model", "x/chat", "--no-pretty", "hi"])
    assert (r.code, r.stdout) == (0, "The answer.\n"), r.stderr
    s = fake.engine.calls[-1]["settings"]
    assert (s.temperature, s.max_tokens, s.stop, s.seed, s.top_p, s.top_k) == (0.0, 7, ("\n\n",), 3, 0.5, 4)
    fake.engine.reply = "one\ntwo\n"
    r = invoke(["complete", "-", "--max-tokens", "64", "--temperature", "0.3", "--context-length", "99"],
               input="x")
    assert r.code == 0, r.stderr
    assert fake.engine.calls[-1]["settings"].max_tokens == 64 and fake.engine.context_length == 99
    f = tmp_path / "f.py"
    f.write_text("a\nb\n")
    fake.engine.reply = "X\n"
    r = invoke(["insert", str(f), "--line", "2", "--model", "X", "--max-tokens", "64",
                "--device", "cpu", "--gpu-memory", "auto", "--dtype", "float32", "--dry-run"])
    assert r.code == 0, r.stderr
    assert fake.engine.calls[-1]["settings"].max_tokens == 64


def test_subcommand_value_wins_and_flags_beat_env_and_config(fake, tmp_path, monkeypatch):
    cfg = tmp_path / "config" / "dscoder"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text("temperature = 0.9\ntop_k = 5\nseed = 1\n")
    monkeypatch.setenv("DSCODER_TOP_K", "7")
    monkeypatch.setenv("DSCODER_SEED", "2")
    r = invoke(["--temperature", "0.5", "--stop", "A", "-n", "9", "chat", "--temperature", "0.1",
                "--stop", "B", "--seed", "4", "hi"])
    assert r.code == 0, r.stderr
    s = fake.engine.calls[-1]["settings"]
    # after > before > env > config; --stop after replaces the list given before
    assert (s.temperature, s.stop, s.max_tokens, s.top_k, s.seed) == (0.1, ("B",), 9, 7, 4)


def test_bad_value_after_the_subcommand_and_debug_there(fake):
    r = invoke(["chat", "--temperature", "-1", "hi"])
    assert (r.code, r.stderr.strip()) == (2, "error: temperature must be 0 (greedy) or more.")
    r = invoke(["chat", "--gpu-memory", "lots", "hi"])
    assert r.code == 2 and r.stderr.startswith("error: Cannot read GPU memory 'lots'")
    fake.fail = ValueError("boom")
    r = invoke(["chat", "--debug", "hi"])
    assert r.code == 1 and "Traceback" in r.stderr


def test_subcommand_help_and_completions_offer_the_global_options():
    r = invoke(["insert", "--help"])
    assert r.code == 0 and "--temperature" in r.stdout and "--no-pretty" in r.stdout
    assert "--version" not in r.stdout
    bash = invoke(["completion", "bash"]).stdout
    chat_line = next(ln for ln in bash.splitlines() if ln.strip().startswith("chat)"))
    assert "--temperature" in chat_line and "--gpu-memory" in chat_line


@pytest.mark.parametrize("args, message", [
    (["chat", "-t", "hot", "hi"], "--temperature takes a number, not 'hot'."),
    (["--max-tokens", "1.5", "chat", "hi"], "--max-tokens takes a whole number, not '1.5'."),
    (["insert", "f.py", "--line", "x"], "--line takes a whole number, not 'x'."),
    (["completion", "tcsh"], "SHELL takes one of bash, zsh or fish, not 'tcsh'."),
    (["complete", "--max-lines", "0"], "--max-lines must be at least 1, not 0."),
    (["chat", "--temprature", "1"], "dscoder chat has no option --temprature (did you mean "
                                    "--temperature?); `dscoder chat --help` lists them."),
    (["frob"], "dscoder has no command 'frob'; the commands are chat, complete, insert, serve, "
               "pull and completion."),
    (["insert"], "dscoder insert needs FILE; see `dscoder insert --help`."),
    (["insert", "f.py"], "dscoder insert needs --line N; see `dscoder insert --help`."),
    (["chat", "--temperature"], "--temperature needs a value; see `dscoder --help`."),
])
def test_parser_errors_are_our_one_sentence(args, message, fake):
    r = invoke(args)
    assert (r.code, r.stdout, r.stderr) == (2, "", f"error: {message}\n")
    assert fake.loads == 0


@pytest.mark.parametrize("command, usage", [
    ("chat", "Usage: dscoder chat [OPTIONS] [MESSAGE]..."),
    ("complete", "Usage: dscoder complete [OPTIONS] [FILE|-]"),
    ("insert", "Usage: dscoder insert [OPTIONS] FILE"),
    ("pull", "Usage: dscoder pull [OPTIONS] [MODEL]"),
    ("completion", "Usage: dscoder completion [OPTIONS] SHELL"),
])
def test_help_shows_arguments_as_written(command, usage):
    r = invoke([command, "--help"])
    assert r.code == 0 and r.stdout.splitlines()[0] == usage
    for leak in ("[[", "]]", "{", "}", "<list", "<str", "<int", "<Path"):
        assert leak not in r.stdout
