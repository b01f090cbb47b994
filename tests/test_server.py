"""dscoder serve on the tiny checkpoint: a real server process driven by the openai client and
plain HTTP, the CLI in client mode, and the app's error paths in process."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dscoder.events import Finished, GenerationSettings, TextDelta
from dscoder.prompts import chat_prompt, completion_prompt, fim_prompt

GREEDY = GenerationSettings(max_tokens=12, temperature=0.0)


def start_server(checkpoint: Path, runtime: Path, *args: str, env: dict | None = None):
    """`dscoder serve --port 0` in a subprocess; (process, base URL) once it listens."""
    runtime.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dscoder.cli.entry", "--model", str(checkpoint), "--device", "cpu",
         "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not match:
        proc.kill()
        pytest.fail(f"the server did not start: {line}{proc.stdout.read()}")
    proc.stdout.readline()  # the default socket line
    return proc, match.group(1)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("run")
    proc, url = start_server(tiny_checkpoint, runtime)
    yield url, runtime
    assert stop(proc) == 0  # SIGTERM is a clean exit
    assert not (runtime / "dscoder" / "server.sock").exists()  # and leaves no socket behind


@pytest.fixture()
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def local(engine, ids, settings=GREEDY, stop_ids=None) -> str:
    """The reference: the same engine in this process."""
    events = list(engine.new_session().generate(ids, settings, stop_ids=stop_ids))
    assert isinstance(events[-1], Finished)
    return events[-1].text


def fim_stops(tok) -> set[int]:
    return {tok.eos_id, tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id}


def test_chat_matches_in_process(server, openai_client, tiny_engine):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "write <｜end▁of▁sentence｜> a sort"}]
    expected = local(tiny_engine, chat_prompt(tiny_engine.tokenizer, messages).ids)
    reply = openai_client.chat.completions.create(model="x", messages=messages, max_tokens=12,
                                                  temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 12
    stream = openai_client.chat.completions.create(model="x", messages=messages, max_tokens=12,
                                                   temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_completion_and_fim_match_in_process(server, openai_client, tiny_engine):
    tok = tiny_engine.tokenizer
    plain = local(tiny_engine, completion_prompt(tok, "def add(a, b):").ids, stop_ids=fim_stops(tok))
    reply = openai_client.completions.create(model="x", prompt="def add(a, b):", max_tokens=12,
                                             temperature=0)
    assert reply.choices[0].text == plain
    ids = fim_prompt(tok, "def add(a, b):\n    ", "\n    return c\n").ids
    fim = local(tiny_engine, ids, stop_ids=fim_stops(tok))
    reply = openai_client.completions.create(model="x", prompt="def add(a, b):\n    ",
                                             suffix="\n    return c\n", max_tokens=12, temperature=0)
    assert reply.choices[0].text == fim
    by_ids = openai_client.completions.create(model="x", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == fim
    # the same prompt again: only the last token is computed
    assert by_ids.usage.prompt_tokens_details.cached_tokens == len(ids) - 1


def test_infill_matches_in_process(server, tiny_engine):
    tok = tiny_engine.tokenizer
    body = {"input_prefix": "def f(x):\n", "input_suffix": "\n", "prompt": "    ", "n_predict": 12,
            "temperature": 0, "input_extra": [{"filename": "util.py", "text": "X = 1\n"}]}
    ids = fim_prompt(tok, "def f(x):\n    ", "\n", context="\n\n--- snippet ---\n\nX = 1\n").ids
    expected = local(tiny_engine, ids, stop_ids=fim_stops(tok))
    first = httpx.post(server[0] + "/infill", json=body, timeout=60).json()
    assert first["content"] == expected
    assert first["tokens_evaluated"] == len(ids)
    again = httpx.post(server[0] + "/infill", json=body, timeout=60).json()
    assert again["content"] == expected and again["tokens_cached"] == len(ids) - 1
    streamed = []
    with httpx.stream("POST", server[0] + "/infill", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                streamed.append(__import__("json").loads(line[6:]))
    assert "".join(c["content"] for c in streamed) == expected and streamed[-1]["stop"] is True


@pytest.mark.parametrize("body", [
    b"{not json", b"[1, 2]",
    b'{"prompt": "x", "max_tokens": "many"}', b'{"prompt": "x", "temperature": -1}',
    b'{"prompt": [1, 2, 99999999]}', b'{"prompt": "x", "n": 2}', b'{"prompt": "x", "echo": true}'])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body):
    r = httpx.post(server[0] + "/v1/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    ok = httpx.post(server[0] + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_prompt_longer_than_the_context_is_400(server, tiny_engine):
    long_ids = [tiny_engine.tokenizer.bos_id] + [100] * tiny_engine.context_length
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": long_ids}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_disconnect_mid_stream_cancels_the_request(server):
    body = {"prompt": "x", "max_tokens": 100000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, timeout=60) as r:
        for _ in zip(range(3), r.iter_lines(), strict=False):
            pass  # a few tokens arrived; now hang up
    # the ~4,000 tokens left would take many seconds; the cancel takes one token
    deadline = time.monotonic() + 10
    while httpx.get(server[0] + "/health").json()["requests_active"]:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    ok = httpx.post(server[0] + "/v1/completions", json={"prompt": "y", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


# --- the CLI in client mode ---------------------------------------------------------------------

def dscoder(args: list[str], runtime: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "NO_COLOR": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("DSCODER_")}
    return subprocess.run([sys.executable, "-m", "dscoder.cli.entry", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("command", [
    ["complete", "-"], ["complete", "--suffix", "\n    return y\n", "-"], ["chat", "--json", "hi"],
    ["chat", "--system", "be brief", "review this"]])
def test_client_mode_equals_in_process(server, tiny_checkpoint, command):
    url, runtime = server
    common = ["--model", str(tiny_checkpoint), "--device", "cpu", "-t", "0", "-n", "10"]
    code = "def f(x):\n    y = x\n" if command[0] == "complete" or len(command) > 3 else None
    remote = dscoder([*common, "--server", url, *command], runtime, code)
    inproc = dscoder([*common, "--no-server", *command], runtime, code)
    assert remote.returncode == inproc.returncode == 0, remote.stderr + inproc.stderr
    if "--json" in command:
        import json
        a, b = json.loads(remote.stdout), json.loads(inproc.stdout)
        assert a["text"] == b["text"] and a["generated_tokens"] == b["generated_tokens"] == 10
    else:
        assert remote.stdout == inproc.stdout


def test_client_mode_finds_the_default_socket(server, tiny_checkpoint):
    url, runtime = server
    r = dscoder(["--model", str(tiny_checkpoint), "-t", "0", "-n", "4", "-v", "chat", "hi"], runtime)
    assert r.returncode == 0
    assert "No CUDA GPU" not in r.stderr  # the model was not loaded here
    other = dscoder(["--model", str(tiny_checkpoint) + "-other", "chat", "hi"], runtime)
    assert other.returncode == 2  # another model: not this server's, and not on disk


def test_client_mode_insert_equals_in_process(server, tiny_checkpoint, tmp_path):
    url, runtime = server
    results = []
    for mode in (["--server", url], ["--no-server"]):
        f = tmp_path / f"app{len(results)}.py"
        f.write_text("def f(x):\n\n    return x\n")
        r = dscoder(["--model", str(tiny_checkpoint), "--device", "cpu", "-t", "0", "-n", "8", *mode,
                     "insert", str(f), "--line", "2", "--print"], runtime)
        results.append((r.returncode, r.stdout))
    assert results[0] == results[1]


def test_unreachable_server_is_one_sentence(tiny_checkpoint, tmp_path):
    r = dscoder(["--model", str(tiny_checkpoint), "--server", "http://127.0.0.1:9", "chat", "hi"], tmp_path)
    assert r.returncode == 1 and "Cannot reach the server" in r.stderr and "Traceback" not in r.stderr


# --- keep-alive, keys, bind rules ------------------------------------------------------------------

def test_keep_alive_exits_when_idle(tiny_checkpoint, tmp_path):
    proc, url = start_server(tiny_checkpoint, tmp_path / "run", "--keep-alive", "1s")
    assert httpx.get(url + "/health").status_code == 200
    assert proc.wait(timeout=60) == 0


def test_wrong_api_key_is_401(tiny_engine):
    from starlette.testclient import TestClient

    from dscoder.server.app import ServerState, create_app

    client = TestClient(create_app(ServerState(tiny_engine, "tiny", api_key="sekret")))
    assert client.get("/health").status_code == 200  # health needs no key, as in llama-server
    r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200


def test_remote_host_needs_allow_remote(tiny_checkpoint, tmp_path):
    r = dscoder(["--model", str(tiny_checkpoint), "serve", "--host", "0.0.0.0"], tmp_path)
    assert r.returncode == 2 and "--allow-remote" in r.stderr


def test_stop_without_a_server(tmp_path):
    r = dscoder(["serve", "--stop"], tmp_path)
    assert r.returncode == 0 and "No dscoder server" in r.stderr


# --- pieces ----------------------------------------------------------------------------------------

def test_prefix_cache_brings_back_an_earlier_sequence(tiny_engine):
    from dscoder.server.worker import PrefixCache

    tok = tiny_engine.tokenizer
    a = completion_prompt(tok, "def alpha():\n    return 1\n" * 4).ids
    b = completion_prompt(tok, "class Beta:\n    pass\n" * 4).ids
    cache = PrefixCache(tiny_engine)

    def run(ids):
        events = list(cache.session_for(ids).generate(ids, GREEDY))
        return events[-1]

    first = run(a)
    run(b)  # replaces a in the live cache; a is kept as a snapshot
    again = run(a)
    assert again.cached_tokens == len(a) - 1  # restored, not prefilled
    assert again.text == first.text


def test_infill_limits_cut_at_a_dedent():
    from dscoder.server.infill import InfillLimits

    limits = InfillLimits(n_indent=4, t_max_predict_ms=0)
    out, stop = limits.feed("x = 1\n    y = 2\n")
    assert (out, stop) == ("x = 1\n    y = 2\n", False)
    out, stop = limits.feed("  z")  # a line indented less than 4: cut before it
    assert (out, stop) == ("", True)


def test_stream_delta_events_in_order(tiny_engine):
    """The worker hands events over in order, ending with Finished."""
    import asyncio

    from dscoder.server.worker import Job, Worker

    worker = Worker(tiny_engine)
    ids = completion_prompt(tiny_engine.tokenizer, "print(").ids

    async def collect():
        return [e async for e in worker.stream(Job(ids, GREEDY))]

    events = asyncio.run(collect())
    worker.close()
    assert all(isinstance(e, TextDelta) for e in events[:-1]) and isinstance(events[-1], Finished)
    assert "".join(e.text for e in events[:-1]) == local(tiny_engine, ids)


def test_tokenize_keeps_special_spellings_as_text(server, tiny_engine):
    tok = tiny_engine.tokenizer
    text = "a <｜fim▁hole｜> b <｜end▁of▁sentence｜>"
    r = httpx.post(server[0] + "/tokenize", json={"content": text, "with_offsets": True}).json()
    assert r["tokens"] == tok.encode(text)
    assert not {tok.fim_hole_id, tok.eos_id} & set(r["tokens"])
    assert [tuple(o) for o in r["offsets"]] == tok.encode_with_offsets(text)[1]


class _Broken:
    """An engine whose generation fails the way a full GPU does."""

    context_length = 64

    def __init__(self, tok, defaults):
        self.tokenizer, self.defaults = tok, defaults

    def new_session(self):
        return self

    tokens: list = []

    def generate(self, ids, settings, *, stop_ids=None, cancel=None):
        class OutOfMemoryError(RuntimeError):
            pass
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_is_503_and_the_server_goes_on(tiny_engine):
    from starlette.testclient import TestClient

    from dscoder.server.app import ServerState, create_app

    client = TestClient(create_app(ServerState(_Broken(tiny_engine.tokenizer, GREEDY), "x")))
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "x", "stream": stream})
        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory"
    assert client.get("/health").json() == {"status": "ok", "requests_active": 0}


def test_requests_run_one_at_a_time_in_order(server):
    import threading

    order: list[str] = []

    def ask(name: str, n: int) -> None:
        r = httpx.post(server[0] + "/v1/completions", json={"prompt": name, "max_tokens": n,
                                                            "temperature": 0}, timeout=120)
        assert r.status_code == 200
        order.append(name)

    first = threading.Thread(target=ask, args=("first", 300))
    first.start()
    deadline = time.monotonic() + 30
    while not httpx.get(server[0] + "/health").json()["requests_active"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # queued behind the first, though much shorter; not a single token: the first client's thread
    # needs a moment to note its answer, which arrives just before this one starts (a one-token
    # second reply came back first on a busy 2-core CI machine)
    ask("second", 32)
    first.join()
    assert order == ["first", "second"]


def test_keep_alive_one_shot_starts_a_background_server(tiny_checkpoint, tmp_path):
    from dscoder.server.paths import default_socket

    runtime = tmp_path / "run"
    runtime.mkdir()
    args = ["--model", str(tiny_checkpoint), "--device", "cpu", "-t", "0", "-n", "4"]
    first = dscoder([*args, "--keep-alive", "3s", "chat", "hi"], runtime)
    assert first.returncode == 0 and "Starting a dscoder server" in first.stderr
    env_socket = runtime / "dscoder" / "server.sock"
    assert env_socket.exists() and default_socket().name == env_socket.name
    second = dscoder([*args, "chat", "hi"], runtime)  # found on the default socket
    assert second.returncode == 0 and second.stdout == first.stdout
    deadline = time.monotonic() + 60
    while env_socket.exists():  # idle for 3 s: the server goes away and takes its socket
        assert time.monotonic() < deadline, "the background server did not exit when idle"
        time.sleep(0.2)


def test_prefix_cache_keeps_copies_in_host_memory_under_a_budget(tiny_engine):
    from types import SimpleNamespace

    from dscoder.server.worker import PrefixCache

    budgeted = SimpleNamespace(new_session=tiny_engine.new_session, under_budget=True)
    assert PrefixCache(budgeted).device == "cpu"
    assert PrefixCache(tiny_engine).device is None  # beside the live cache, on its device


def test_ctrl_c_stops_the_server_with_exit_0(tiny_checkpoint, tmp_path):
    proc, url = start_server(tiny_checkpoint, tmp_path / "run")
    assert httpx.get(url + "/health").status_code == 200
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
