"""``python -m capsnet bench``: how fast the paper's CapsNet trains and infers on this machine.

For the paper's CapsNet (``CapsNet()``, MNIST sizes) on one device, in fp32 and in the mixed
precision that :func:`capsnet.hardware.resolve_precision` picks for it (``"auto"``), it measures:

* training images/s: one step of the training loop (forward under autocast, the training loss
  of :mod:`capsnet.train`, backward, Adam), timed ``steps`` times after a warm-up step;
* inference images/s: ``model(x)`` in eval mode without gradients (decoder included);
* peak memory of a training step at the benchmark's batch size and at batch 100;
* the machine's own matrix-multiply rate in the same precisions (best of several large square
  ``torch.matmul``), so that each throughput is also given as a fraction of it;
* on the CPU, which way :mod:`capsnet.conv` chose to compute each gradient of the two
  convolutions (it times both on first use), and fp32 training with PyTorch's own convolution
  backward for comparison.

The FLOP counts are derived from the model's layer shapes by :func:`flops_per_image`.

Peak memory is what the training step needs: parameters, gradients, Adam's state, activations
and temporaries. On CUDA it is ``torch.cuda.max_memory_allocated`` minus what was allocated before
the model was built. On the CPU it is the peak resident set size (``VmHWM`` in
``/proc/self/status``) of a fresh Python process running two training steps, minus its resident
size before it built the model (the first step creates Adam's state, the second is a steady one).

JSON keys: ``device``, ``hardware``, ``load_average`` (1, 5, 15 min; timings on a busy machine are
lower), ``batch_size``, ``steps``, ``flops_per_image`` (``layers``: multiply-adds per image of each
layer in the forward pass; ``forward`` and ``training``: FLOPs per image), ``matmul`` (per dtype:
``size``, ``gflops``), ``results`` (one per precision: ``precision``, ``train_images_per_s``,
``train_step_seconds``, ``train_gflops``, ``train_fraction_of_matmul``,
``inference_images_per_s``, ``inference_step_seconds``, ``inference_gflops``,
``inference_fraction_of_matmul``, ``peak_memory_mb``, ``peak_memory_mb_batch_100``,
``conv_backward``: ``auto`` or ``native``; memory is ``null`` where it cannot be measured),
``conv_backward_chosen`` (:func:`capsnet.conv.chosen_backward`). Images/s are computed
from the median step time; every step time is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conv import chosen_backward, conv_backward
from .hardware import autocast, default_device, describe, resolve_precision
from .layers import conv_output_size
from .models import CapsNet
from .train import adam, batch_loss

__all__ = ["benchmark", "flops_per_image", "format_table", "layer_multiply_adds", "main", "matmul_gflops"]

# Peak training memory is also reported at this batch size, the one the memory target is set for.
MEMORY_BATCH_SIZE = 100
# Side of the square matrices used to measure the matmul rate, and how many products to time.
MATMUL_SIZE = {"cpu": 2048, "cuda": 4096}
MATMUL_REPEATS = 5
RECON_WEIGHT = 5e-4  # the paper's weight of the reconstruction loss, as in training
MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _conv_macs(conv: nn.Conv2d, side: int) -> tuple[int, int]:
    """Multiply-adds of ``conv`` on a ``side x side`` input, per image, and its output side."""
    out_side = conv_output_size(side, conv.kernel_size[0], conv.stride[0])
    kernel = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return out_side * out_side * conv.out_channels * kernel, out_side


def layer_multiply_adds(model: nn.Module, input_size: int, in_channels: int = 1) -> list[int]:
    """Multiply-adds per image of every ``Conv2d`` and ``Linear`` layer of ``model``, in the order a
    forward pass on one ``(in_channels, input_size, input_size)`` image calls them (counted with
    forward hooks, so any CNN works; CapsNet's predictions and routing are not such layers)."""
    counts: list[int] = []

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        counts.append(output[0].numel() * per_output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_channels, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return counts


def flops_per_image(model: CapsNet) -> dict[str, Any]:
    """FLOPs per image of a forward pass and of a training step of ``model``, from its shapes.

    Only multiply-adds (2 FLOPs each) of the convolutions, matrix products and weighted sums
    are counted; element-wise work (ReLU, squash, softmax, the losses, Adam) is small beside them
    and left out.

    Training = forward + backward. The backward pass of a product ``y = W x`` costs one
    product of the same size for ``dL/dW`` and one for ``dL/dx``, so a layer costs 3x its
    forward multiply-adds in training, with these exceptions:

    * Conv1's input is the image, which needs no gradient: 2x.
    * Routing: with ``gradient="last"`` (the default) the earlier iterations and the couplings
      are computed from detached predictions, so only the final weighted sum
      ``s_j = sum_i c_ij u_hat_j|i`` passes a gradient to ``u_hat``: one more weighted sum. With
      ``gradient="all"`` every routing product passes gradients to both operands: 3x.

    ``training_conv1_frozen`` is a training step with Conv1 frozen (the fast recipe's later
    steps): Conv1 runs forward only, and PrimaryCaps needs no gradient for its input.

    For the paper's model this gives about 0.41 GFLOP forward and 1.2 GFLOP per training step,
    over 95% of it in the PrimaryCaps convolution.
    """
    conv1, side = _conv_macs(model.conv1, model.input_size)
    primary, _ = _conv_macs(model.primary.conv, side)
    digit = model.digit
    # u_hat_j|i = W_ij u_i (Eq. 2): a (out_dim x in_dim) matrix times a vector per pair (i, j).
    predictions = digit.in_caps * digit.out_caps * digit.out_dim * digit.in_dim
    # One pass over all predictions: a weighted sum s_j (Eq. 2) or the agreements u_hat . v_j.
    pass_over_predictions = digit.in_caps * digit.out_caps * digit.out_dim
    if digit.coupling == "dynamic":
        # r weighted sums and r - 1 agreement updates.
        routing_passes = 2 * digit.iterations - 1
        routing_backward_passes = 1 if digit.gradient == "last" else 2 * routing_passes
    else:  # fixed couplings: one weighted sum, gradient to u_hat only
        routing_passes, routing_backward_passes = 1, 1
    routing = routing_passes * pass_over_predictions
    decoder = 0
    if model.decoder is not None:
        decoder = sum(m.in_features * m.out_features for m in model.decoder.net if isinstance(m, nn.Linear))
    layers = {
        "conv1": conv1,
        "primary_caps": primary,
        "predictions": predictions,
        "routing": routing,
        "decoder": decoder,
    }
    forward_macs = sum(layers.values())
    training_macs = (
        2 * conv1  # forward + weight gradient (no gradient for the image)
        + 3 * (primary + predictions + decoder)  # forward + weight gradient + input gradient
        + routing
        + routing_backward_passes * pass_over_predictions
    )
    return {
        "layers": layers,
        "forward": 2 * forward_macs,
        "training": 2 * training_macs,
        "training_conv1_frozen": 2 * (training_macs - conv1 - primary),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(step: Callable[[], object], steps: int, device: torch.device) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step``, after one untimed warm-up call."""
    step()
    _synchronize(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    return times


def matmul_gflops(
    dtype: torch.dtype, device: torch.device, size: int, repeats: int = MATMUL_REPEATS
) -> float:
    """The best rate, in GFLOP/s, of ``repeats`` products of two ``size x size`` matrices."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    best = min(_time_steps(lambda: torch.matmul(a, b), repeats, device))
    return 2 * size**3 / best / 1e9


def _inputs(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 1, 28, 28, generator=generator).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    return x, y


def _training_step(
    model: CapsNet, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, precision: str
) -> Callable[[], None]:
    """One step of :func:`capsnet.train.fit`'s loop, in its order (no loss scaling: not fp16)."""
    device = x.device

    def step() -> None:
        with autocast(precision, device):
            loss, _ = batch_loss(model, x, y, RECON_WEIGHT, train=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _new_model(device: torch.device) -> tuple[CapsNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = CapsNet().to(device)
    return model, adam(model.parameters(), 1e-3)


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _cpu_training_memory_mb(batch_size: int, precision: str) -> float:
    """Run in a fresh process by :func:`training_memory_mb`: peak RSS growth of two steps."""
    device = torch.device("cpu")
    x, y = _inputs(batch_size, device)
    before = _proc_status_mb("VmRSS")
    model, optimizer = _new_model(device)
    step = _training_step(model, optimizer, x, y, precision)
    step()
    step()
    return _proc_status_mb("VmHWM") - before


def training_memory_mb(batch_size: int, precision: str, device: torch.device) -> float | None:
    """Peak memory, in MiB, of training the paper's CapsNet at ``batch_size`` (see module docstring).

    ``None`` where it cannot be measured: devices other than CUDA and a Linux CPU.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model, optimizer = _new_model(device)
        step = _training_step(model, optimizer, *_inputs(batch_size, device), precision)
        step()
        step()
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if device.type != "cpu" or not Path("/proc/self/status").exists():
        return None
    code = (
        "from capsnet.bench import _cpu_training_memory_mb; "
        f"print(_cpu_training_memory_mb({batch_size}, {precision!r}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1])


def _step_times(
    precision: str, batch_size: int, steps: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Seconds per training step and per inference batch of a fresh paper CapsNet."""
    model, optimizer = _new_model(device)
    x, y = _inputs(batch_size, device)
    model.train()
    train_times = _time_steps(_training_step(model, optimizer, x, y, precision), steps, device)
    model.eval()

    def infer() -> None:
        with torch.no_grad(), autocast(precision, device):
            model(x)

    return train_times, _time_steps(infer, steps, device)


def _measure(
    precision: str,
    batch_size: int,
    steps: int,
    device: torch.device,
    flops: dict[str, Any],
    matmul: float,
    backward: str = "auto",
) -> dict[str, Any]:
    """Training and inference throughput and peak memory of one precision."""
    with conv_backward(backward):
        train_times, infer_times = _step_times(precision, batch_size, steps, device)
    result: dict[str, Any] = {"precision": precision, "conv_backward": backward}
    for name, times, flop_key in (("train", train_times, "training"), ("inference", infer_times, "forward")):
        images_per_s = batch_size / statistics.median(times)
        gflops = images_per_s * flops[flop_key] / 1e9
        result[f"{name}_images_per_s"] = images_per_s
        result[f"{name}_step_seconds"] = times
        result[f"{name}_gflops"] = gflops
        result[f"{name}_fraction_of_matmul"] = gflops / matmul
    if backward == "native":  # a comparison of speed only
        result["peak_memory_mb"] = result[f"peak_memory_mb_batch_{MEMORY_BATCH_SIZE}"] = None
        return result
    result["peak_memory_mb"] = training_memory_mb(batch_size, precision, device)
    result[f"peak_memory_mb_batch_{MEMORY_BATCH_SIZE}"] = (
        result["peak_memory_mb"]
        if batch_size == MEMORY_BATCH_SIZE
        else training_memory_mb(MEMORY_BATCH_SIZE, precision, device)
    )
    return result


def benchmark(
    batch_size: int = 128, steps: int = 5, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Measure everything the module docstring lists; returns the JSON record as a dict."""
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size} and {steps}")
    device = torch.device(device) if device is not None else default_device()
    precisions = list(dict.fromkeys(["fp32", resolve_precision("auto", device)]))
    flops = flops_per_image(CapsNet())
    size = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cuda"])
    matmul = {
        p: {"size": size, "gflops": matmul_gflops(MIXED_DTYPES.get(p, torch.float32), device, size)}
        for p in precisions
    }
    results = [_measure(p, batch_size, steps, device, flops, matmul[p]["gflops"]) for p in precisions]
    if device.type == "cpu":  # PyTorch's own backward for comparison (capsnet.conv)
        results.insert(
            1, _measure("fp32", batch_size, steps, device, flops, matmul["fp32"]["gflops"], "native")
        )
    return {
        "device": str(device),
        "hardware": describe(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "batch_size": batch_size,
        "steps": steps,
        "flops_per_image": flops,
        "matmul": matmul,
        "results": results,
        "conv_backward_chosen": chosen_backward(),
    }


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def format_table(record: dict[str, Any]) -> str:
    """The benchmark record as a plain-text table, one row per precision and mode."""
    flops = record["flops_per_image"]
    lines = [
        record["hardware"],
        f"load average {' '.join(f'{v:.2f}' for v in record['load_average'] or [])}; "
        f"batch {record['batch_size']}, {record['steps']} timed steps; "
        f"{flops['forward'] / 1e9:.3f} GFLOP/image forward, {flops['training'] / 1e9:.3f} training",
        "matmul: "
        + ", ".join(
            f"{p} {m['gflops']:.1f} GFLOP/s ({m['size']}x{m['size']})" for p, m in record["matmul"].items()
        ),
        "",
        f"{'precision':<10}{'mode':<26}{'images/s':>10}{'range':>17}{'GFLOP/s':>9}{'of matmul':>11}"
        f"{'peak MiB':>10}{'MiB @' + str(MEMORY_BATCH_SIZE):>10}",
    ]
    for r in record["results"]:
        native = r.get("conv_backward") == "native"
        for mode in ("train", "inference"):
            if native and mode == "inference":
                continue  # the backward path does not change inference
            rates = [record["batch_size"] / t for t in r[f"{mode}_step_seconds"]]
            memory = (
                f"{_mib(r['peak_memory_mb']):>10}{_mib(r[f'peak_memory_mb_batch_{MEMORY_BATCH_SIZE}']):>10}"
                if mode == "train"
                else ""
            )
            lines.append(
                f"{r['precision']:<10}{mode + ', native backward' * native:<26}"
                f"{r[f'{mode}_images_per_s']:>10.1f}"
                f"{f'{min(rates):.1f}-{max(rates):.1f}':>17}{r[f'{mode}_gflops']:>9.1f}"
                f"{r[f'{mode}_fraction_of_matmul']:>11.0%}{memory}"
            )
    for chosen in record.get("conv_backward_chosen", []):
        layer = f"{chosen['weight_shape'][1]} -> {chosen['weight_shape'][0]} channels"
        lines.append(
            f"{layer} convolution gradients, {chosen['dtype']}, batch {chosen['input_shape'][0]}: "
            + "; ".join(
                f"{grad} {' vs '.join(f'{way} {t:.3f} s' for way, t in ways.items())}"
                f" -> {chosen[grad + '_gradient']}"
                for grad, ways in chosen["seconds"].items()
            )
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m capsnet bench``: print the table and write the JSON."""
    record = benchmark(args.batch_size, args.steps, args.device)
    print(format_table(record))
    path = Path(args.json)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
