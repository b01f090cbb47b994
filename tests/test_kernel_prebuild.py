"""Building the decode step's Triton kernels while the weights load: the launch point every
kernel goes through, its dry-run recording, and the loader's hook between allocating the
parameters and reading them. (Building on a GPU: tests/gpu/test_startup_gpu.py.)"""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from dscoder.config import ModelConfig
from dscoder.model.triton_launch import launch, recording
from dscoder.weights import load_model


class FakeKernel:
    """kernel[grid](*args, **kwargs) as Triton's JITFunction takes it; records the calls.
    constexpr: which positional parameters are constexprs (JITFunction.params)."""

    def __init__(self, constexpr: tuple[bool, ...] = ()) -> None:
        self.calls: list[tuple] = []
        self.params = [SimpleNamespace(is_constexpr=c) for c in constexpr]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def test_launch_runs_the_kernel_outside_a_recording():
    k, x = FakeKernel(), torch.zeros(4)
    launch(k, [2, 1], x, 7, BLOCK=4)
    assert k.calls == [((2, 1), (x, 7), {"BLOCK": 4})]


def test_a_recording_lists_each_specialization_once_and_runs_nothing():
    k, other = FakeKernel((False, False, True)), FakeKernel()
    a, b = torch.zeros(8), torch.ones(8)  # same dtype, both 16-byte aligned
    with recording() as rec:
        launch(k, (1,), a, 32, BLOCK=4)
        launch(k, (9,), b, 64, BLOCK=4)  # another grid, tensor and multiple of 16: same build
        launch(k, (1,), a.half(), 32, BLOCK=4)  # another dtype
        launch(k, (1,), a, 1, BLOCK=4)  # Triton makes an argument equal to 1 a constant
        launch(k, (1,), a, 33, BLOCK=4)  # not a multiple of 16
        launch(k, (1,), a, 1 << 40, BLOCK=4)  # a 64-bit integer
        launch(k, (1,), a[1:], 32, BLOCK=4)  # not 16-byte aligned
        launch(k, (1,), a, 32, BLOCK=8)  # another keyword constexpr
        launch(k, (1,), a, 32, 5, BLOCK=4)  # a positional constexpr
        launch(k, (1,), a, 32, 6, BLOCK=4)  # ... counts by its value
        launch(k, (1,), a, 32, 6, BLOCK=4)
        launch(other, (1,), a, 32, BLOCK=4)  # another kernel
    assert k.calls == [] and other.calls == []
    assert len(rec.launches) == 10
    first = rec.launches[0]
    assert (first.kernel, first.grid, first.args, first.kwargs) == (k, (1,), (a, 32), {"BLOCK": 4})


def test_a_recording_is_this_threads_alone():
    k = FakeKernel()
    with recording() as rec:
        worker = threading.Thread(target=launch, args=(k, (3,), torch.zeros(2)))
        worker.start()
        worker.join()
        with recording() as inner:  # nested: the inner one takes the launches, then the outer
            launch(k, (1,), torch.zeros(2))
        launch(k, (2,), torch.zeros(2, dtype=torch.int8))
    assert [c[0] for c in k.calls] == [(3,)]
    assert len(inner.launches) == 1 and len(rec.launches) == 1
    launch(k, (4,), torch.zeros(2))
    assert [c[0] for c in k.calls] == [(3,), (4,)]


def test_every_kernel_of_the_decode_step_launches_through_launch():
    """A dry run sees the launches of every kernel the decode and sampling steps use (called
    here on CPU tensors: under a recording nothing reaches Triton's launcher)."""
    pytest.importorskip("triton")
    from dscoder import sampling_kernel
    from dscoder.model import gemv, latent_row, mla_decode, route_kernel

    heads, rank, rope = 2, 32, 16
    with recording() as rec:
        x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(96, 64, dtype=torch.bfloat16)
        gemv.gemv(x, w)
        gemv.gemv(x, w[:64])  # another n_rows: a constexpr of the kernel
        gemv.gemv(x.clone(), w.clone())  # the first one again
        gemv.expert_gemv(x, w.view(3, 32, 64), torch.zeros(2, dtype=torch.long), 2)
        route_kernel._run(torch.zeros(1, 64), 6, False, 1.0)
        kv = torch.zeros(16, rank + rope, dtype=torch.bfloat16)
        latent_row._run(torch.zeros(1, rank + rope, dtype=torch.bfloat16),
                        torch.ones(rank, dtype=torch.bfloat16), 1e-6,
                        torch.zeros(1, rope // 2, 2), torch.zeros(1, dtype=torch.long), kv)
        mla_decode.absorbed_decode(torch.zeros(heads, 1, rank, dtype=torch.bfloat16),
                                   torch.zeros(heads, 1, rope, dtype=torch.bfloat16), kv,
                                   torch.zeros(1, dtype=torch.long), 0.1)
        sampling_kernel.exponential_noise(torch.zeros(1, dtype=torch.long),
                                          torch.zeros(1, dtype=torch.long), torch.arange(10))
    kernels = [launch.kernel for launch in rec.launches]
    assert kernels == [gemv._gemv, gemv._gemv, gemv._gemv, route_kernel._top_k, latent_row._latent_row,
                       mla_decode._mla_split, mla_decode._mla_combine, sampling_kernel._noise]
    assert rec.launches[0].kwargs["PRELOAD"] and not rec.launches[2].kwargs["PRELOAD"]


def test_the_loader_hook_sees_the_final_parameters_before_any_read(tiny_checkpoint, monkeypatch):
    from dscoder import weights

    events, seen = [], {}
    read = weights.read_parallel

    def reading(*args, **kwargs):
        events.append("read")
        return read(*args, **kwargs)

    def allocated(model):
        events.append("allocated")
        seen.update({name: p.data_ptr() for name, p in model.named_parameters()})

    monkeypatch.setattr(weights, "read_parallel", reading)
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32,
                       allocated=allocated)
    assert events == ["allocated", "read"]
    params = dict(model.named_parameters())
    assert seen == {name: p.data_ptr() for name, p in params.items()}  # the memory the reads filled
    plain = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    for name, p in plain.named_parameters():
        assert torch.equal(params[name], p), name


def test_the_loader_hook_waits_for_quantized_experts(tiny_checkpoint):
    """int8 experts get their memory after the reads: no dry run can see them before."""
    calls = []
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32,
                       expert_dtype="int8", allocated=calls.append)
    assert calls == []
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.int8


def test_a_recording_hands_each_new_launch_on_at_once():
    """The prebuild compiles a kernel as soon as the dry run reaches it, not after the run."""
    k, seen = FakeKernel(), []
    with recording(on_new=lambda launch: seen.append((launch.grid, len(k.calls)))) as rec:
        launch(k, (1,), torch.zeros(2))
        assert seen == [((1,), 0)]
        launch(k, (5,), torch.zeros(2))  # the same specialization: not again
        launch(k, (2,), torch.zeros(2, dtype=torch.int8))
    assert seen == [((1,), 0), ((2,), 0)] and len(rec.launches) == 2


def test_pieces_record_on_threads_of_their_own_into_one_recording():
    """Each piece on its own thread (their first CUDA calls load kernels side by side); one
    specialization is recorded once whichever thread met it, and nothing runs."""
    from dscoder.kernel_prebuild import record

    k, seen, threads = FakeKernel(), [], set()
    barrier = threading.Barrier(3, timeout=10)  # all three pieces running at once

    def piece(dtype):
        def run():
            threads.add(threading.get_ident())
            barrier.wait()
            launch(k, (1,), torch.zeros(2, dtype=dtype))
        return run

    launches = record([piece(torch.float32), piece(torch.float32), piece(torch.int8)], seen.append)
    assert len(launches) == 2 and sorted(str(launch.args[0].dtype) for launch in launches) == [
        "torch.float32", "torch.int8"]
    assert sorted(map(id, seen)) == sorted(map(id, launches))  # on_new: each new one, once
    assert len(threads) == 3 and threading.get_ident() not in threads and k.calls == []


def test_a_failing_piece_fails_the_record():
    from dscoder.kernel_prebuild import record

    def fails():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError, match="no"):
        record([lambda: None, fails])


def test_an_offloaded_dry_run_runs_each_segment_once_and_nothing_of_the_host_loop(tiny_checkpoint,
                                                                                   monkeypatch):
    """offloaded_steps: every decode segment (tiny's are each a kind of its own) at the first
    graph's rows, then a sampled step, and nothing that reads a routed id on the host (no slot
    acquired, no copy, no prefetch): under a recording on a GPU the routing kernels do not run,
    so those ids are garbage."""

    from dscoder.kernel_prebuild import offloaded_steps, record
    from dscoder.offload.decoder import OffloadedDecoder
    from dscoder.offload.setup import install_offload

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    install_offload(model, 6, torch.device("cpu"))
    model.set_context(512)
    decoder = OffloadedDecoder(model, model.offload, model.new_cache(512), ahead=1, graphs=False)
    ran, segment = [], decoder.segment
    monkeypatch.setattr(decoder, "segment", lambda j, visible: (ran.append((j, visible)), segment(j, visible)))
    for name in ("acquire", "prefetch", "wait"):
        monkeypatch.setattr(model.offload.cache, name, lambda *a, **k: pytest.fail("the host loop ran"))
    before = model.offload.stats.summary()
    assert record(offloaded_steps(decoder, 0)) == []  # no Triton kernel on the CPU
    assert ran == [(j, decoder.rows(0)) for j in range(decoder.segments)]
    assert decoder.segments == len(decoder.moe) + 1 >= 3
    assert model.offload.stats.summary() == before


def test_the_resident_dry_run_runs_one_layer_of_each_kind(tiny_checkpoint):
    """Layers of a kind launch the same kernels alike: the dry run needs one of each (tiny, like
    Lite: a dense first layer, then MoE layers), and only those run."""
    from dscoder.kernel_prebuild import kinds, record, resident_steps

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    model.set_context(64)
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers >= 3
    assert kinds(model) == [0, 1]
    ran = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, out, i=i: ran.append(i))
    pieces = resident_steps(model, 16)
    assert len(pieces) == 5  # a decode step and a one-token prompt per kind, two-token prompts
    assert record(pieces) == []  # no Triton kernel on the CPU
    assert sorted(ran) == [0] * 3 + [1] * 3  # a decode step, a one-token and a two-token prompt


def test_a_layer_unlike_the_others_is_a_kind_of_its_own(tiny_checkpoint):
    from dscoder.kernel_prebuild import kinds

    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    last = model.model.layers[-1]
    last.input_layernorm.weight.data = last.input_layernorm.weight.data.to(torch.bfloat16)
    assert kinds(model) == [0, 1, cfg.num_hidden_layers - 1]


def test_a_run_through_some_layers_is_the_model_cut_to_them(tiny_checkpoint):
    """Transformer.run's layers: those layers, in that order, with their own cache rows."""
    cfg = ModelConfig.from_file(tiny_checkpoint / "config.json")
    model = load_model(tiny_checkpoint, cfg, device=torch.device("cpu"), dtype=torch.float32)
    model.set_context(64)
    ids = torch.tensor([5, 9, 2])
    full, every = model.new_cache(64), model.new_cache(64)
    assert torch.equal(model(ids, full, 0), model(ids, every, 0, layers=range(cfg.num_hidden_layers)))
    some = model.new_cache(64)
    cut = model(ids, some, 0, layers=[0, 2])
    assert not torch.equal(cut, model(ids, model.new_cache(64), 0))
    assert some.layer(1).abs().sum() == 0 and some.layer(2).abs().sum() > 0
    del model.model.layers[1]
    assert torch.allclose(cut, model(ids, model.new_cache(64), 0))


def _six_layer_decoder(path, ahead: int):
    from dscoder.offload.decoder import OffloadedDecoder
    from dscoder.offload.setup import install_offload

    cfg = ModelConfig.from_file(path / "config.json")
    model = load_model(path, cfg, device=torch.device("cpu"), dtype=torch.float32)
    install_offload(model, 6, torch.device("cpu"))
    model.set_context(512)
    return OffloadedDecoder(model, model.offload, model.new_cache(512), ahead=ahead, graphs=False)


def test_the_offloaded_dry_run_runs_one_segment_of_each_kind(six_layer_checkpoint, monkeypatch):
    """Six layers (a dense one, five MoE): the embedding's segment, one of the three alike in
    between, the one that routes the last MoE layer (no router runs ahead of it), and the
    logits' segment."""
    from dscoder.kernel_prebuild import kinds, offloaded_steps, record, segment_kinds

    decoder = _six_layer_decoder(six_layer_checkpoint, ahead=1)
    assert kinds(decoder.model) == [0, 1] and decoder.segments == 6
    assert segment_kinds(decoder) == [0, 1, 4, 5]
    ran, segment = [], decoder.segment
    monkeypatch.setattr(decoder, "segment", lambda j, visible: (ran.append(j), segment(j, visible)))
    record(offloaded_steps(decoder, 0))
    assert ran == [0, 1, 4, 5]


def test_segments_differ_by_their_routing_rows_alignment_and_later_routers(six_layer_checkpoint):
    """What a Triton kernel specializes on besides the layers: the alignment of the segment's
    rows of the routing buffers (found on an H100: a _gemv built inside the capture when all
    alike-layered segments were taken as one), and fewer routers run ahead near the end."""
    from dscoder.kernel_prebuild import segment_kinds

    decoder = _six_layer_decoder(six_layer_checkpoint, ahead=2)
    assert segment_kinds(decoder) == [0, 1, 3, 4, 5]  # 3 runs one router ahead, not two
    decoder = _six_layer_decoder(six_layer_checkpoint, ahead=1)
    n, k = decoder.route_w.shape
    decoder.route_w = torch.zeros(n, k + 2)[:, :k]  # rows 24 bytes apart: aligned, then not
    assert segment_kinds(decoder) == [0, 1, 2, 4, 5]
