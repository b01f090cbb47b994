"""config.json: both rope layouts, refusal of what we do not implement, one sentence per problem."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from dscoder.config import ModelConfig
from dscoder.errors import BadCheckpoint, UnsupportedConfig
from dscoder.random_checkpoint import LITE, TINY


def cfg_with(**changes) -> dict:
    d = copy.deepcopy(TINY)
    d.update(changes)
    return d


def transformers5_config() -> dict:
    """TINY as transformers 5 writes it: YaRN under rope_parameters, rope_theta inside."""
    d = cfg_with(head_dim=8, qk_head_dim=24, mlp_bias=False, dtype="float32",
                 output_router_logits=False, pad_token_id=None)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta"), d.pop("torch_dtype")
    d["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000}
    return d


def test_rope_parameters_and_rope_scaling_give_the_same_config():
    old, new = ModelConfig.from_dict(cfg_with()), ModelConfig.from_dict(transformers5_config())
    assert new.rope_scaling is not None and new.rope_scaling == old.rope_scaling
    assert new.rope_theta == old.rope_theta and new.softmax_scale == old.softmax_scale


def test_rope_theta_inside_rope_parameters_is_read():
    d = transformers5_config()
    d["rope_parameters"]["rope_theta"] = 50000.0
    assert ModelConfig.from_dict(d).rope_theta == 50000.0


def test_default_rope_parameters_mean_no_yarn():
    d = transformers5_config()
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000}
    c = ModelConfig.from_dict(d)
    assert c.rope_scaling is None and c.rope_theta == 20000


def test_mscale_absent_follows_transformers():
    # transformers scales cos/sin by yarn_mscale(factor) unless both mscale and mscale_all_dim
    from dscoder.model.rope import inv_freq_and_scale

    d = cfg_with(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 32,
                               "mscale_all_dim": 0.707})
    _, scale = inv_freq_and_scale(ModelConfig.from_dict(d))
    assert scale == pytest.approx(0.1 * torch.log(torch.tensor(40.0)).item() + 1)


@pytest.mark.parametrize("changes,words", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters type 'dynamic'"),
    ({"rope_scaling": {**TINY["rope_scaling"], "attention_factor": 1.2}}, "rope_scaling.attention_factor"),
    ({"rope_scaling": {**TINY["rope_scaling"], "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"sliding_window": 4096}, "sliding_window"),
])
def test_numerics_we_do_not_implement_are_refused(changes, words):
    with pytest.raises(UnsupportedConfig, match=words):
        ModelConfig.from_dict(cfg_with(**changes))


def test_rope_keys_at_their_neutral_values_are_accepted():
    rs = {**TINY["rope_scaling"], "partial_rotary_factor": 1.0, "truncate": True,
          "attention_factor": None}
    assert ModelConfig.from_dict(cfg_with(rope_scaling=rs)).rope_scaling == \
        ModelConfig.from_dict(cfg_with()).rope_scaling
    with pytest.raises(UnsupportedConfig, match="truncate"):
        ModelConfig.from_dict(cfg_with(rope_scaling={**rs, "truncate": False}))


def test_inert_and_private_fields_are_accepted():
    ModelConfig.from_dict(cfg_with(auto_map={}, _name_or_path="x", ep_size=1, transformers_version="4"))


@pytest.mark.parametrize("changes,words", [
    ({"num_hidden_layers": "3"}, r"num_hidden_layers must be a whole number, not '3'\."),
    ({"num_hidden_layers": -1}, r"num_hidden_layers must be at least 1, not -1\."),
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok \(9\) must be between 1 and n_routed_experts \(8\)"),
    ({"max_position_embeddings": 0}, r"max_position_embeddings must be at least 2, not 0\."),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a positive number"),
    ({"norm_topk_prob": "false"}, "norm_topk_prob must be true or false"),
    ({"rope_theta": 0}, "rope_theta must be a positive number"),
    ({"torch_dtype": "int8"}, "torch_dtype must be one of"),
    ({"eos_token_id": 200000}, r"eos_token_id \(200000\) is not below vocab_size"),
    ({"head_dim": 64}, "head_dim"),
    ({"topk_method": "group_limited_greedy", "n_group": 3}, "multiple of n_group"),
])
def test_bad_values_get_one_sentence(changes, words):
    with pytest.raises(BadCheckpoint, match=words) as e:
        ModelConfig.from_dict(cfg_with(**changes))
    assert not isinstance(e.value, UnsupportedConfig)


def test_every_problem_is_listed_and_the_file_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg_with(hidden_size="64", num_hidden_layers=-2)))
    with pytest.raises(BadCheckpoint) as e:
        ModelConfig.from_file(path)
    msg = e.value.message
    assert str(path) in msg and "hidden_size must be" in msg and "num_hidden_layers must be" in msg
    assert "--context-length" not in msg


@pytest.mark.parametrize("data,words", [([1, 2], "JSON list"), ("x", "JSON string")])
def test_config_that_is_not_an_object(tmp_path, data, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BadCheckpoint, match=words):
        ModelConfig.from_file(path)


def test_missing_field_is_named():
    d = cfg_with()
    del d["kv_lora_rank"]
    with pytest.raises(BadCheckpoint, match="'kv_lora_rank' is missing"):
        ModelConfig.from_dict(d)


def test_released_configs_are_accepted():
    ModelConfig.from_dict(LITE)
    ModelConfig.from_dict(LITE | {"auto_map": {"AutoConfig": "x"}})


def test_transformers5_checkpoint_matches_transformers(tmp_path):
    """A checkpoint saved by transformers 5 (rope_parameters) gives transformers' logits."""
    transformers = pytest.importorskip("transformers")
    from dscoder.weights import load_model

    d = {k: v for k, v in TINY.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(0)
    ref = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**d)).eval()
    ref.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved  # the layout under test
    cfg = ModelConfig.from_file(tmp_path / "config.json")
    ours = load_model(tmp_path, cfg, device=torch.device("cpu"), dtype=torch.float32)
    ours.set_context(512)
    ids = torch.randint(0, 100000, (96,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0]
        got = ours(ids, ours.new_cache(512), 0, all_logits=True)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
