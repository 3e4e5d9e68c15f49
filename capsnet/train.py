"""Training and evaluation of CapsNet and the baseline CNN.

The paper's recipe (Sabour et al. 2017, Sec. 4 and the official code): Adam with learning rate
1e-3 decayed by 0.96 every 2000 steps (smoothly, per step), the margin loss plus 0.0005 x the
summed squared reconstruction error, random shifts of up to 2 pixels, batch 128. The baseline CNN
is trained with cross-entropy on the same data.

A run written to ``out_dir`` holds ``checkpoint.pt`` (rewritten atomically after every epoch),
``metrics.jsonl`` (one JSON line per epoch) and ``run.json`` (configuration, hardware, wall time).
``resume=True`` continues from the checkpoint exactly: same weights, optimiser state, learning
rate, random state and data order as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint, save_fp16_weights
from .data import DATASETS, DeviceBatches, affnist_style, load_dataset, translated_mnist
from .hardware import autocast, default_device, describe, resolve_precision
from .losses import margin_loss, reconstruction_loss
from .models import CapsNet, build_model
from .profiles import get_profile

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "batch_loss",
    "evaluate",
    "export_weights",
    "fit",
    "load_trained",
    "make_data",
    "make_more_tests",
    "run",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


LOSSES = ("margin", "cross_entropy")


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recon_weight: float,
    train: bool,
    loss: str = "margin",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and class scores of one batch. CapsNet: margin + recon_weight x reconstruction error
    (decoder masked by the true label in training, by the prediction otherwise).

    ``loss="cross_entropy"`` replaces CapsNet's margin loss by softmax cross-entropy with the
    capsule lengths as logits (an ablation, chapter 12; lengths lie in [0, 1], so the softmax
    stays soft and the loss never reaches 0). Other models always use cross-entropy on logits.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if isinstance(model, CapsNet):
        out = model(x, y if train else None)
        lengths = out.lengths.float()
        loss_value = margin_loss(lengths, y) if loss == "margin" else nn.functional.cross_entropy(lengths, y)
        if out.reconstructions is not None and recon_weight:
            loss_value = loss_value + recon_weight * reconstruction_loss(out.reconstructions.float(), x)
        return loss_value, lengths
    logits = model(x).float()
    return nn.functional.cross_entropy(logits, y), logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: DeviceBatches,
    *,
    precision: str = "fp32",
    recon_weight: float = 5e-4,
    loss: str = "margin",
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss, accuracy and error (in %) of ``model`` on every example of ``batches``."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    for x, y in tqdm(batches, desc="evaluate", leave=False, disable=not progress):
        with autocast(precision, device):
            value, scores = batch_loss(model, x, y, recon_weight, train=False, loss=loss)
        total_loss += value.double() * len(y)
        correct += (scores.argmax(dim=1) == y).sum()
        n += len(y)
    model.train(was_training)
    accuracy = correct.item() / n
    return {"loss": total_loss.item() / n, "accuracy": accuracy, "error": 100.0 * (1.0 - accuracy)}


def _lr_lambda(decay: float, steps: int):
    return lambda step: decay ** (step / steps)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    model: nn.Module,
    train: DeviceBatches,
    test: DeviceBatches | None = None,
    *,
    epochs: int,
    lr: float = 1e-3,
    lr_decay: float = 0.96,
    decay_steps: int = 2000,
    recon_weight: float = 5e-4,
    loss: str = "margin",
    max_steps: int | None = None,
    more_tests: dict[str, DeviceBatches] | None = None,
    test_every: int = 1,
    precision: str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    record: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``epochs`` passes over ``train``; return one metrics dict per epoch.

    Args:
        model: a :class:`CapsNet` or a classifier returning logits; already on its device.
        train, test: batches on the model's device (``test`` is evaluated after every epoch).
        epochs: total epochs; with ``resume`` the run continues up to this many.
        lr, lr_decay, decay_steps: Adam's learning rate ``lr * lr_decay ** (step / decay_steps)``.
        recon_weight: weight of the summed squared reconstruction error (CapsNet only).
        loss: CapsNet's classification loss, ``"margin"`` or ``"cross_entropy"`` (see :func:`batch_loss`).
        max_steps: stop after this many optimiser steps in all (the last epoch may be partial).
        more_tests: further test sets, evaluated after every epoch as ``{name}_loss``,
            ``{name}_accuracy`` and ``{name}_error``.
        test_every: evaluate the test sets every this many epochs and after the last one.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`capsnet.hardware`).
        out_dir: where checkpoint, metrics and run record go (nothing is written if ``None``).
        resume: continue from ``out_dir/checkpoint.pt``.
        progress: show progress bars.
        record: extra information for ``run.json`` and the checkpoint (e.g. the configuration
            needed to rebuild the model).

    Returns:
        One dict per epoch (also one line each of ``out_dir/metrics.jsonl``): ``epoch`` (1-based),
        ``step`` (optimiser steps so far), ``lr`` (the rate the next step will use),
        ``train_loss``, ``train_accuracy``, ``train_images_per_s``, ``seconds`` (the epoch's wall
        time) and, with ``test``, ``test_loss``, ``test_accuracy`` and ``test_error`` (in %).

    Raises:
        NonFiniteLossError: a training loss or, at the end of an epoch, a weight became NaN or
            infinite; ``out_dir`` keeps the checkpoint of the last completed epoch, so no
            checkpoint ever holds non-finite weights.
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is false.
        ValueError: ``resume`` without ``out_dir``, ``epochs < 0``, ``test_every < 1`` or an unknown
            ``precision``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if test_every < 1:
        raise ValueError(f"test_every must be >= 1, got {test_every}")
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(lr_decay, decay_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    out = Path(out_dir) if out_dir is not None else None
    history: list[dict[str, Any]] = []
    start_epoch, elapsed = 0, 0.0
    if resume:
        if out is None:
            raise ValueError("resume=True needs out_dir, the folder of the run to continue")
        state = load_checkpoint(out / "checkpoint.pt", map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, elapsed, history = state["epoch"], state["elapsed"], state["history"]
    elif out is not None and (out / "checkpoint.pt").exists():
        raise FileExistsError(
            f"{out} already holds a run: pass resume=True (--resume) to continue it, "
            "or choose another output folder"
        )
    record = {
        **(record or {}),
        "precision": precision,
        "hardware": describe(device),
        "epochs": epochs,
    }

    for epoch in range(start_epoch, epochs):
        if max_steps is not None and scheduler.last_epoch >= max_steps:
            break
        started = time.perf_counter()
        model.train()
        train.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        seen = 0
        bar = tqdm(train, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        i = 0
        for i, (x, y) in enumerate(bar):
            if max_steps is not None and scheduler.last_epoch >= max_steps:
                break
            with autocast(precision, device):
                value, scores = batch_loss(model, x, y, recon_weight, train=True, loss=loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += value.detach().double() * len(y)
            correct += (scores.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            if i % 25 == 0:  # the sum is non-finite if any loss so far was
                if not math.isfinite(loss_sum.item()):
                    raise _non_finite(f"the training loss became {loss_sum.item()}", epoch, i, out)
                bar.set_postfix(loss=f"{value.item():.4f}")
        train_seconds = time.perf_counter() - started
        if not math.isfinite(loss_sum.item()):
            raise _non_finite(f"the training loss became {loss_sum.item()}", epoch, i, out)
        if not all(bool(p.isfinite().all()) for p in model.parameters()):  # a last step's NaN gradient
            raise _non_finite("the weights became non-finite", epoch, i, out)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": scheduler.last_epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum.item() / seen,
            "train_accuracy": correct.item() / seen,
            "train_images_per_s": seen / train_seconds,
        }
        last = epoch + 1 == epochs or (max_steps is not None and scheduler.last_epoch >= max_steps)
        tested = (epoch + 1) % test_every == 0 or last
        for name, batches in {"test": test, **(more_tests or {})}.items():
            if batches is not None and tested:
                result = evaluate(model, batches, precision=precision, recon_weight=recon_weight, loss=loss)
                metrics.update({f"{name}_{k}": v for k, v in result.items()})
        metrics["seconds"] = time.perf_counter() - started
        elapsed += metrics["seconds"]
        history.append(metrics)
        if progress:
            shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
            tqdm.write(json.dumps(shown))
        if out is not None:
            save_checkpoint(
                out / "checkpoint.pt",
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                    "elapsed": elapsed,
                    "history": history,
                    "record": record,
                },
            )
            # rewritten whole from the checkpoint's history, so it always matches the checkpoint
            _write_text(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
            _write_json(out / "run.json", {**record, "wall_seconds": elapsed, "epochs_done": epoch + 1})
    return history


def _non_finite(what: str, epoch: int, step: int, out: Path | None) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"{what} in epoch {epoch + 1} (found at step {step + 1}). The last good checkpoint is kept"
        + (f" in {out}" if out else "")
        + ". Try a lower learning rate (--lr) or fp32 precision (--precision fp32)."
    )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run of :func:`run`; ``None`` fields come from the profile.

    ``dataset`` is ``mnist``, ``fashion-mnist`` or a data set generated from MNIST digits
    (:data:`GENERATED`: ``translated-mnist``); ``model`` a key of :data:`capsnet.models.MODELS`.
    ``steps``, if set, is a budget of optimiser steps that replaces ``epochs``; ``test_every``
    thins out the per-epoch evaluation. ``loss``, ``squashed``, ``recon_weight``, ``coupling`` and
    ``routing_iterations`` are the switches of the ablations (chapter 12); the other fields are
    the paper's recipe (see :func:`fit`).
    """

    dataset: str = "mnist"
    model: str = "capsnet"
    profile: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    train_size: int | None = None
    test_size: int | None = None
    lr: float = 1e-3
    lr_decay: float = 0.96
    decay_steps: int = 2000
    recon_weight: float = 5e-4
    max_shift: int = 2
    precision: str = "auto"
    seed: int = 0
    routing_iterations: int = 3
    routing_gradient: str = "last"
    coupling: str = "dynamic"
    decoder: bool = True
    loss: str = "margin"
    squashed: bool = True
    steps: int | None = None
    test_every: int = 1

    def resolved(self) -> TrainConfig:
        """Fill the ``None`` size fields from the profile (0 sizes mean the whole split)."""
        if self.dataset not in DATASETS and self.dataset not in GENERATED:
            names = ", ".join(sorted({*DATASETS, *GENERATED}))
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {names}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        profile = get_profile(self.profile)
        return replace(
            self,
            profile=profile.name,
            epochs=profile.epochs if self.epochs is None else self.epochs,
            batch_size=self.batch_size or profile.batch_size,
            train_size=profile.train_size or 0 if self.train_size is None else self.train_size,
            test_size=profile.test_size or 0 if self.test_size is None else self.test_size,
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`capsnet.models.build_model` for this run's model."""
        size = {"input_size": GENERATED[self.dataset].canvas} if self.dataset in GENERATED else {}
        if self.model == "capsnet":
            return {
                **size,
                "routing_iterations": self.routing_iterations,
                "routing_gradient": self.routing_gradient,
                "coupling": self.coupling,
                "squashed": self.squashed,
                "decoder": self.decoder,
            }
        return size


@dataclass(frozen=True)
class _Generated:
    """A data set made from MNIST digits: the training and test splits on a ``canvas``, and
    further test sets evaluated beside the test split (name -> generator)."""

    canvas: int
    more_tests: tuple[str, ...]


# translated-mnist: the paper's section 5.2: train and test on MNIST digits placed at random on
# 40x40; also test on the affNIST-style set made from the test digits.
GENERATED: dict[str, _Generated] = {"translated-mnist": _Generated(40, ("affnist_style",))}


def _generate(name: str, images: torch.Tensor, labels: torch.Tensor, seed: int):
    if name == "translated-mnist":
        return translated_mnist(images, labels, seed, canvas=40)
    if name == "affnist_style":
        return affnist_style(images, labels, seed, canvas=40)
    raise ValueError(f"no generator called {name!r}")


def _subset(images: torch.Tensor, labels: torch.Tensor, size: int, seed: int):
    if not size or size >= len(labels):
        return images, labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:size]
    return images[idx], labels[idx]


def _digits(config: TrainConfig, split: str, root: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels a run draws from ``split`` of its source data set (MNIST for a
    generated data set): ``train_size`` / ``test_size`` of them, chosen with the run's seed."""
    source = "mnist" if config.dataset in GENERATED else config.dataset
    data = load_dataset(source, split, root)
    if split == "train":
        return _subset(data.images, data.labels, config.train_size, config.seed)
    return _subset(data.images, data.labels, config.test_size, config.seed + 1)


def make_data(
    config: TrainConfig, device: torch.device, root: str | Path | None = None
) -> tuple[DeviceBatches, DeviceBatches]:
    """Training batches (shuffled, shifted) and test batches for a resolved ``config``."""
    train_data, test_data = _digits(config, "train", root), _digits(config, "test", root)
    if config.dataset in GENERATED:
        train_data = _generate(config.dataset, *train_data, seed=config.seed)
        test_data = _generate(config.dataset, *test_data, seed=config.seed + 1)
    train = DeviceBatches(
        *train_data,
        config.batch_size,
        device,
        shuffle=True,
        max_shift=config.max_shift,
        seed=config.seed,
    )
    test = DeviceBatches(*test_data, max(config.batch_size, 256), device)
    return train, test


def make_more_tests(
    config: TrainConfig, device: torch.device, root: str | Path | None = None
) -> dict[str, DeviceBatches]:
    """The further test sets of a generated data set (e.g. ``affnist_style`` beside
    ``translated-mnist``), made from the same test digits as its test split; else ``{}``."""
    if config.dataset not in GENERATED:
        return {}
    digits = _digits(config, "test", root)
    return {
        name: DeviceBatches(*_generate(name, *digits, seed=config.seed + 2), 256, device)
        for name in GENERATED[config.dataset].more_tests
    }


def run(
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    device: torch.device | str | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Build data and model from ``config`` and train; returns the model and its history.

    With ``resume`` the configuration stored in ``out_dir`` is used, except ``epochs``, which may
    be raised to train longer. ``run.json`` lists every command that trained the run (``commands``).
    """
    commands = [command] if command else []
    if resume and out_dir is not None:
        if not (Path(out_dir) / "run.json").is_file():
            raise FileNotFoundError(
                f"{out_dir} holds no run to resume (no run.json): start it without --resume"
            )
        saved_record = json.loads((Path(out_dir) / "run.json").read_text())
        saved = saved_record["config"]
        config = replace(TrainConfig(**saved), epochs=config.epochs or saved["epochs"])
        commands = saved_record.get("commands", []) + commands
    config = config.resolved()
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(config.seed)
    model = build_model(config.model, **config.model_kwargs()).to(device)
    train, test = make_data(config, device, data_root)
    if config.steps is not None:  # a budget of optimiser steps fixes the number of epochs
        config = replace(config, epochs=-(-config.steps // len(train)))
    record = {"config": asdict(config), "commands": commands, "model_kwargs": config.model_kwargs()}
    history = fit(
        model,
        train,
        test,
        epochs=config.epochs,
        lr=config.lr,
        lr_decay=config.lr_decay,
        decay_steps=config.decay_steps,
        recon_weight=config.recon_weight if config.model == "capsnet" else 0.0,
        loss=config.loss,
        max_steps=config.steps,
        more_tests=make_more_tests(config, device, data_root),
        test_every=config.test_every,
        precision=config.precision,
        out_dir=out_dir,
        resume=resume,
        progress=progress,
        record=record,
    )
    return model, history


def load_trained(path: str | Path, device: torch.device | str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a run's ``checkpoint.pt`` or ``weights-fp16.pt``; returns it (in
    float32, eval mode) and the run's record (configuration, hardware, ...)."""
    device = torch.device(device) if device is not None else default_device()
    state = load_checkpoint(path, map_location="cpu")
    record = state.get("record", {})
    if "config" not in record:
        raise ValueError(f"{path} has no run configuration: it was not written by capsnet.train")
    model = build_model(record["config"]["model"], **record["model_kwargs"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    return model.to(device).eval(), record


def export_weights(out_dir: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """Finish a run: save its weights in float16 as ``weights-fp16.pt`` and evaluate exactly those
    weights (in float32, on the run's test set) into ``run.json["final"]``."""
    out = Path(out_dir)
    state = load_checkpoint(out / "checkpoint.pt")
    model, record = load_trained(out / "checkpoint.pt", "cpu")
    save_fp16_weights(out / "weights-fp16.pt", model, {"record": record, "epoch": state["epoch"]})
    model, record = load_trained(out / "weights-fp16.pt")
    config = TrainConfig(**record["config"])
    device = next(model.parameters()).device
    _, test = make_data(config, device, data_root)
    settings = {"precision": "fp32", "recon_weight": config.recon_weight, "loss": config.loss}
    final: dict[str, Any] = evaluate(model, test, **settings)
    for name, batches in make_more_tests(config, device, data_root).items():
        final[name] = evaluate(model, batches, **settings)
    final.update(epoch=state["epoch"], weights="weights-fp16.pt", test_images=len(test.labels))
    run_record = json.loads((out / "run.json").read_text())
    _write_json(out / "run.json", {**run_record, "final": final})
    return final
