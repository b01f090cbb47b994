"""Damaged and unsupported checkpoints each give one clear error naming what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from privileges import unprivileged
from safetensors.torch import load_file, save_file

from dscoder.config import ModelConfig
from dscoder.errors import BadCheckpoint, UnsupportedConfig
from dscoder.weights import INDEX, load_model


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def load(path: Path):
    cfg = ModelConfig.from_file(path / "config.json")
    return load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32)


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def test_checkpoint_is_sharded_and_loads(ckpt):
    assert len(shards(ckpt)) > 1
    model = load(ckpt)
    assert model.model.layers[1].mlp.experts.w13.shape == (8, 64, 64)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_experts_are_stacked_in_order(ckpt):
    model = load(ckpt)
    index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    up = load_file(ckpt / index[key])[key]
    assert torch.equal(model.model.layers[2].mlp.experts.w13[5, 32:], up)


def test_missing_shard(ckpt):
    victim = shards(ckpt)[-1]
    victim.unlink()
    with pytest.raises(BadCheckpoint, match=victim.name + ".*missing"):
        load(ckpt)


def test_truncated_shard(ckpt):
    victim = shards(ckpt)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadCheckpoint, match=victim.name):
        load(ckpt)


def test_wrong_shape_names_file_and_tensor(ckpt):
    index = json.loads((ckpt / INDEX).read_text())["weight_map"]
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    path = ckpt / index[key]
    tensors = load_file(path)
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(BadCheckpoint, match=rf"{key}.*{path.name}.*\[3, 3\]"):
        load(ckpt)


def test_missing_tensor(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    del index["weight_map"]["model.norm.weight"]
    (ckpt / INDEX).write_text(json.dumps(index))
    with pytest.raises(BadCheckpoint, match="model.norm.weight"):
        load(ckpt)


@pytest.mark.parametrize("field,value,words", [
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling type 'dynamic'"),
    ("scoring_func", "sigmoid", "scoring_func 'sigmoid'"),
    ("topk_method", "noaux_tc", "topk_method 'noaux_tc'"),
])
def test_unsupported_config_values(ckpt, field, value, words):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfig, match=words):
        ModelConfig.from_file(ckpt / "config.json")


def test_config_reads_the_lite_values():
    from dscoder.random_checkpoint import LITE

    cfg = ModelConfig.from_dict(LITE)
    assert cfg.kv_cache_dim == 576 and cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
    # 192 ** -0.5 * m**2, m = 0.1 * 0.707 * ln(40) + 1
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.0707 * 3.6888794541139363 + 1) ** 2)


def test_load_progress_counts_bytes_up_to_the_total(tiny_checkpoint):
    """The loading bar's numbers: bytes read so far (never back, never past the total), ending
    at the total, so the bar fills as the weights are read (the reader reports every 0.2 s)."""
    import torch

    from dscoder.config import ModelConfig
    from dscoder.weights import load_model

    calls: list[tuple[int, int]] = []
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32,
               progress=lambda done, total: calls.append((done, total)))
    total = calls[-1][1]
    assert total > 0 and calls[-1] == (total, total)
    assert all(0 < d <= t == total for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # never goes back


def test_unreadable_shard_says_so(tiny_checkpoint):
    import os
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dscoder-perm-"))
    try:
        os.chmod(d, 0o755)
        shutil.copytree(tiny_checkpoint, d / "ckpt")
        os.chmod(d / "ckpt", 0o755)
        for p in (d / "ckpt").iterdir():
            os.chmod(p, 0o644)
        victim = shards(d / "ckpt")[0]
        os.chmod(victim, 0)
        msg = unprivileged(lambda: load(d / "ckpt"))
        assert msg.startswith("BadCheckpoint: Cannot read the checkpoint shard"), msg
        assert victim.name in msg and "permission denied" in msg
        assert "damaged" not in msg and "No such file" not in msg
    finally:
        shutil.rmtree(d)


def test_config_with_fewer_layers_than_the_tensors_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadCheckpoint, match="tensors for 3 layers but its config.json says "
                                            "num_hidden_layers is 2"):
        load(ckpt)


def test_config_with_more_layers_than_the_tensors_is_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadCheckpoint, match="tensors for 3 layers .* num_hidden_layers is 4"):
        load(ckpt)


def test_tensors_the_config_does_not_use_are_refused(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_routed_experts"] = 7  # the checkpoint holds 8 experts per layer
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadCheckpoint, match=r"experts\.7\..* that its config.json does not use"):
        load(ckpt)


def test_rotary_inv_freq_buffers_are_tolerated(ckpt):
    index = json.loads((ckpt / INDEX).read_text())
    first = shards(ckpt)[0]
    tensors = load_file(first)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, first)
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = first.name
    (ckpt / INDEX).write_text(json.dumps(index))
    load(ckpt)


def test_unreadable_index(ckpt):
    (ckpt / INDEX).write_text("[1, 2]")
    with pytest.raises(BadCheckpoint, match="not a valid safetensors index"):
        load(ckpt)


@pytest.mark.parametrize("data,words", [
    ({"temperature": "0.3"}, r"temperature must be 0 or more, not '0.3'\."),
    ({"top_p": 0}, "top_p must be above 0"),
    ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ([1, 2], "holds a JSON list"),
    ("{", "Cannot read"),
])
def test_bad_generation_config(tmp_path, data, words):
    from dscoder.loader import generation_defaults

    path = tmp_path / "generation_config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(BadCheckpoint, match=words):
        generation_defaults(tmp_path)


def test_missing_generation_config_means_defaults(tmp_path):
    from dscoder.events import GenerationSettings
    from dscoder.loader import generation_defaults

    assert generation_defaults(tmp_path) == GenerationSettings()


def test_a_random_checkpoint_that_fails_half_way_has_no_index(tmp_path, monkeypatch):
    """The benchmarks reuse a directory with an index: one whose writing failed must not have it."""
    import dscoder.random_checkpoint as rc
    from dscoder.errors import DscoderError
    from dscoder.weights import INDEX

    def no_package(dst):
        raise DscoderError("Writing a random checkpoint needs the real tokenizer")

    monkeypatch.setattr(rc, "write_tokenizer_files", no_package)
    with pytest.raises(DscoderError):
        rc.write_random_checkpoint(tmp_path / "a", "tiny")
    assert list((tmp_path / "a").iterdir()) == []  # failed before any shard was written

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rc, "write_tokenizer_files", lambda dst: None)
    monkeypatch.setattr(rc, "save_file", full_disk)
    with pytest.raises(OSError):
        rc.write_random_checkpoint(tmp_path / "b", "tiny")
    assert not (tmp_path / "b" / INDEX).exists()
