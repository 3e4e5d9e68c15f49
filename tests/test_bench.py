"""Tests of capsnet.bench: the FLOP count, and that the benchmark runs and writes its JSON (not its speed)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from capsnet import CapsNet, bench


def test_flops_of_the_paper_model_by_hand() -> None:
    conv1 = 20 * 20 * 256 * (1 * 9 * 9)  # 28 -> 20, 256 channels, 9x9 kernel on 1 channel
    primary = 6 * 6 * 256 * (256 * 9 * 9)  # 20 -> 6 (stride 2), 32 x 8 channels
    predictions = 1152 * 10 * 16 * 8  # W_ij u_i for every pair
    one_pass = 1152 * 10 * 16  # a weighted sum or an agreement over all predictions
    routing = (3 + 2) * one_pass  # 3 iterations: 3 weighted sums, 2 agreement updates
    decoder = 160 * 512 + 512 * 1024 + 1024 * 784
    flops = bench.flops_per_image(CapsNet())
    assert flops["layers"] == {
        "conv1": conv1,
        "primary_caps": primary,
        "predictions": predictions,
        "routing": routing,
        "decoder": decoder,
    }
    assert flops["forward"] == 2 * (conv1 + primary + predictions + routing + decoder)
    training = 2 * conv1 + 3 * (primary + predictions + decoder) + routing + one_pass
    assert flops["training"] == 2 * training
    assert 1.15e9 < flops["training"] < 1.25e9
    # Conv1 frozen: Conv1 forward only, PrimaryCaps without its input gradient
    frozen = conv1 + 2 * primary + 3 * (predictions + decoder) + routing + one_pass
    assert flops["training_conv1_frozen"] == 2 * frozen


def test_flops_follow_the_routing_options() -> None:
    last = bench.flops_per_image(CapsNet())
    every = bench.flops_per_image(CapsNet(routing_gradient="all"))
    one = bench.flops_per_image(CapsNet(routing_iterations=1))
    assert every["forward"] == last["forward"] and every["training"] > last["training"]
    assert one["layers"]["routing"] == 1152 * 10 * 16
    assert bench.flops_per_image(CapsNet(decoder=False))["layers"]["decoder"] == 0


def test_bench_writes_json_with_the_documented_keys(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(bench, "MEMORY_BATCH_SIZE", 2)  # = the batch size: one memory probe per precision
    monkeypatch.setitem(bench.MATMUL_SIZE, "cpu", 64)
    path = tmp_path / "bench.json"
    args = argparse.Namespace(batch_size=2, steps=2, device="cpu", json=str(path))
    assert bench.main(args) == 0
    record = json.loads(path.read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN or Infinity
    assert set(record) == {
        "device",
        "hardware",
        "load_average",
        "batch_size",
        "steps",
        "flops_per_image",
        "matmul",
        "results",
        "conv_backward_chosen",
    }
    assert record["device"] == "cpu" and record["batch_size"] == 2 and record["steps"] == 2
    precisions = [r["precision"] for r in record["results"]]
    assert precisions[:2] == ["fp32", "fp32"] and set(precisions) <= {"fp32", "bf16"}
    # fp32 with PyTorch's own convolution backward beside the chosen one, for comparison
    assert [r["conv_backward"] for r in record["results"]][:2] == ["auto", "native"]
    chosen = {(c["dtype"], c["weight_shape"][1]): c for c in record["conv_backward_chosen"]}
    conv1, primary = chosen["float32", 1], chosen["float32", 256]  # no input gradient for the image
    assert set(conv1["seconds"]) == {"weight"} and set(primary["seconds"]) == {"weight", "input"}
    assert primary["weight_shape"] == [256, 256, 9, 9] and primary["stride"] == 2
    assert primary["weight_gradient"] in primary["seconds"]["weight"]
    assert set(record["matmul"]) == set(precisions)
    assert all(m["size"] == 64 and m["gflops"] > 0 for m in record["matmul"].values())
    for result in record["results"]:
        for mode in ("train", "inference"):
            assert len(result[f"{mode}_step_seconds"]) == 2
            assert result[f"{mode}_images_per_s"] > 0
            assert math.isfinite(result[f"{mode}_fraction_of_matmul"])
        if result["conv_backward"] == "auto":
            assert result["peak_memory_mb"] > 0
            assert result["peak_memory_mb_batch_2"] == result["peak_memory_mb"]
    table = capsys.readouterr().out
    assert "fp32" in table and "inference" in table and str(path) in table
    assert "train, native backward" in table
    assert "256 -> 256 channels convolution gradients, float32, batch 2" in table


def test_bench_rejects_empty_runs() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        bench.benchmark(batch_size=2, steps=0, device="cpu")


def test_layer_multiply_adds_counts_convolutions_and_linear_layers():
    from torch import nn

    from capsnet.bench import layer_multiply_adds

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).train()
    # conv: 6x6 outputs x 4 channels x 3x3 kernel; linear: 144 x 5
    assert layer_multiply_adds(model, 8) == [6 * 6 * 4 * 9, 144 * 5]
    assert model.training  # the mode is restored
    capsnet_convs = layer_multiply_adds(CapsNet(decoder=False), 28)
    assert capsnet_convs == [20 * 20 * 256 * 81, 6 * 6 * 256 * 256 * 81]
