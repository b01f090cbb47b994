"""Offloaded experts served from the page-locked shards (dscoder.offload.mapped), with the CUDA
driver faked (tests/fake_cuda.py: real mappings, recorded registrations). On a GPU:
tests/gpu/test_offload_gpu.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dscoder import page_lock
from dscoder.config import ModelConfig
from dscoder.engines import INDEX
from dscoder.offload.mapped import map_experts
from dscoder.weights import load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """The tiny checkpoint in shards of about 100 KB: its experts spread over many of them,
    and some experts' gate and up halves land in two."""
    from dscoder.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("many"), "tiny", seed=0,
                                   max_shard_bytes=100_000)


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("shards", ["tiny_checkpoint", "many_shards"])
def test_every_expert_is_its_checkpoint_tensors(fake_driver, shards, request):
    tiny_checkpoint = request.getfixturevalue(shards)
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    mapped = map_experts(tiny_checkpoint, cfg, torch.float32, 0)
    assert mapped is not None
    tensors = checkpoint_tensors(tiny_checkpoint)
    ranges = [(f.address, f.address + f.size) for f in mapped.files]
    copied = 0
    i = cfg.moe_intermediate_size
    for layer, views in mapped.w13.items():
        assert views.shape == (cfg.n_routed_experts, 2 * i, cfg.hidden_size)
        for e in range(cfg.n_routed_experts):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            assert torch.equal(views[e][:i], tensors[f"{prefix}.gate_proj.weight"])
            assert torch.equal(views[e][i:], tensors[f"{prefix}.up_proj.weight"])
            assert torch.equal(mapped.w2[layer][e], tensors[f"{prefix}.down_proj.weight"])
            copied += not any(a <= views[e].data_ptr() < b for a, b in ranges)
    index = json.loads((tiny_checkpoint / INDEX).read_text())["weight_map"]
    holding = {tiny_checkpoint / name for key, name in index.items() if ".experts." in key}
    assert sorted(f.path for f in mapped.files) == sorted(holding)
    assert len(fake_driver.registered) == len(holding)  # each shard with experts locked once, kept
    # split experts get a host copy of their w13, the others are views of the shards
    assert (copied > 0) == (shards == "many_shards") and copied < len(mapped.w13) * cfg.n_routed_experts
    mapped.close()
    assert fake_driver.registered == {}


def test_another_dtype_keeps_the_host_copy(fake_driver, tiny_checkpoint):
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    assert map_experts(tiny_checkpoint, cfg, torch.bfloat16, 0) is None  # the checkpoint is fp32
    assert fake_driver.registered == {}


def test_too_little_memory_keeps_the_host_copy(fake_driver, tiny_checkpoint, monkeypatch):
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    monkeypatch.setattr(page_lock, "_memory_bytes", lambda: 1 << 20)
    assert map_experts(tiny_checkpoint, cfg, torch.float32, 0) is None


def test_a_refused_lock_keeps_the_host_copy_and_unlocks_the_rest(fake_driver, many_shards):
    cfg = ModelConfig.from_file(many_shards / "config.json")
    index = json.loads((many_shards / INDEX).read_text())["weight_map"]
    last = many_shards / max(name for key, name in index.items() if ".experts." in key)
    fake_driver.refuse = {last.stat().st_size}
    assert map_experts(many_shards, cfg, torch.float32, 0) is None
    assert anything_registered(fake_driver) and fake_driver.registered == {}


def anything_registered(fake_driver) -> bool:
    return any(what == "register" for what, _ in fake_driver.log)


@torch.inference_mode()
def test_an_offloaded_model_on_mapped_experts_equals_the_resident_one(fake_driver, tiny_checkpoint):
    from dscoder.offload.setup import install_offload, release_offload

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    resident = load_model(tiny_checkpoint, cfg, device=CPU, dtype=torch.float32)
    resident.set_context(64)
    mapped = map_experts(tiny_checkpoint, cfg, torch.float32, 0)
    model = load_model(tiny_checkpoint, cfg, device=CPU, dtype=torch.float32,
                       expert_device=torch.device("meta"))  # the experts are not read
    install_offload(model, 5, CPU, mapped=mapped)
    model.set_context(64)
    ids = torch.arange(1, 25)
    assert torch.equal(model(ids, model.new_cache(64), 0, all_logits=True),
                       resident(ids, resident.new_cache(64), 0, all_logits=True))
    assert model.offload.stats.summary()["misses"] > 0
    release_offload(model)
    assert fake_driver.registered == {}  # the store's release unlocked the shards


def test_the_reader_borrows_a_kept_shard_instead_of_locking_it_again(fake_driver, tiny_checkpoint):
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    mapped = map_experts(tiny_checkpoint, cfg, torch.float32, 0)
    shard = mapped.files[0].path
    registrations = len(fake_driver.registered)
    borrowed = page_lock.lock(shard, 0)
    assert borrowed.address == next(f.address for f in mapped.files if f.path == shard)
    borrowed.close()  # leaves it locked for the experts
    assert len(fake_driver.registered) == registrations
    mapped.close()
    assert fake_driver.registered == {}


def test_a_second_model_on_the_same_shards_locks_them_itself(fake_driver, tiny_checkpoint):
    """Two engines on one checkpoint: releasing the first must not unlock the second's experts."""
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    first = map_experts(tiny_checkpoint, cfg, torch.float32, 0)
    second = map_experts(tiny_checkpoint, cfg, torch.float32, 0)
    assert {f.address for f in first.files}.isdisjoint(f.address for f in second.files)
    first.close()
    assert len(fake_driver.registered) == len(second.files)
    layer = next(iter(second.w2))
    assert second.w2[layer][0].sum().isfinite()  # still mapped
    second.close()
    assert fake_driver.registered == {} and not page_lock._KEPT
