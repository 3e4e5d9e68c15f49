"""capsnet.conv: the rewritten convolution gradients equal PyTorch's (float64), on every path,
and ``auto`` times each shape once."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from capsnet import conv as conv_module
from capsnet.conv import (
    chosen_backward,
    conv2d,
    conv_backward,
    input_grad_by_phases,
    remember_backward,
    weight_grad_as_conv,
)
from capsnet.layers import PrimaryCapsules

# (input shape, weight shape, stride): the PrimaryCaps shape with few channels; rows and columns
# that no tap reads; a kernel smaller than the stride (a phase without taps); stride 1.
SHAPES = [
    ((2, 5, 20, 20), (6, 5, 9, 9), 2),
    ((3, 4, 11, 13), (5, 4, 3, 3), 3),
    ((2, 3, 8, 7), (4, 3, 2, 2), 3),
    ((2, 3, 6, 6), (4, 3, 3, 3), 1),
]
PATHS = [("phases", "convolution"), ("phases", "native"), ("native", "convolution")]


def _tensors(x_shape, w_shape, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator, dtype=dtype, requires_grad=True)
    w = torch.randn(w_shape, generator=generator, dtype=dtype, requires_grad=True)
    b = torch.randn(w_shape[0], generator=generator, dtype=dtype, requires_grad=True)
    return x, w, b


def _grads(out: torch.Tensor, tensors) -> list[torch.Tensor]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return list(torch.autograd.grad(out, tensors, upstream))


@pytest.mark.parametrize(("x_shape", "w_shape", "stride"), SHAPES)
@pytest.mark.parametrize("paths", PATHS)
def test_gradients_equal_native_in_float64(x_shape, w_shape, stride, paths):
    x, w, b = _tensors(x_shape, w_shape)
    expected = _grads(F.conv2d(x, w, b, stride), (x, w, b))
    out = conv_module.Conv2dFunction.apply(x, w, b, stride, paths)
    torch.testing.assert_close(out, F.conv2d(x, w, b, stride), rtol=0, atol=0)
    for got, want in zip(_grads(out, (x, w, b)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("x_shape", "w_shape", "stride"), SHAPES)
def test_helpers_match_autograd(x_shape, w_shape, stride):
    x, w, _ = _tensors(x_shape, w_shape)
    out = F.conv2d(x, w, stride=stride)
    g = torch.randn_like(out)
    want_x, want_w = torch.autograd.grad(out, (x, w), g)
    with torch.no_grad():
        got_x = input_grad_by_phases(g, w, stride, x.shape)
        got_w = weight_grad_as_conv(x, g, w.shape[-2:], stride)
    torch.testing.assert_close(got_x, want_x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, w, b = _tensors((2, 2, 7, 7), (3, 2, 3, 3))
    with conv_backward("convolutions"):
        assert torch.autograd.gradcheck(lambda *t: conv2d(*t, stride=2), (x, w, b))


def test_only_the_gradients_asked_for():
    x, w, b = _tensors((2, 3, 9, 9), (4, 3, 3, 3))
    x.requires_grad_(False)
    with conv_backward("convolutions"):
        grad_w, grad_b = _grads(conv2d(x, w, b, 2), (w, b))
    want_w, want_b = _grads(F.conv2d(x, w, b, 2), (w, b))
    torch.testing.assert_close(grad_w, want_w)
    torch.testing.assert_close(grad_b, want_b)


def test_bf16_autocast_matches_native_autocast():
    x, w, b = _tensors((4, 8, 20, 20), (16, 8, 9, 9), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out = F.conv2d(x, w, b, 2)
        with conv_backward("convolutions"):
            out = conv2d(x, w, b, 2)
    assert out.dtype == want_out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    got, want = _grads(out.float(), (x, w, b)), _grads(want_out.float(), (x, w, b))
    for g, expected in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_auto_times_each_shape_once(monkeypatch):
    monkeypatch.setattr(conv_module, "_chosen", {})
    x, w, b = _tensors((2, 4, 12, 12), (6, 4, 5, 5), torch.float32)
    with torch.no_grad():
        conv2d(x, w, b, 2)
    assert chosen_backward() == []  # nothing to choose without gradients
    state = torch.get_rng_state()
    with conv_backward("auto"):
        out = conv2d(x, w, b, 2)
        conv2d(x[:1], w, b, 2)  # same shape but the batch: chosen already
    assert torch.equal(torch.get_rng_state(), state)  # timing draws no random numbers
    (choice,) = chosen_backward()
    assert set(choice["seconds"]["input"]) == {"native", "phases"}
    assert set(choice["seconds"]["weight"]) == {"native", "convolution"}
    assert choice["input_gradient"] in choice["seconds"]["input"]
    assert choice["weight_gradient"] in choice["seconds"]["weight"]
    assert all(t > 0 for way in choice["seconds"].values() for t in way.values())
    assert (choice["dtype"], choice["input_shape"], choice["stride"]) == ("float32", [2, 4, 12, 12], 2)
    want = _grads(F.conv2d(x, w, b, 2), (x, w, b))
    for got, expected in zip(_grads(out, (x, w, b)), want, strict=True):
        torch.testing.assert_close(got, expected)
    with conv_backward("auto"):  # an image needs no gradient: only the weight's is timed
        strided = conv2d(x.detach(), w, b, 2)
    assert set(chosen_backward()[1]["seconds"]) == {"weight"}
    torch.testing.assert_close(_grads(strided, (w,))[0], _grads(F.conv2d(x.detach(), w, b, 2), (w,))[0])


def test_bad_mode_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="must be one of auto, native, convolutions"), conv_backward("fast"):
        pass
    monkeypatch.setattr(conv_module, "_mode", "fastest")
    x, w, _ = _tensors((1, 1, 5, 5), (1, 1, 3, 3))
    with pytest.raises(ValueError, match="CAPSNET_CONV_BACKWARD must be one of"):
        conv2d(x, w)


def test_primary_capsules_train_the_same_either_way():
    torch.manual_seed(0)
    layer = PrimaryCapsules(in_channels=6, capsule_types=2, capsule_dim=4).double()
    x = torch.randn(3, 6, 20, 20, dtype=torch.float64, requires_grad=True)
    results = []
    for mode in ("native", "convolutions"):
        with conv_backward(mode):
            out = layer(x)
        results.append([out, *_grads(out, (x, layer.conv.weight, layer.conv.bias))])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_remembered_choices_are_used_not_timed(monkeypatch):
    monkeypatch.setattr(conv_module, "_chosen", {})
    x, w, b = _tensors((2, 4, 12, 12), (6, 4, 5, 5), torch.float32)
    seconds = {"input": {"native": 2.0, "phases": 1.0}, "weight": {"native": 1.0, "convolution": 2.0}}
    recorded = {
        "dtype": "float32",
        "input_shape": [8, 4, 12, 12],
        "weight_shape": [6, 4, 5, 5],
        "stride": 2,
        "threads": torch.get_num_threads(),
        "input_gradient": "phases",
        "weight_gradient": "native",
        "seconds": seconds,
    }
    remember_backward([recorded])
    monkeypatch.setattr(conv_module, "_choose", lambda *args: pytest.fail("timed again"))
    with conv_backward("auto"):
        assert conv_module._paths(x, w, 2) == ("phases", "native")
    assert chosen_backward() == [recorded]


def _timing_counter(monkeypatch) -> list[int]:
    """Count the calls of the timing function (which still runs)."""
    calls = [0]
    real = conv_module._choose

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(conv_module, "_choose", counted)
    return calls


def test_choices_persist_between_processes_on_one_machine(monkeypatch, tmp_path):
    cache = tmp_path / "cache" / "conv-backward.json"
    monkeypatch.setenv("CAPSNET_CONV_CACHE", str(cache))
    monkeypatch.setattr(conv_module, "_chosen", {})
    x, w, _ = _tensors((2, 4, 12, 12), (6, 4, 5, 5), torch.float32)
    timed = _timing_counter(monkeypatch)
    with conv_backward("auto"):
        first = conv_module._paths(x, w, 2)
    (choice,) = chosen_backward()
    stored = json.loads(cache.read_text())
    assert timed == [1] and list(stored) == [conv_module._machine()]
    assert list(stored[conv_module._machine()].values()) == [choice] and "timed" in choice

    monkeypatch.setattr(conv_module, "_chosen", {})  # a new process on the same machine
    with conv_backward("auto"):
        assert conv_module._paths(x, w, 2) == first
    assert timed == [1] and chosen_backward() == [choice]

    monkeypatch.setattr(conv_module, "_chosen", {})  # another machine sharing the home folder
    monkeypatch.setattr(conv_module, "_machine", lambda: "another CPU")
    with conv_backward("auto"):
        conv_module._paths(x, w, 2)
    assert timed == [2] and len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("content", ["not JSON", "[]", '{"m": {"k": {"input_gradient": "fastest"}}}'])
def test_an_unreadable_cache_is_timed_again_and_rewritten(monkeypatch, tmp_path, content):
    cache = tmp_path / "conv-backward.json"
    key = conv_module._key(torch.float32, (2, 4, 12, 12), (6, 4, 5, 5), 2, True, torch.get_num_threads())
    content = content.replace('"m"', json.dumps(conv_module._machine())).replace('"k"', json.dumps(repr(key)))
    cache.write_text(content)  # the last: a stored choice that names no way of computing a gradient
    monkeypatch.setenv("CAPSNET_CONV_CACHE", str(cache))
    monkeypatch.setattr(conv_module, "_chosen", {})
    timed = _timing_counter(monkeypatch)
    x, w, _ = _tensors((2, 4, 12, 12), (6, 4, 5, 5), torch.float32)
    with conv_backward("auto"):
        conv_module._paths(x, w, 2)
    assert timed == [1]
    assert list(json.loads(cache.read_text())[conv_module._machine()].values()) == chosen_backward()


@pytest.mark.parametrize("setting", ["", "file"])
def test_without_a_usable_cache_each_process_times_for_itself(monkeypatch, tmp_path, setting):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # "": no cache; "file": its folder would have to be a file, so it cannot be written
    monkeypatch.setenv("CAPSNET_CONV_CACHE", setting and str(blocker / "conv-backward.json"))
    monkeypatch.setattr(conv_module, "_chosen", {})
    timed = _timing_counter(monkeypatch)
    x, w, _ = _tensors((2, 4, 12, 12), (6, 4, 5, 5), torch.float32)
    with conv_backward("auto"):
        conv_module._paths(x, w, 2)
    assert timed == [1] and len(chosen_backward()) == 1 and blocker.read_text() == ""
