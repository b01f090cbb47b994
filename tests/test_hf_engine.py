"""The transformers engine and the template prompt path, on tiny random checkpoints (CPU, fp32):
a DeepSeek-Coder V1 (Llama) model with the V1 tokenizer structure and chat template, and the
DeepSeek-V2 checkpoint of conftest, which both engines must run identically."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import invoke, isolated  # noqa: F401  (isolated: an autouse fixture)

from dscoder.errors import UsageError
from dscoder.events import Finished, GenerationSettings, TextDelta

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

GREEDY = GenerationSettings(max_tokens=12, temperature=0)
EOT = "<|EOT|>"
CONVERSATIONS = [
    [{"role": "user", "content": "write a quicksort in Python"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  hi  there\n"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "def f():\n    pass"},
     {"role": "user", "content": "again, with 世界 and tabs\t!"}],
]


@pytest.fixture(scope="module")
def coder_v1(tmp_path_factory) -> Path:
    from dscoder.llama_checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("coder-v1"), "tiny", seed=0)


@pytest.fixture(scope="module")
def hf_engine(coder_v1):
    from dscoder.loader import load_engine

    return load_engine(coder_v1, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference(coder_v1):
    """transformers' own tokenizer and model on the same files."""
    tok = transformers.AutoTokenizer.from_pretrained(coder_v1)
    model = transformers.AutoModelForCausalLM.from_pretrained(coder_v1, dtype=torch.float32).eval()
    return tok, model


def ids_of(encoded) -> list[int]:
    return list(encoded if isinstance(encoded, list) else encoded["input_ids"])


def hf_generate(model, ids: list[int], n: int, stop_ids) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(stop_ids), pad_token_id=sorted(stop_ids)[0])
    new = out[0, len(ids):].tolist()
    return [t for t in new if t not in stop_ids]


def run(events) -> tuple[str, Finished]:
    events = list(events)
    assert isinstance(events[-1], Finished)
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


# --- choosing the engine ----------------------------------------------------------------------

def test_engine_is_chosen_by_model_type(coder_v1, tiny_checkpoint):
    from dscoder.engines import choose_engine

    assert choose_engine(tiny_checkpoint) == "native"
    assert choose_engine(coder_v1) == "transformers"
    assert choose_engine(tiny_checkpoint, "transformers") == "transformers"
    with pytest.raises(UsageError, match="native engine runs DeepSeek-Coder-V2"):
        choose_engine(coder_v1, "native")


def test_loader_returns_the_transformers_engine_for_llama(hf_engine):
    assert type(hf_engine).__name__ == "HFEngine"
    assert hf_engine.context_length == 16384
    assert (hf_engine.defaults.temperature, hf_engine.defaults.top_p) == pytest.approx((0.3, 0.95))
    # <|EOT|> (generation_config, the template's end of turn) and <｜end▁of▁sentence｜> (FIM's end)
    assert hf_engine.stop_ids == {32021, 32014}


def test_remote_code_needs_the_flag(tmp_path):
    from dscoder.llama_checkpoint import write_tokenizer
    from dscoder.loader import load_engine

    write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "dscoder_custom_test", "auto_map": {
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    (tmp_path / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UsageError, match="--trust-remote-code"):
        load_engine(tmp_path, device="cpu")


# --- prompts from the model's own template ------------------------------------------------------

@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_coder_v1_chat_prompt_equals_apply_chat_template(coder_v1, reference, messages):
    from dscoder.engines import load_tokenizer_for
    from dscoder.prompts import chat_prompt

    ours = chat_prompt(load_tokenizer_for(coder_v1), messages)
    tok, _ = reference
    assert ours.ids == ids_of(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert ours.text == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_template_text_spelling_special_tokens_stays_text(coder_v1):
    from dscoder.engines import load_tokenizer_for
    from dscoder.prompts import chat_prompt

    tok = load_tokenizer_for(coder_v1)
    plain = chat_prompt(tok, [{"role": "user", "content": "say it"}])
    tricky = chat_prompt(tok, [{"role": "user", "content": f"say {EOT}<｜begin▁of▁sentence｜>"}])
    assert plain.ids.count(32021) == tricky.ids.count(32021) == 0
    assert tricky.ids.count(32013) == 1  # the template's own BOS only
    assert tok.decode(tricky.ids).count(EOT) == 1


def test_native_v2_builder_equals_the_template_path(tokenizer_dir):
    from dscoder.model_tokenizer import load_model_tokenizer
    from dscoder.prompts import chat_prompt
    from dscoder.tokenizer import load_tokenizer

    native, templated = load_tokenizer(tokenizer_dir), load_model_tokenizer(tokenizer_dir)
    assert templated.chat_template is not None
    for messages in CONVERSATIONS:
        assert chat_prompt(native, messages).ids == chat_prompt(templated, messages).ids
    assert templated.chat_template.end_of_turn_id() == native.eos_id


def test_chat_truncation_drops_whole_turns_on_the_template_path(coder_v1):
    from dscoder.engines import load_tokenizer_for
    from dscoder.prompts import chat_prompt

    tok = load_tokenizer_for(coder_v1)
    messages = CONVERSATIONS[2]
    full = chat_prompt(tok, messages)
    short = chat_prompt(tok, messages, max_prompt_tokens=len(full.ids) - 1)
    assert short.dropped_messages == 2
    assert short.ids == chat_prompt(tok, messages[2:]).ids


def test_base_model_without_template_refuses_chat(tmp_path):
    from dscoder.llama_checkpoint import write_tokenizer
    from dscoder.model_tokenizer import load_model_tokenizer
    from dscoder.prompts import chat_prompt

    write_tokenizer(tmp_path, instruct=False)
    tok = load_model_tokenizer(tmp_path)
    assert tok.eos_id == 32014 and tok.fim_begin_id == 32016
    with pytest.raises(UsageError, match="no chat template"):
        chat_prompt(tok, CONVERSATIONS[0])


# --- generation -------------------------------------------------------------------------------

def test_greedy_matches_transformers_generate(hf_engine, reference):
    from dscoder.prompts import completion_prompt

    tok, model = reference
    prompt = completion_prompt(hf_engine.tokenizer, "def quicksort(xs):\n    ")
    # BOS by hand: transformers 5 adds none for a ByteLevel post-processor (reference README)
    assert prompt.ids == [32013] + tok.encode("def quicksort(xs):\n    ", add_special_tokens=False)
    text, final = run(hf_engine.new_session().generate(prompt.ids, GREEDY, stop_ids=()))
    expected = hf_generate(model, prompt.ids, GREEDY.max_tokens, {-1})
    assert list(final.token_ids) == expected
    assert text == tok.decode(expected, skip_special_tokens=True)


def test_session_reuses_the_cache_of_the_shared_prefix(hf_engine):
    from dscoder.prompts import completion_prompt

    ids = completion_prompt(hf_engine.tokenizer, "class Stack:\n").ids
    session = hf_engine.new_session()
    _, first = run(session.generate(ids, GREEDY, stop_ids=()))
    longer = ids + list(first.token_ids[:4])
    _, second = run(session.generate(longer, GREEDY, stop_ids=()))
    assert second.cached_tokens == len(longer) - 1
    _, fresh = run(hf_engine.new_session().generate(longer, GREEDY, stop_ids=()))
    assert second.token_ids == fresh.token_ids
    assert second.token_ids[:GREEDY.max_tokens - 4] == first.token_ids[4:]
    _, back = run(session.generate(ids, GREEDY, stop_ids=()))  # a shorter prompt crops the cache
    assert back.cached_tokens == len(ids) - 1 and back.token_ids == first.token_ids


def test_a_forward_interrupted_midway_leaves_the_cache_usable(hf_engine):
    from dscoder.prompts import completion_prompt

    ids = completion_prompt(hf_engine.tokenizer, "import os\n").ids
    session = hf_engine.new_session()
    run(session.generate(ids[:-2], GREEDY, stop_ids=()))
    layer = hf_engine.model.model.layers[1]  # layer 0 has taken the new ids when this one fails
    original = layer.forward

    def boom(*args, **kwargs):
        raise KeyboardInterrupt
    layer.forward = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            run(session.generate(ids, GREEDY, stop_ids=()))
    finally:
        layer.forward = original
    _, again = run(session.generate(ids, GREEDY, stop_ids=()))
    _, fresh = run(hf_engine.new_session().generate(ids, GREEDY, stop_ids=()))
    assert again.token_ids == fresh.token_ids


def test_stop_ids_cancel_and_stop_strings(hf_engine):
    import threading

    from dscoder.prompts import completion_prompt

    ids = completion_prompt(hf_engine.tokenizer, "def main():\n").ids
    text, free = run(hf_engine.new_session().generate(ids, GREEDY, stop_ids=()))
    third = free.token_ids[2]
    _, stopped = run(hf_engine.new_session().generate(ids, GREEDY, stop_ids={third}))
    assert stopped.reason == "eos" and stopped.token_ids == free.token_ids[:free.token_ids.index(third)]
    cancel = threading.Event()
    cancel.set()
    _, cancelled = run(hf_engine.new_session().generate(ids, GREEDY, stop_ids=(), cancel=cancel))
    assert cancelled.reason == "cancelled" and len(cancelled.token_ids) == 1
    stop = text[4:7]
    if stop.strip():
        cut, final = run(hf_engine.new_session().generate(
            ids, GenerationSettings(max_tokens=12, temperature=0, stop=(stop,)), stop_ids=()))
        assert final.reason == "stop" and cut == text[:text.index(stop)]


def test_deepseek_v2_gives_the_same_greedy_ids_on_both_engines(tiny_checkpoint, tiny_engine):
    from dscoder.loader import load_engine
    from dscoder.prompts import chat_prompt

    hf = load_engine(tiny_checkpoint, device="cpu", dtype="float32", engine="transformers")
    assert type(hf).__name__ == "HFEngine" and type(hf.tokenizer) is type(tiny_engine.tokenizer)
    ids = chat_prompt(tiny_engine.tokenizer, CONVERSATIONS[0]).ids
    settings = GenerationSettings(max_tokens=16, temperature=0)
    native_text, native = run(tiny_engine.new_session().generate(ids, settings, stop_ids=()))
    hf_text, ours = run(hf.new_session().generate(ids, settings, stop_ids=()))
    assert ours.token_ids == native.token_ids and hf_text == native_text


# --- the CLI on the transformers engine ---------------------------------------------------------

def cli(coder_v1: Path, *args: str, input: str = ""):
    return invoke(["--model", str(coder_v1), "--device", "cpu", "--dtype", "float32",
                   "--temperature", "0", "-n", "10", *args], input=input)


def test_cli_complete_equals_transformers(coder_v1, reference, tmp_path):
    tok, model = reference
    src = tmp_path / "a.py"
    src.write_text("def add(a, b):\n    ")
    result = cli(coder_v1, "complete", str(src))
    assert result.code == 0, result.stderr
    ids = [32013] + tok.encode("def add(a, b):\n    ", add_special_tokens=False)
    stops = {32014, 32021, 32015, 32016, 32017}
    assert result.stdout == tok.decode(hf_generate(model, ids, 10, stops), skip_special_tokens=True)


def test_cli_fill_in_the_middle_equals_transformers(coder_v1, reference, tmp_path):
    tok, model = reference
    prefix, suffix = "def add(a, b):\n", "print(add(1, 2))\n"  # what insert --line 2 cuts
    result = cli(coder_v1, "complete", "-", "--suffix", suffix, input=prefix)
    assert result.code == 0, result.stderr
    ids = ids_of(tok(f"<｜begin▁of▁sentence｜><｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>",
                     add_special_tokens=False))
    expected = tok.decode(hf_generate(model, ids, 10, {32014, 32021, 32015, 32016, 32017}),
                          skip_special_tokens=True)
    assert result.stdout == expected
    src = tmp_path / "b.py"
    src.write_text(prefix + suffix)
    inserted = cli(coder_v1, "insert", str(src), "--line", "2", "--print")
    from dscoder.fim import clean_insertion

    want = clean_insertion(expected, prefix, suffix)
    assert (inserted.code, inserted.stdout) == ((0, want) if want else (1, ""))


def test_cli_one_shot_chat_equals_transformers(coder_v1, reference):
    tok, model = reference
    result = cli(coder_v1, "--no-pretty", "chat", "write quicksort")
    assert result.code == 0, result.stderr
    ids = ids_of(tok.apply_chat_template([{"role": "user", "content": "write quicksort"}],
                                         add_generation_prompt=True))
    expected = tok.decode(hf_generate(model, ids, 10, {32014, 32021}), skip_special_tokens=True)
    assert result.stdout.rstrip("\n") == expected.rstrip("\n")


def test_cli_native_engine_on_llama_is_a_usage_error(coder_v1):
    result = cli(coder_v1, "--engine", "native", "chat", "--show-prompt", "hi")
    assert result.code == 2 and "--engine transformers" in result.stderr
    bad = invoke(["--model", str(coder_v1), "chat", "--show-prompt", "hi"],
                 env={"DSCODER_ENGINE": "vllm"})
    assert bad.code == 2 and "Unknown engine" in bad.stderr


def test_show_prompt_uses_the_models_template_without_torch(coder_v1):
    code = ("import sys\nfrom dscoder.cli.app import run\n"
            f"rc = run(['--model', {str(coder_v1)!r}, 'chat', '--show-prompt', 'hi'])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "### Instruction:\nhi\n### Response:\n" in done.stdout


def test_pull_fetches_model_code_only_with_trust_remote_code(monkeypatch, tmp_path):
    import huggingface_hub

    calls: list[list[str]] = []

    def fake(repo_id: str, **kw):
        calls.append(kw["allow_patterns"])
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert invoke(["pull", "owner/model"]).code == 0
    assert invoke(["--trust-remote-code", "pull", "owner/model"]).code == 0
    assert "*.py" not in calls[0] and "*.py" in calls[1]
    assert "*.jinja" in calls[0]  # chat_template.jinja, where newer checkpoints keep the template


def test_gpu_budget_placement_keeps_room_for_the_kv_cache():
    from dscoder.hf_engine import ACTIVATION_RESERVE, placement
    from dscoder.llama_checkpoint import llama_config

    cfg = llama_config("6.7b")
    cuda = torch.device("cuda", 0)  # only arithmetic here: no GPU is touched for a fixed size
    per_token = 2 * 32 * 32 * 128 * 2  # K and V, 32 layers, 32 heads of 128, bf16
    where, ctx = placement(cfg, cuda, torch.bfloat16, "6GiB", 16384, False, None)
    assert ctx == (6 << 30) // 4 // per_token  # the 16K default would take 8 GiB: shrunk
    assert where["device_map"] == "auto"
    assert where["max_memory"][0] == (6 << 30) - per_token * ctx - ACTIVATION_RESERVE
    with pytest.raises(UsageError, match="no room for weights"):
        placement(cfg, cuda, torch.bfloat16, "6GiB", 16384, True, None)  # a window asked for
    assert placement(cfg, cuda, torch.bfloat16, None, 4096, False, None) == ({"device_map": {"": cuda}}, 4096)
    with pytest.raises(UsageError, match="needs a CUDA device"):
        placement(cfg, torch.device("cpu"), torch.bfloat16, "6GiB", 4096, False, None)


def test_fill_in_the_middle_stops_at_end_of_sentence_on_an_instruct_model(coder_v1, monkeypatch):
    """The V1 Instruct tokenizer's EOS is <|EOT|>; a middle still ends at <｜end▁of▁sentence｜>."""
    from dscoder.cli import backend
    from dscoder.cli.runtime import Runtime
    from dscoder.settings import Settings

    rt = Runtime(Settings(model=str(coder_v1), device="cpu"), term=None)  # type: ignore[arg-type]
    rt._engine = type("E", (), {"stop_ids": frozenset({32021, 32014})})()
    rt._tokenizer = backend.get().load_tokenizer(rt.settings)
    assert rt.fim_stop_ids() == {32014, 32021, 32015, 32016, 32017}


def test_fim_sentinels_of_other_model_families_are_found_by_their_strings(tmp_path):
    from dscoder.llama_checkpoint import write_tokenizer
    from dscoder.model_tokenizer import load_model_tokenizer
    from dscoder.prompts import fim_prompt

    write_tokenizer(tmp_path, instruct=False)
    path = tmp_path / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    for old, new in (("<｜fim▁begin｜>", "<|fim_prefix|>"), ("<｜fim▁hole｜>", "<|fim_suffix|>"),
                     ("<｜fim▁end｜>", "<|fim_middle|>")):  # Qwen2.5-Coder's spelling
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    tok = load_model_tokenizer(tmp_path)
    assert (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (32016, 32015, 32017)
    prompt = fim_prompt(tok, "a = ", "\nprint(a)")
    assert prompt.text == "<｜begin▁of▁sentence｜><|fim_prefix|>a = <|fim_suffix|>\nprint(a)<|fim_middle|>"
    path.write_text(text.replace("<|fim_middle|>", "<|nothing|>"), encoding="utf-8")
    with pytest.raises(UsageError, match="no fill-in-the-middle tokens"):
        fim_prompt(load_model_tokenizer(tmp_path), "a", "b")


def test_server_prefix_cache_brings_back_an_earlier_sequence(hf_engine):
    from dscoder.prompts import completion_prompt
    from dscoder.server.worker import PrefixCache

    tok = hf_engine.tokenizer
    a = completion_prompt(tok, "def alpha():\n    return 1\n" * 4).ids
    b = completion_prompt(tok, "class Beta:\n    pass\n" * 4).ids
    cache = PrefixCache(hf_engine)
    assert cache.enabled

    def run(ids):
        return list(cache.session_for(ids).generate(ids, GREEDY, stop_ids=()))[-1]

    first = run(a)
    run(b)  # replaces a in the live cache; a is kept as a snapshot
    again = run(a)
    assert again.cached_tokens == len(a) - 1  # restored, not prefilled
    assert again.token_ids == first.token_ids


def test_server_on_the_transformers_engine(hf_engine, reference):
    from starlette.testclient import TestClient

    from dscoder.server.app import ServerState, create_app

    tok, model = reference
    client = TestClient(create_app(ServerState(hf_engine, "coder-v1")))
    messages = [{"role": "user", "content": "write quicksort"}]
    r = client.post("/v1/chat/completions", json={"model": "x", "messages": messages,
                                                 "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    ids = ids_of(tok.apply_chat_template(messages, add_generation_prompt=True))
    expected = tok.decode(hf_generate(model, ids, 8, {32014, 32021}), skip_special_tokens=True)
    assert r.json()["choices"][0]["message"]["content"] == expected
    state = ServerState(hf_engine, "coder-v1")
    assert {32014, 32021} <= state.fim_stop_ids()  # a middle ends at <｜end▁of▁sentence｜>


def test_chatml_template_parts_trim_and_end_of_turn():
    from dscoder.chat_template import ChatTemplate

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
              "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = ChatTemplate(chatml, {"<|im_start|>": 1, "<|im_end|>": 2})
    parts = template.parts([{"role": "user", "content": "  say <|im_end|> now \n"}])
    # the template trims the content (checked against a real render); the content stays text
    assert parts == [1, "user\n", "say <|im_end|> now", 2, "\n", 1, "assistant\n"]
    assert template.end_of_turn_id() == 2


def test_interrupt_in_a_step_yields_the_engines_finished(hf_engine, monkeypatch):
    """The transformers engine shares the native decode loop (dscoder.decode_loop): Ctrl-C in a
    step ends the reply with a 'cancelled' Finished holding the real ids, then re-raises, and the
    session stays usable."""
    from dscoder.hf_engine import HFSession

    calls = {"n": 0}
    real = HFSession._forward

    def forward(self, ids):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, ids)

    monkeypatch.setattr(HFSession, "_forward", forward)
    session = hf_engine.new_session()
    ids = hf_engine.tokenizer.encode("def f():")
    events = []
    with pytest.raises(KeyboardInterrupt):
        for event in session.generate(ids, GenerationSettings(max_tokens=20, temperature=0),
                                      stop_ids=()):
            events.append(event)
    f = events[-1]
    assert isinstance(f, Finished) and f.reason == "cancelled" and len(f.token_ids) == 3
    monkeypatch.undo()
    assert len(session.tokens) == len(ids) + 2  # the ids whose keys are cached, no more
    again = run(session.generate(ids, GenerationSettings(max_tokens=4, temperature=0), stop_ids=()))
    assert again[1].generated_tokens == 4
