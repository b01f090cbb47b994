"""The CLI as a user runs it: pipes (no escape codes), no torch for --help and completion,
generated completions and man page up to date, and all three commands end to end on a tiny
real-layout checkpoint with the real tokenizer."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = str(ROOT / "tests" / "fakes.py")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSCODER_") and k != "NO_COLOR"}
    env.update(TERM="xterm-256color", FORCE_COLOR="1", **extra)  # tempt it to colour: it must not
    return env


def _run(args: list[str], input: str = "", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], input=input, capture_output=True, text=True,
                          env=_env(**env), cwd=ROOT, timeout=120)


def test_piped_output_is_plain_text():
    reply = "# Title\\n\\n```python\\nprint(1)\\n```\\n"
    r = _run([FAKE, "chat", "hi"], DSCODER_FAKE_REPLY=reply)
    assert r.returncode == 0
    assert r.stdout == "# Title\n\n```python\nprint(1)\n```\n"
    assert "\x1b" not in r.stdout + r.stderr


def test_piped_complete_is_exactly_the_generated_text():
    r = _run([FAKE, "complete"], input="def f():\n", DSCODER_FAKE_REPLY="    return 1\\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "    return 1\n", "")


def test_verbose_stats_go_to_stderr():
    r = _run([FAKE, "-v", "chat", "hi"], DSCODER_FAKE_REPLY="ok")
    assert r.stdout == "ok\n"
    assert "tok/s" in r.stderr and "\x1b" not in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["chat", "--help"], ["completion", "bash"]])
def test_help_and_completion_do_not_import_torch(args):
    code = ("import sys; from dscoder.cli.app import run; rc = run(%r); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr); "
            "sys.exit(rc)" % (args,))
    r = _run(["-c", code])
    assert r.returncode == 0
    assert r.stderr.strip().endswith("NO-TORCH")


def test_show_prompt_does_not_import_torch(tmp_path, tokenizer_dir):
    model = tmp_path / "model"
    shutil.copytree(tokenizer_dir, model)
    (model / "config.json").write_text('{"max_position_embeddings": 163840}')
    code = ("import sys; from dscoder.cli.app import run; rc = run(['--model', %r, 'chat', "
            "'--show-prompt', 'hi']); print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', "
            "file=sys.stderr); sys.exit(rc)" % str(model))
    r = _run(["-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:"
    assert r.stderr.strip().splitlines() == ["[8 tokens]", "NO-TORCH"]  # BOS + 7


def test_generated_completions_and_man_page_are_current():
    r = _run(["-m", "dscoder.cli.gen_docs", "--check"])
    assert r.returncode == 0, r.stderr


def test_completion_scripts_parse():
    assert subprocess.run(["bash", "-n", str(ROOT / "completions" / "dscoder.bash")]).returncode == 0
    for shell, name in (("zsh", "_dscoder"), ("fish", "dscoder.fish")):
        if shutil.which(shell):
            assert subprocess.run([shell, "-n", str(ROOT / "completions" / name)]).returncode == 0


@pytest.mark.skipif(not shutil.which("groff"), reason="needs groff")
def test_man_page_renders_without_warnings():
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(ROOT / "man" / "dscoder.1")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
    text = re.sub(".\x08", "", r.stdout).replace("\u2010", "-")  # undo overstrike bold
    assert "dscoder insert [OPTIONS] FILE" in text


# --- end to end: the real engine on a tiny random checkpoint (CPU) ------------------------------

def _e2e(checkpoint: Path, *args: str, input: str = "") -> subprocess.CompletedProcess:
    return _run(["-m", "dscoder.cli.app", "--model", str(checkpoint), "--device", "cpu",
                 "--dtype", "float32", "-n", "8", "--seed", "1", *args], input=input)


def test_e2e_chat_complete_insert(tiny_checkpoint, tmp_path):
    r = _e2e(tiny_checkpoint, "-v", "chat", "--json", "hi")
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(r.stdout)
    assert data["generated_tokens"] <= 8 and data["finish_reason"] in ("eos", "length", "stop")
    r = _e2e(tiny_checkpoint, "complete", input="def add(a, b):\n")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    src = tmp_path / "a.py"
    src.write_bytes(b"def add(a, b):\n\nprint(add(1, 2))\n")
    r = _e2e(tiny_checkpoint, "insert", str(src), "--line", "2", "--dry-run")
    assert r.returncode in (0, 1), r.stderr  # random weights may produce nothing useful (exit 1)
    assert src.read_bytes() == b"def add(a, b):\n\nprint(add(1, 2))\n"


def test_python_dash_m_dscoder_runs_the_cli():
    r = _run(["-m", "dscoder", "--version"])
    from dscoder import __version__

    assert (r.returncode, r.stdout.strip()) == (0, f"dscoder {__version__}")


TEXTS = ["def f(x):\n    return x + 1\n", "User: write\n\nAssistant:", "héllo 世界 🚀 \t\r\n",
         "<｜end▁of▁sentence｜> <｜fim▁hole｜> stays text", "    indented\n\n\n  x = [1,2,3]"]


def test_bundled_tokenizer_on_a_fresh_machine(tmp_path, tokenizer_dir):
    """No model in the Hugging Face cache: a DeepSeek-Coder-V2 model name still gets its tokenizer
    (shipped with dscoder), with the same ids as the model's own tokenizer.json."""
    import json

    from dscoder.tokenizer import load_tokenizer

    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    code = ("import json, sys; from dscoder.cli.backend import RealBackend; "
            "from dscoder.settings import Settings; "
            f"tok = RealBackend().load_tokenizer(Settings(model={'deepseek-ai/DeepSeek-Coder-V2-Lite-Base'!r})); "
            f"print(json.dumps([tok.encode(t) for t in {TEXTS!r}] + [[tok.bos_id, tok.eos_id, "
            "tok.fim_hole_id, tok.fim_begin_id, tok.fim_end_id]]))")
    r = _run(["-c", code], **env)
    assert r.returncode == 0, r.stderr
    references = [tokenizer_dir]
    shared = Path("/work/shared/reference/deepseek-coder-v2-lite/lite-instruct")
    if (shared / "tokenizer.json").is_file():
        references.append(shared)
    for ref_dir in references:
        ref = load_tokenizer(ref_dir)
        expected = [ref.encode(t) for t in TEXTS] + [[ref.bos_id, ref.eos_id, ref.fim_hole_id,
                                                      ref.fim_begin_id, ref.fim_end_id]]
        assert json.loads(r.stdout) == expected
    assert expected[-1] == [100000, 100001, 100002, 100003, 100004]
    # and through the CLI: --show-prompt works, without torch, for the default model
    show = _run(["-c", "import sys; from dscoder.cli.app import run; rc = run(['chat', "
                 "'--show-prompt', 'hi']); print('TORCH' if 'torch' in sys.modules else "
                 "'NO-TORCH', file=sys.stderr); sys.exit(rc)"], **env)
    assert (show.returncode, show.stdout) == (0, "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:")
    assert show.stderr.split() == ["[8", "tokens]", "NO-TORCH"]
    # any other model still needs its files
    other = _run(["-m", "dscoder", "--model", "someone/other-model", "chat", "--show-prompt", "hi"],
                 **env)
    assert other.returncode == 2 and "not in the Hugging Face cache" in other.stderr


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_the_cli_asks_for_huge_pages_before_torch_is_imported(preset, expected):
    """main() sets THP_MEM_ALLOC_ENABLE (which torch reads once, at import) before the command
    runs, unless the user set it."""
    code = ("import os, sys\n"
            "import dscoder.cli.app as app\n"
            "def run():\n"
            "    print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)\n"
            "    return 0\n"
            "app.run = run\n"
            "app.main()\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [expected, "False"]
