"""Damaged and unsupported checkpoints each give one clear error naming what is wrong."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
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


def test_load_progress_moves_with_every_tensor(tiny_checkpoint):
    """The loading bar shows bytes read as they are read, not 0 until a whole shard is done."""
    import torch

    from dscoder.config import ModelConfig
    from dscoder.weights import load_model, shard_index

    calls: list[tuple[int, int]] = []
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32,
               progress=lambda done, total: calls.append((done, total)))
    shards = set(shard_index(tiny_checkpoint).values())
    total = calls[-1][1]
    assert calls[-1] == (total, total) and len(calls) > 10 * len(shards)
    assert all(0 <= d <= total for d, _ in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)  # never goes back
