"""blip/speed/linear.py: the packed CPU inference path (eval mode) gives F.linear's result and follows
weight changes, fused optimizers' included."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from blip.speed import linear as lin
from blip.speed.linear import Linear

pytestmark = pytest.mark.skipif(not lin.AVAILABLE, reason="this PyTorch has no oneDNN linear")


@pytest.fixture(autouse=True)
def packed_path_on(monkeypatch):
    """The packed path is tested on every CPU, also where it is not the default (Intel's)."""
    monkeypatch.setattr(lin, "ONEDNN", True)


def relative_error(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (3, 1, 64), (24, 64), (2, 577, 64), (0, 64)])
def test_packed_path_equals_f_linear(shape):
    torch.manual_seed(0)
    layer = Linear(64, 96).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    assert layer.packed.packed is not None  # the packed path ran
    assert y.shape == (*shape[:-1], 96) and y.is_contiguous()
    if x.numel():
        assert relative_error(y, F.linear(x, layer.weight, layer.bias)) <= 1e-6


def test_strided_input_and_no_bias():
    torch.manual_seed(0)
    layer = Linear(64, 32, bias=False).eval()
    x = torch.randn(5, 3, 128)[..., ::2].transpose(0, 1)  # neither contiguous nor row-major
    with torch.inference_mode():
        y = layer(x)
    assert relative_error(y, F.linear(x, layer.weight)) <= 1e-6


def test_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    layer = Linear(16, 8).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(2)  # in place: the version counter moves
        assert relative_error(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-6
        layer.weight.data = torch.randn(8, 16)  # new storage, same Parameter, version unchanged
        assert relative_error(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-6
    layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})
    with torch.no_grad():
        assert relative_error(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-6


def test_training_uses_autograd():
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.packed.packed is None  # gradients were recorded: plain F.linear
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(4, 16))
    assert torch.allclose(layer.weight.grad, x.detach().sum(0).expand(8, 16))


def test_autocast_gets_what_f_linear_gives():
    """Under CPU bf16 autocast F.linear computes in bf16; the packed fp32 path would return fp32 (what
    broke LoRA's in-place update on AMD CPUs), so it stands aside there."""
    torch.manual_seed(0)
    layer = Linear(64, 32).eval()
    x = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = layer(x), F.linear(x, layer.weight, layer.bias)
    assert layer.packed.packed is None and y.dtype == ref.dtype == torch.bfloat16 and torch.equal(y, ref)


def test_fused_optimizer_steps_are_seen_after_a_mode_switch():
    """AdamW(fused=True) changes weights without moving their version counters: the packed copy
    is only used in eval mode and is dropped when the mode changes, so evaluation after training
    sees the trained weights."""
    torch.manual_seed(0)
    layer = Linear(16, 8)
    x = torch.randn(4, 16)
    layer.eval()
    with torch.no_grad():
        layer(x)  # packed
    layer.train()
    assert layer.packed.packed is None
    with torch.no_grad():
        layer(x)
    assert layer.packed.packed is None  # training mode: plain F.linear, even without gradients
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    version = layer.weight._version
    layer(x).pow(2).sum().backward()
    opt.step()
    assert layer.weight._version == version  # what makes a version check alone miss the change
    layer.eval()
    with torch.no_grad():
        assert relative_error(layer(x), F.linear(x, layer.weight, layer.bias)) <= 1e-6


def test_copies_and_pickles_after_packing():
    layer = Linear(16, 8).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        y = layer(x)
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone.packed.packed is None
            assert torch.equal(clone(x), y)


def test_off_switch(monkeypatch):
    monkeypatch.setattr(lin, "ONEDNN", False)
    layer = Linear(16, 8).eval()
    with torch.no_grad():
        y = layer(torch.ones(1, 16))
    assert layer.packed.packed is None and torch.equal(y, F.linear(torch.ones(1, 16), layer.weight, layer.bias))
