"""When the decode kernels launch with programmatic dependent launch (dscoder.model.pdl)."""
from __future__ import annotations

import pytest
import torch

from dscoder.model import pdl


@pytest.fixture
def cuda_capability(monkeypatch):
    """Pretend to be on a CUDA device of the capability the test sets (no GPU here)."""
    monkeypatch.setattr(pdl, "_CAPABLE", {})
    monkeypatch.setattr(pdl, "_INTERPRET", False)
    monkeypatch.setattr(pdl, "SWITCH", True)
    monkeypatch.setattr(pdl, "_triton_has_pdl", True)
    major = {"value": 9}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (major["value"], 0))
    return major


def test_on_hopper_and_later_only(cuda_capability):
    assert pdl.enabled(torch.device("cuda", 0))
    assert pdl.launch_options(torch.device("cuda", 0)) == {"launch_pdl": True}
    pdl._CAPABLE.clear()
    cuda_capability["value"] = 8  # an A100: griddepcontrol does not exist there
    assert not pdl.enabled(torch.device("cuda", 0))
    assert pdl.launch_options(torch.device("cuda", 0)) == {}


def test_never_on_the_cpu_under_the_interpreter_or_switched_off(cuda_capability, monkeypatch):
    assert not pdl.enabled(torch.device("cpu"))
    monkeypatch.setattr(pdl, "_INTERPRET", True)
    assert not pdl.enabled(torch.device("cuda", 0))
    monkeypatch.setattr(pdl, "_INTERPRET", False)
    monkeypatch.setattr(pdl, "SWITCH", False)  # DSCODER_PDL=0
    assert not pdl.enabled(torch.device("cuda", 0))
    assert pdl.inductor_options() == {}


def test_not_with_a_triton_that_cannot_launch_with_it(cuda_capability, monkeypatch):
    monkeypatch.setattr(pdl, "_triton_has_pdl", False)  # Triton 3.2: no gdc_wait, no launch_pdl
    assert not pdl.enabled(torch.device("cuda", 0))


def test_the_installed_triton_is_asked_once(monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(pdl, "_triton_has_pdl", None)
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert pdl._triton_supports() is ((major, minor) >= (3, 4))  # in 3.4, not in 3.3.0
    monkeypatch.setattr(pdl, "_triton_has_pdl", "cached")  # a second call reads the answer
    assert pdl._triton_supports() == "cached"


def test_inductor_gets_it_through_this_compile_s_options(monkeypatch):
    """An option of the decode step's compile, not a change to Inductor's global config."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(pdl, "SWITCH", True)
    monkeypatch.setattr(pdl, "_triton_has_pdl", True)
    before = inductor_config.triton.enable_pdl
    assert pdl.inductor_options() == {"triton.enable_pdl": True}
    assert inductor_config.triton.enable_pdl == before
