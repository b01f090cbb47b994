"""A decode token's softmax and top k in one kernel (dscoder.model.route_kernel) against the
router's torch path (dscoder.model.moe.Router), on the CPU under Triton's interpreter (a child process, see
tests/triton_interpreter.py). Skipped without triton."""
from __future__ import annotations

import json
import os

import pytest
import torch
from triton_interpreter import run_under_interpreter

# (experts, hidden, k, norm_topk_prob, routed_scaling_factor): Lite's 64 experts and 6 picks
# with a hidden size that leaves a partial last tile; and experts that are not a power of two
CASES = {"lite": (64, 200, 6, False, 1.0), "scaled": (64, 200, 6, False, 2.5),
         "normalised": (48, 64, 4, True, 1.0)}


def router(experts: int, hidden: int, k: int, norm: bool, scaling: float):
    from dscoder.config import ModelConfig
    from dscoder.model.moe import Router
    from dscoder.random_checkpoint import TINY

    cfg = ModelConfig.from_dict({**TINY, "hidden_size": hidden, "n_routed_experts": experts,
                                 "num_experts_per_tok": k, "norm_topk_prob": norm,
                                 "routed_scaling_factor": scaling, "topk_method": "greedy"})
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.3)
    return r


def run_cases() -> dict[str, float]:
    from unittest import mock

    from dscoder.model import route_kernel

    out: dict[str, float] = {}
    torch.manual_seed(0)
    with torch.no_grad():
        for name, (e, h, k, norm, scaling) in CASES.items():
            r = router(e, h, k, norm, scaling)
            for dt in (torch.float32, torch.bfloat16):
                key = f"{name}-{str(dt)[6:]}"
                x = torch.randn(1, h).to(dt)
                logits = torch.nn.functional.linear(x.float(), r.weight.to(dt).float())
                ids, weights = route_kernel.top_k(logits, k, norm, scaling)
                with mock.patch.object(route_kernel, "available", lambda *a: False):
                    want_ids, want_w = r.to(dt)(x)  # the torch path: F.linear, softmax, topk
                r.float()
                order = want_w[0].argsort(descending=True)
                out[f"{key}-same-experts"] = float(ids[0].tolist() == want_ids[0, order].tolist())
                out[f"{key}-weights"] = float((weights[0] - want_w[0, order]).abs().max())
                out[f"{key}-decreasing"] = float(bool((weights[0, :-1] >= weights[0, 1:]).all()))
                out[f"{key}-dtypes"] = float(ids.dtype == torch.int64 and weights.dtype == torch.float32)
        # the layer's router takes the kernel where it is available (a GPU), compiled or not
        e, h, k, norm, scaling = CASES["lite"]
        r, x = router(e, h, k, norm, scaling), torch.randn(1, h)
        with mock.patch.object(route_kernel, "available", lambda *a: True):
            ids, weights = r(x)
            route_kernel.register_op()
            c_ids, c_weights = torch.compile(r, backend="eager", fullgraph=True)(x)
        # eager the logits by F.linear, compiled as a sum (one reduction kernel): the same kernel after
        k_ids, k_weights = route_kernel.top_k(torch.nn.functional.linear(x, r.weight), k, norm, scaling)
        out["module-takes-kernel"] = float(torch.equal(ids, k_ids) and torch.equal(weights, k_weights))
        k_ids, k_weights = route_kernel.top_k((x * r.weight).sum(dim=-1)[None], k, norm, scaling)
        out["compiled-takes-kernel"] = float(torch.equal(c_ids, k_ids) and torch.equal(c_weights, k_weights))
    return out


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_under_interpreter(__file__)


@pytest.mark.parametrize("case", [f"{c}-{d}" for c in CASES for d in ("float32", "bfloat16")])
def test_the_kernel_routes_as_the_torch_path(interpreted, case):
    """The same experts, in decreasing order of weight, with the same weights (within 1e-6),
    ids int64 and weights fp32 as the torch path gives them."""
    assert interpreted[f"{case}-same-experts"] == 1.0
    assert interpreted[f"{case}-weights"] < 1e-6
    assert interpreted[f"{case}-decreasing"] == 1.0
    assert interpreted[f"{case}-dtypes"] == 1.0


def test_the_router_calls_the_kernel_compiled_or_not(interpreted):
    assert interpreted["module-takes-kernel"] == 1.0
    assert interpreted["compiled-takes-kernel"] == 1.0


def test_not_taken_on_the_cpu():
    from dscoder.model import route_kernel

    assert not route_kernel.available(torch.zeros(1, 64), 6)


if __name__ == "__main__":  # the child process
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_cases()))
