"""Training and evaluation of CapsNet and the baseline CNN.

The paper's recipe (Sabour et al. 2017, Sec. 4 and the official code): Adam with learning rate
1e-3 decayed by 0.96 every 2000 steps (smoothly, per step), the margin loss plus 0.0005 x the
summed squared reconstruction error, random shifts of up to 2 pixels, batch 128. The baseline CNN
is trained with cross-entropy on the same data.

A run written to ``out_dir`` holds ``checkpoint.pt`` (rewritten atomically after every epoch),
``metrics.jsonl`` (one JSON line per epoch) and ``run.json`` (configuration, hardware, wall time);
:mod:`capsnet.run_folder` keeps that folder consistent and safe. ``resume=True`` continues from the
checkpoint exactly: same weights, optimiser state, learning rate, random state and data order as
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_checkpoint, save_fp16_weights
from .conv import chosen_backward, remember_backward
from .data import DATASETS, DeviceBatches, affnist_style, load_dataset, translated_mnist
from .hardware import PRECISIONS, autocast, default_device, describe, resolve_precision
from .losses import margin_loss, reconstruction_loss
from .models import MODELS, CapsNet, build_model
from .profiles import get_profile
from .routing import CouplingMode, GradientMode
from .run_folder import RunFolder, strict_json

__all__ = [
    "ConfigError",
    "LR_SCHEDULES",
    "NonFiniteLossError",
    "RECIPES",
    "RESUMABLE",
    "TrainConfig",
    "ValidationChecks",
    "adam",
    "batch_loss",
    "checked_config",
    "config_of",
    "evaluate",
    "export_weights",
    "fit",
    "images_fingerprint",
    "load_trained",
    "make_data",
    "make_more_tests",
    "parse_device",
    "run",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class ConfigError(ValueError):
    """Invalid options for a run: the message names the option, what it allows and what it got."""


LOSSES = ("margin", "cross_entropy")


def batch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    recon_weight: float,
    train: bool,
    loss: str = "margin",
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and class scores of one batch. CapsNet: margin + recon_weight x reconstruction error
    (decoder masked by the true label in training, by the prediction otherwise).

    ``loss="cross_entropy"`` replaces CapsNet's margin loss by softmax cross-entropy with the
    capsule lengths times ``logit_scale`` as logits (an ablation, chapter 12). Lengths lie in
    [0, 1), so with ``logit_scale=1`` the softmax stays soft and the loss never falls below
    log(1 + 9/e) = 1.461; a larger scale (a temperature chosen on validation) lifts that floor.
    Other models always use cross-entropy on logits.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if isinstance(model, CapsNet):
        out = model(x, y if train else None)
        lengths = out.lengths.float()
        if loss == "margin":
            loss_value = margin_loss(lengths, y)
        else:
            loss_value = nn.functional.cross_entropy(logit_scale * lengths, y)
        if out.reconstructions is not None and recon_weight:
            loss_value = loss_value + recon_weight * reconstruction_loss(out.reconstructions.float(), x)
        return loss_value, lengths
    logits = model(x).float()
    return nn.functional.cross_entropy(logits, y), logits


# Evaluation's random draws (only the `random` couplings ablation makes any) are fixed: a test
# accuracy is a property of the model, not of the generator's state when it was measured.
EVALUATION_SEED = 2019


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: DeviceBatches,
    *,
    precision: str = "fp32",
    recon_weight: float = 5e-4,
    loss: str = "margin",
    logit_scale: float = 1.0,
    progress: bool = False,
    per_image: bool = False,
) -> dict[str, Any]:
    """Mean loss, accuracy and error (in %) of ``model`` on every example of ``batches``; with
    ``per_image`` also ``"predicted"``, the predicted class of every example in order (a CPU
    tensor), for paired comparisons of models on the same images (:func:`capsnet.stats.mcnemar`).

    Whatever the model draws at random (the couplings of ``coupling="random"``) comes from the
    random number generators reseeded with :data:`EVALUATION_SEED`, and their state is restored
    afterwards: evaluating the same model twice gives the same numbers, and evaluation never moves
    what training draws next.
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n, predicted = 0, []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(EVALUATION_SEED)
        for x, y in tqdm(batches, desc="evaluate", leave=False, disable=not progress):
            with autocast(precision, device):
                value, scores = batch_loss(
                    model, x, y, recon_weight, train=False, loss=loss, logit_scale=logit_scale
                )
            classes = scores.argmax(dim=1)
            total_loss += value.double() * len(y)
            correct += (classes == y).sum()
            n += len(y)
            if per_image:
                predicted.append(classes)
    model.train(was_training)
    accuracy = correct.item() / n
    result: dict[str, Any] = {
        "loss": total_loss.item() / n,
        "accuracy": accuracy,
        "error": 100.0 * (1.0 - accuracy),
    }
    if per_image:
        result["predicted"] = torch.cat(predicted).cpu()
    return result


FUSED_ADAM_DEVICES = ("cpu", "cuda")


def adam(parameters: Iterable[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with PyTorch's defaults (betas 0.9 and 0.999, eps 1e-8), as every trainer here uses it.

    On the CPU and CUDA it is PyTorch's fused implementation: the same update, equal to the
    default one up to rounding (a test checks it in float64), computed in one pass over each
    weight instead of about eight. For CapsNet on 2 CPU cores an optimiser step takes about 5 ms
    instead of 30: 5-8% of a training step at batch 32 (the README's speed section).
    """
    parameters = list(parameters)
    fused = all(p.device.type in FUSED_ADAM_DEVICES for p in parameters) or None
    return torch.optim.Adam(parameters, lr=lr, fused=fused)


def _lr_lambda(decay: float, steps: int):
    return lambda step: decay ** (step / steps)


LR_SCHEDULES = ("paper", "onecycle")


def _one_cycle(total_steps: int, warmup: float = 0.15, start: float = 0.04):
    """The ``onecycle`` schedule's factor of the peak rate at each step: a linear warm-up from
    ``start`` to 1 over the first ``warmup`` of ``total_steps``, then a cosine decay to 0 at the
    last step (Smith & Topin 2019). Fixed in advance by the step budget."""
    rise = max(1, round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < rise:
            return start + (1 - start) * step / rise
        done = min(1.0, (step - rise) / max(1, total_steps - rise))
        return 0.5 * (1 + math.cos(math.pi * done))

    return factor


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`_rng_state`'s states. PyTorch takes them as CPU byte tensors only, whatever
    device trained the run: a checkpoint is loaded to the CPU, and they are kept there."""
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.to("cpu", torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


class _HostValue:
    """Reads a scalar that lives on the device without making the host wait for the device.

    On the CPU :meth:`read` returns the value at once (reading it costs nothing). On CUDA it
    starts an asynchronous copy to the host and returns the copy an earlier call started, once it
    has arrived (``None`` until then): a progress bar shows a value a few steps old, and no
    training step waits for the GPU to catch up.
    """

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def read(self, value: torch.Tensor) -> float | None:
        if value.device.type != "cuda":
            return value.item()
        arrived = None
        if self._pending is not None:
            copy, copied = self._pending
            if not copied.query():
                return None
            arrived = copy.item()
        copy = value.detach().to("cpu", non_blocking=True)  # into pinned memory, in stream order
        copied = torch.cuda.Event()
        copied.record()
        self._pending = (copy, copied)
        return arrived


@dataclass
class _EpochSums:
    """What one epoch has trained so far: ``batches`` of it, ``seen`` examples, the summed loss and
    count of correct predictions (on the device until the epoch ends), and its seconds (training
    only, and in all). A step budget may stop an epoch part way; the checkpoint keeps its sums
    (:meth:`state`) so that a larger budget finishes that epoch exactly as one run would."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    batches: int = 0
    seen: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    checks: list[list[float]] = field(default_factory=list)

    @classmethod
    def start(cls, device: torch.device, state: dict[str, Any] | None = None) -> _EpochSums:
        """Empty sums on ``device``, or those of an epoch cut short (from :meth:`state`)."""
        if state is None:
            zeros = (
                torch.zeros((), device=device, dtype=torch.float64),
                torch.zeros((), device=device, dtype=torch.int64),
            )
            return cls(*zeros)
        return cls(
            **{**state, "loss_sum": state["loss_sum"].to(device), "correct": state["correct"].to(device)}
        )

    def state(self) -> dict[str, Any]:
        return {**vars(self), "loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu()}


@dataclass(frozen=True)
class ValidationChecks:
    """Evaluate ``batches`` (a validation split) every ``every`` optimiser steps, and stop
    training at the first check where a rule says so:

    - ``target``: the accuracy reaches it (the stopping rule of a comparison at matched
      accuracy, chapter 11);
    - ``patience``: this many checks in a row without a new best accuracy (training to
      convergence on the validation split). The run stops where it is; it does not go back
      to the weights of its best check, which the record names.

    The checks never change what training draws from the random number generators, so a run
    that no rule stops trains exactly as it would without them."""

    batches: DeviceBatches
    every: int
    target: float | None = None
    patience: int | None = None

    def stop(self, checks: list[list[float]]) -> dict[str, Any] | None:
        """Whether to stop after the last of ``checks`` (the run's ``[step, accuracy]`` pairs so
        far, in order): ``None``, or what :func:`fit` records as ``stopped_at``."""
        step, accuracy = checks[-1]
        if self.target is not None and accuracy >= self.target:
            return {"step": step, "accuracy": accuracy, "target": self.target}
        if self.patience is not None and len(checks) > self.patience:
            best = max(range(len(checks)), key=lambda i: (checks[i][1], -i))  # first best check
            if len(checks) - 1 - best >= self.patience:
                best_step, best_accuracy = checks[best]
                return {
                    "step": step,
                    "accuracy": accuracy,
                    "patience": self.patience,
                    "best_step": best_step,
                    "best_accuracy": best_accuracy,
                }
        return None


def fit(
    model: nn.Module,
    train: DeviceBatches,
    test: DeviceBatches | None = None,
    *,
    epochs: int,
    lr: float = 1e-3,
    lr_decay: float = 0.96,
    decay_steps: int = 2000,
    lr_schedule: str = "paper",
    recon_weight: float = 5e-4,
    loss: str = "margin",
    logit_scale: float = 1.0,
    max_steps: int | None = None,
    freeze_conv1_after: float | None = None,
    more_tests: dict[str, DeviceBatches] | None = None,
    test_every: int = 1,
    checks: ValidationChecks | None = None,
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
        loss, logit_scale: CapsNet's classification loss, ``"margin"`` or ``"cross_entropy"``
            (on the lengths times ``logit_scale``; see :func:`batch_loss`).
        max_steps: stop after this many optimiser steps in all (the last epoch may be partial;
            resumed with a larger ``max_steps``, the run finishes that epoch as one run would).
        freeze_conv1_after: stop training the first convolution (``model.conv1``) once this
            fraction of the budget (``max_steps``, else every step of every epoch) has been
            trained: its weights keep their values, and the steps after it skip its weight
            gradient and the next layer's input gradient (freezing early layers, as FreezeOut,
            Brock et al. 2017). ``None`` trains it throughout. Every parameter's ``requires_grad``
            is as it was on entry when ``fit`` returns.
        more_tests: further test sets, evaluated after every epoch as ``{name}_loss``,
            ``{name}_accuracy`` and ``{name}_error``.
        test_every: evaluate the test sets every this many epochs and after the last one.
            Evaluation never changes what training draws from the random number generators.
        checks: validation accuracy within epochs, and the rules that stop training when it
            reaches a target or stops improving (:class:`ValidationChecks`). The epoch it stops
            in ends there and evaluates the test sets; a resumed run that had stopped trains no
            further.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :mod:`capsnet.hardware`).
        out_dir: the run folder (:mod:`capsnet.run_folder`) for checkpoint, metrics and run
            record (nothing is written if ``None``); held for this process while it trains.
        resume: continue from ``out_dir/checkpoint.pt``.
        progress: show progress bars.
        record: extra information for ``run.json`` and the checkpoint (e.g. the configuration
            needed to rebuild the model); a resumed run's starts from the stored one.

    Returns:
        One dict per epoch (also one line each of ``out_dir/metrics.jsonl``): ``epoch`` (1-based),
        ``step`` (optimiser steps so far), ``lr`` (the rate the next step will use),
        ``train_loss``, ``train_accuracy``, ``train_images_per_s``, ``train_seconds`` (the
        epoch's training time, without evaluation), ``seconds`` (the epoch's wall
        time) and, with ``test``, ``test_loss``, ``test_accuracy`` and ``test_error`` (in %).
        With ``checks``: ``val_checks``, the epoch's ``[step, accuracy]`` pairs, and in the epoch
        a rule stopped, ``stopped_at`` (``step``, ``accuracy``, and ``target`` or ``patience``,
        ``best_step`` and ``best_accuracy``).

    Raises:
        NonFiniteLossError: a training loss or, at the end of an epoch, a weight became NaN or
            infinite; ``out_dir`` keeps the checkpoint of the last completed epoch, so no
            checkpoint ever holds non-finite weights.
        FileExistsError: ``out_dir`` already holds a checkpoint and ``resume`` is false.
        FileNotFoundError: ``resume`` and ``out_dir`` holds no checkpoint.
        RunFolderError: ``out_dir`` is in use by another process, cannot be written, or holds
            run records without a checkpoint.
        ConfigError: ``resume`` with fewer ``epochs`` or ``max_steps`` than the run has done.
        ValueError: ``resume`` without ``out_dir``, ``epochs < 0``, ``test_every < 1``, an unknown
            ``precision``, or ``freeze_conv1_after`` outside [0, 1] or for a model without ``conv1``.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    if test_every < 1:
        raise ValueError(f"test_every must be >= 1, got {test_every}")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir, the folder of the run to continue")
    if freeze_conv1_after is not None:
        if not 0 <= freeze_conv1_after <= 1:
            raise ValueError(f"freeze_conv1_after must lie in [0, 1], got {freeze_conv1_after}")
        if not isinstance(getattr(model, "conv1", None), nn.Module):
            raise ValueError(
                f"freeze_conv1_after needs a model with a conv1 layer, got {type(model).__name__}"
            )
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    optimizer = adam(model.parameters(), lr)
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    budget = max_steps if max_steps is not None else epochs * len(train)  # known in advance
    factor = _lr_lambda(lr_decay, decay_steps) if lr_schedule == "paper" else _one_cycle(budget)
    freeze_step = None if freeze_conv1_after is None else round(freeze_conv1_after * budget)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    folder = RunFolder(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.check(resume)  # refused before the folder is made; checked again once it is held
    settings = {"precision": precision, "hardware": describe(device), "epochs": epochs}
    tests = {
        name: batches for name, batches in {"test": test, **(more_tests or {})}.items() if batches is not None
    }
    with folder.hold() if folder is not None else nullcontext(), _trainable_restored(model):
        history: list[dict[str, Any]] = []
        start_epoch, cut_short = 0, None
        checkpoint = folder.begin(resume) if folder is not None else None
        if checkpoint is not None:  # on the CPU: each tensor is copied to its parameter's device
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
            scaler.load_state_dict(checkpoint["scaler"])
            _set_rng_state(checkpoint["rng"])
            history, start_epoch = checkpoint["history"], checkpoint["epoch"]
            record = {**checkpoint.get("record", {}), **(record or {})}
            remember_backward(record.get("conv_backward", []))  # the same gradient arithmetic
            _check_budget(epochs, max_steps, start_epoch, scheduler.last_epoch)
            if history and "stopped_at" in history[-1]:  # the stopping rule ended this run
                return history
            if checkpoint.get("cut_short") and (max_steps is None or scheduler.last_epoch < max_steps):
                # a step budget stopped the last epoch part way: finish it
                start_epoch, history, cut_short = start_epoch - 1, history[:-1], checkpoint["cut_short"]

        record = {**(record or {}), **settings}
        for epoch in range(start_epoch, epochs):
            if max_steps is not None and scheduler.last_epoch >= max_steps:
                break
            sums = _EpochSums.start(device, cut_short)
            cut_short, stopped = None, None
            started = time.perf_counter()
            model.train()
            train.set_epoch(epoch)
            running = _HostValue()
            bar = tqdm(train, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
            for i, (x, y) in enumerate(bar):
                if i < sums.batches:  # trained before a resume (iterated for the same shifts)
                    continue
                if max_steps is not None and scheduler.last_epoch >= max_steps:
                    break
                if freeze_step is not None and scheduler.last_epoch >= freeze_step:
                    model.conv1.requires_grad_(False)  # from here on, a resumed run too
                with autocast(precision, device):
                    value, scores = batch_loss(
                        model, x, y, recon_weight, train=True, loss=loss, logit_scale=logit_scale
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(value).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                sums.loss_sum += value.detach().double() * len(y)
                sums.correct += (scores.detach().argmax(dim=1) == y).sum()
                sums.seen += len(y)
                sums.batches += 1
                if checks is not None and scheduler.last_epoch % checks.every == 0:
                    accuracy = evaluate(
                        model,
                        checks.batches,
                        precision=precision,
                        recon_weight=recon_weight,
                        loss=loss,
                        logit_scale=logit_scale,
                    )["accuracy"]
                    sums.checks.append([scheduler.last_epoch, accuracy])
                    earlier = [c for m in history for c in m.get("val_checks", [])]
                    if (stopped := checks.stop(earlier + sums.checks)) is not None:
                        break
                if i % 25 == 0 and (mean := running.read(sums.loss_sum / sums.seen)) is not None:
                    if not math.isfinite(mean):  # the mean is non-finite if any loss so far was
                        raise _non_finite(f"the training loss became {mean}", epoch, i, folder)
                    bar.set_postfix(loss=f"{mean:.4f}")
            total = sums.loss_sum.item()
            if not math.isfinite(total):
                raise _non_finite(f"the training loss became {total}", epoch, sums.batches - 1, folder)
            # a NaN gradient in the last step: the loss was finite, the weights are not
            if not bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
                raise _non_finite("the weights became non-finite", epoch, sums.batches - 1, folder)
            sums.train_seconds += time.perf_counter() - started
            metrics: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": scheduler.last_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": total / sums.seen,
                "train_accuracy": sums.correct.item() / sums.seen,
                "train_images_per_s": sums.seen / sums.train_seconds,
                "train_seconds": sums.train_seconds,
            }
            if checks is not None:
                metrics["val_checks"] = sums.checks
            if stopped is not None:
                metrics["stopped_at"] = stopped
            last = epoch + 1 == epochs or (max_steps is not None and scheduler.last_epoch >= max_steps)
            last = last or stopped is not None
            if (epoch + 1) % test_every == 0 or last:
                for name, batches in tests.items():  # evaluate restores the random state itself
                    result = evaluate(
                        model,
                        batches,
                        precision=precision,
                        recon_weight=recon_weight,
                        loss=loss,
                        logit_scale=logit_scale,
                    )
                    metrics.update({f"{name}_{k}": v for k, v in result.items()})
            sums.seconds += time.perf_counter() - started
            metrics["seconds"] = sums.seconds
            history.append(metrics)
            if progress:
                shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}
                tqdm.write(strict_json(shown))
            if chosen := chosen_backward():  # how this process computes convolution gradients
                record["conv_backward"] = chosen
            if folder is not None:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch + 1,
                    "elapsed": sum(m["seconds"] for m in history),
                    "history": history,
                    "record": record,
                }
                if sums.batches < len(train) and stopped is None:  # the step budget ran out
                    state["cut_short"] = sums.state()
                folder.commit(state)
            if stopped is not None:
                break
    return history


@contextmanager
def _trainable_restored(model: nn.Module) -> Iterator[None]:
    """Give every parameter back the ``requires_grad`` it had on entry, however the block ends."""
    trainable = [p.requires_grad for p in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in zip(model.parameters(), trainable, strict=True):
            parameter.requires_grad_(flag)


def _check_budget(epochs: int, max_steps: int | None, done_epochs: int, done_steps: int) -> None:
    """Refuse to resume a run with a smaller budget than it has already trained."""
    if epochs < done_epochs:
        raise ConfigError(
            f"this run has trained {done_epochs} epochs already: ask for at least that many (--epochs), "
            f"not {epochs}"
        )
    if max_steps is not None and max_steps < done_steps:
        raise ConfigError(
            f"this run has taken {done_steps} optimiser steps already: ask for at least that many "
            f"(--steps), not {max_steps}"
        )


def _non_finite(what: str, epoch: int, step: int, folder: RunFolder | None) -> NonFiniteLossError:
    kept = folder is not None and folder.checkpoint.exists()
    return NonFiniteLossError(
        f"{what} in epoch {epoch + 1} (found at step {step + 1}). "
        + (f"The last good checkpoint is kept in {folder.path}. " if kept else "")
        + ("No checkpoint was written. " if folder is not None and not kept else "")
        + "Try a lower learning rate (--lr) or fp32 precision (--precision fp32)."
    )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run of :func:`run`; ``None`` fields come from the profile.

    ``dataset`` is ``mnist``, ``fashion-mnist`` or a data set generated from MNIST digits
    (:data:`GENERATED`: ``translated-mnist``); ``model`` a key of :data:`capsnet.models.MODELS`.
    ``steps``, if set, is a budget of optimiser steps that replaces ``epochs``; ``test_every``
    thins out the per-epoch evaluation. ``loss`` (with ``logit_scale``), ``squashed``,
    ``recon_weight``, ``coupling`` and ``routing_iterations`` are the switches of the ablations
    (chapter 12); the other fields are the paper's recipe (see :func:`fit`). ``test_seed`` draws
    the test subset (and generated test sets); it defaults to :data:`TEST_SEED` whatever the
    run's ``seed``, so every run tests on the same images and runs can be compared pairwise.
    ``val_every`` evaluates the validation split (``val_size``) every so many optimiser steps, and
    ``stop_at_val_accuracy`` stops training the first time its accuracy reaches that target,
    ``val_patience`` after that many checks in a row without a new best (:class:`ValidationChecks`).
    ``freeze_conv1_after`` stops training CapsNet's first convolution after that fraction of the
    step budget (see :func:`fit`).
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
    lr_schedule: str = "paper"
    val_size: int = 0
    test_seed: int | None = None
    logit_scale: float = 1.0
    val_every: int | None = None
    stop_at_val_accuracy: float | None = None
    val_patience: int | None = None
    freeze_conv1_after: float | None = None

    def resolved(self) -> TrainConfig:
        """Fill the ``None`` size fields from the profile (0 sizes mean the whole split) and check
        every field (:meth:`check`).

        Raises:
            ConfigError: an unknown profile or a field outside its bounds.
        """
        self.check()
        try:
            profile = get_profile(self.profile)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return replace(
            self,
            profile=profile.name,
            epochs=profile.epochs if self.epochs is None else self.epochs,
            batch_size=profile.batch_size if self.batch_size is None else self.batch_size,
            train_size=profile.train_size or 0 if self.train_size is None else self.train_size,
            test_size=profile.test_size or 0 if self.test_size is None else self.test_size,
            test_seed=TEST_SEED if self.test_seed is None else self.test_seed,
        ).check()

    def check(self) -> TrainConfig:
        """Return this configuration if every field has its type and lies within its bounds
        (:data:`INTEGER_LIMITS`, learning rate and decay in ``(0, 1]``, ``recon_weight`` in
        ``[0, 1]``, ``max_shift`` at most a quarter of the image side); ``None`` sizes, epochs
        and profile are left to the profile.

        Raises:
            ConfigError: naming the field (and its command-line option), its bounds and the value.
        """
        for name, choices in _choices().items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise ConfigError(f"unknown {_label(name)} {value!r}: choose one of {', '.join(choices)}")
        for name in ("decoder", "squashed"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_label(name)} must be true or false, got {getattr(self, name)!r}")
        if self.profile is not None and not isinstance(self.profile, str):
            raise ConfigError(f"{_label('profile')} must be a profile's name, got {self.profile!r}")
        side = GENERATED[self.dataset].canvas if self.dataset in GENERATED else 28
        limits = {**INTEGER_LIMITS, "max_shift": (0, side // 4)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if value is None and name in _FROM_PROFILE:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"{_label(name)} must be an integer from {low:,} to {high:,}, got {value!r}"
                )
        scale = self.logit_scale
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale <= MAX_LOGIT_SCALE:
            raise ConfigError(
                f"{_label('logit_scale')} must be a number above 0 and at most {MAX_LOGIT_SCALE:g}, "
                f"got {scale!r}"
            )
        if scale != 1 and self.loss != "cross_entropy":
            raise ConfigError(
                f"{_label('logit_scale')} scales the logits of --loss cross_entropy; with --loss "
                f"{self.loss} it would do nothing: drop it, or add --loss cross_entropy"
            )
        if self.val_every is not None and not self.val_size:
            raise ConfigError(
                f"{_label('val_every')} evaluates the validation split, and this run holds none out: "
                "add --val-size N (for example 5000)"
            )
        target = self.stop_at_val_accuracy
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, int | float) or not 0 < target <= 1:
                raise ConfigError(
                    f"{_label('stop_at_val_accuracy')} is an accuracy: a number above 0 and at most 1 "
                    f"(0.95 for 95%), got {target!r}"
                )
            if self.val_every is None:
                raise ConfigError(
                    f"{_label('stop_at_val_accuracy')} needs the validation checks it stops on: add "
                    "--val-every N (optimiser steps between checks) and --val-size N"
                )
        freeze = self.freeze_conv1_after
        if freeze is not None:
            if isinstance(freeze, bool) or not isinstance(freeze, int | float) or not 0 <= freeze <= 1:
                raise ConfigError(
                    f"{_label('freeze_conv1_after')} is a fraction of the step budget, from 0 (never "
                    f"train Conv1) to 1 (train it throughout), got {freeze!r}"
                )
            if self.model != "capsnet":
                raise ConfigError(
                    f"{_label('freeze_conv1_after')} freezes CapsNet's first convolution; "
                    f"--model {self.model} has none: drop it"
                )
        if self.val_patience is not None and self.val_every is None:
            raise ConfigError(
                f"{_label('val_patience')} counts the validation checks it stops on: add "
                "--val-every N (optimiser steps between checks) and --val-size N"
            )
        for name, low_included in (("lr", False), ("lr_decay", False), ("recon_weight", True)):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not (0 <= value <= 1 if low_included else 0 < value <= 1):
                bounds = "from 0 to 1" if low_included else "above 0 and at most 1"
                raise ConfigError(f"{_label(name)} must be a number {bounds}, got {value!r}")
        return self

    @classmethod
    def from_record(cls, config: object) -> TrainConfig:
        """The configuration stored in a run record (``run.json["config"]``), checked like any
        other (:meth:`check`), so a damaged or crafted record fails before anything is built.

        Raises:
            ConfigError: not a mapping, unknown fields, or a field outside its bounds.
        """
        if not isinstance(config, dict):
            raise ConfigError(
                f"a run's configuration must be a mapping of its fields, got {type(config).__name__}"
            )
        unknown = sorted(map(str, set(config) - {f.name for f in fields(cls)}))
        if unknown:
            raise ConfigError(f"unknown configuration fields: {', '.join(unknown)}")
        if "test_seed" not in config and isinstance(config.get("seed"), int):
            # records written before capsnet 0.4 drew their test images with seed + 1
            config = {**config, "test_seed": config["seed"] + 1}
        return cls(**config).check()

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


# Test images are drawn with this seed, whatever the run's seed (TrainConfig.test_seed), so that
# every run of a comparison is tested on the same images.
TEST_SEED = 2018
# Validation images are held out of the training split with this fixed seed, whatever the run's
# seed, so that every run of a comparison is checked on the same images.
VALIDATION_SEED = 2017
# The largest temperature --logit-scale allows (lengths in [0, 1) times 100 already give the true
# class all but e^-100 of the probability).
MAX_LOGIT_SCALE = 100.0


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


# Named sets of TrainConfig fields (`python -m capsnet train --recipe NAME`; options given beside
# it win). fast: the paper's CapsNet aiming at >= 99% MNIST test accuracy in a fixed budget that
# takes at most 10 minutes of training on two AVX2 CPU cores (README, "Speed";
# tools/time_to_accuracy.py): a one-cycle schedule over a budget of steps fixed in advance (what
# fits in the 10 minutes at the slowest step times recorded there: about 576 s), the first convolution
# frozen after a quarter of the steps (the later steps skip about a third of the arithmetic), no
# random shifts, all training images but 5,000 held out for validation (on which the other
# settings were chosen), the test set evaluated once, at the end.
RECIPES: dict[str, dict[str, Any]] = {
    "fast": {
        "dataset": "mnist",
        "model": "capsnet",
        "train_size": 0,
        "test_size": 0,
        "val_size": 5_000,
        "batch_size": 32,
        "lr": 3e-3,
        "lr_schedule": "onecycle",
        "steps": 1_700,
        "freeze_conv1_after": 0.25,
        "max_shift": 0,
        "test_every": 1_000,
    },
}


def _digits(config: TrainConfig, split: str, root: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels a run draws from ``split`` of its source data set (MNIST for a
    generated data set): ``train_size`` of the training images, chosen with the run's seed, or
    ``test_size`` of the test images, chosen with ``test_seed`` (the same for every run).

    ``split="val"``: the ``val_size`` training images held out for validation (the same for every
    run); the ``train`` split then draws from the other training images only."""
    source = "mnist" if config.dataset in GENERATED else config.dataset
    data = load_dataset(source, "test" if split == "test" else "train", root)
    if split == "test":
        return _subset(data.images, data.labels, config.test_size, config.test_seed)
    order = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    held, kept = order[: config.val_size], order[config.val_size :]
    if split == "val":
        return data.images[held], data.labels[held]
    images, labels = (data.images[kept], data.labels[kept]) if config.val_size else (data.images, data.labels)
    return _subset(images, labels, config.train_size, config.seed)


def make_data(
    config: TrainConfig, device: torch.device, root: str | Path | None = None
) -> tuple[DeviceBatches, DeviceBatches]:
    """Training batches (shuffled, shifted) and test batches for a resolved ``config``."""
    train_data, test_data = _digits(config, "train", root), _digits(config, "test", root)
    if config.dataset in GENERATED:
        train_data = _generate(config.dataset, *train_data, seed=config.seed)
        test_data = _generate(config.dataset, *test_data, seed=config.test_seed)
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
    """The further sets evaluated beside the test split: ``val``, the validation images held out
    of the training split (with ``val_size``), and those of a generated data set (e.g.
    ``affnist_style`` beside ``translated-mnist``, made from the same test digits as its test
    split)."""
    sets = {}
    if config.val_size:
        val = _digits(config, "val", root)
        if config.dataset in GENERATED:
            val = _generate(config.dataset, *val, seed=VALIDATION_SEED)
        sets["val"] = DeviceBatches(*val, 256, device)
    if config.dataset in GENERATED:
        digits = _digits(config, "test", root)
        for name in GENERATED[config.dataset].more_tests:
            sets[name] = DeviceBatches(*_generate(name, *digits, seed=config.test_seed + 1), 256, device)
    return sets


# Bounds of the integer fields of TrainConfig (max_shift's depends on the image size). Batches
# beyond 4096 images do not fit a 16 GB GPU (CapsNet's predictions alone take 6 GB at 4096).
MAX_BATCH_SIZE = 4096
INTEGER_LIMITS: dict[str, tuple[int, int]] = {
    "epochs": (1, 10_000),
    "batch_size": (1, MAX_BATCH_SIZE),
    "train_size": (0, 100_000_000),
    "test_size": (0, 100_000_000),
    "decay_steps": (1, 1_000_000_000),
    "seed": (0, 2**32 - 1),
    "routing_iterations": (1, 20),
    "steps": (1, 1_000_000_000),
    "test_every": (1, 1_000_000_000),
    "val_size": (0, 30_000),
    "test_seed": (0, 2**32 - 1),
    "val_every": (1, 1_000_000_000),
    "val_patience": (1, 1_000_000),
}
# The largest model a record may describe (the baseline CNN has 35M parameters, CapsNet 8M).
MAX_PARAMETERS = 500_000_000
_FROM_PROFILE = (
    "epochs",
    "batch_size",
    "train_size",
    "test_size",
    "steps",
    "test_seed",
    "val_every",
    "val_patience",
)  # None: the profile's (or no step budget; test_seed: TEST_SEED; val_*: no checks, no rule)
# The fields of a resumed run that may change: the budget and how often it is evaluated.
RESUMABLE = ("epochs", "steps", "test_every")


def _choices() -> dict[str, tuple[str, ...]]:
    return {
        "dataset": tuple(sorted({*DATASETS, *GENERATED})),
        "model": tuple(MODELS),
        "precision": PRECISIONS,
        "routing_gradient": get_args(GradientMode),
        "coupling": get_args(CouplingMode),
        "loss": LOSSES,
        "lr_schedule": LR_SCHEDULES,
    }


def _label(name: str) -> str:
    """A field's name and its command-line option, e.g. ``batch_size (--batch-size)``."""
    if name in ("lr_decay", "decay_steps"):  # no option
        return name
    option = {"decoder": "--no-decoder", "squashed": "--no-squash"}.get(name, "--" + name.replace("_", "-"))
    return f"{name} ({option})"


def parse_device(device: torch.device | str | None) -> torch.device:
    """The device called ``device`` (default: :func:`capsnet.hardware.default_device`), checked to
    exist on this machine.

    Raises:
        ConfigError: an unknown device, or CUDA where there is none.
    """
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {str(device)!r} (--device): use cpu or cuda") from err
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"capsnet trains on cpu or cuda, not {parsed.type!r} (--device)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine (--device cuda): use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"there is no {parsed} here: this machine has {torch.cuda.device_count()} GPU(s)")
    return parsed


def checked_config(config: TrainConfig, device: torch.device) -> TrainConfig:
    """``config`` resolved from its profile and checked (:meth:`TrainConfig.resolved`), its
    precision too, for ``device``.

    Raises:
        ConfigError: what is wrong with it.
    """
    config = config.resolved()
    try:
        resolve_precision(config.precision, device)
    except ValueError as err:
        raise ConfigError(f"{_label('precision')}: {err}") from err
    return config


def _plain(value: object) -> bool:
    """A model argument a record may hold: a bool, a string, a number up to a million, or a short
    list of such numbers (layer sizes)."""
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int | float):
        return abs(value) <= 1_000_000
    return (
        isinstance(value, list | tuple)
        and len(value) <= 8
        and all(_plain(v) and not isinstance(v, str) for v in value)
    )


def config_of(state: dict[str, Any], path: str | Path) -> TrainConfig:
    """The configuration of a run's checkpoint or weights file ``state`` (read from ``path``),
    checked before any model is built: the record's configuration within its bounds
    (:meth:`TrainConfig.from_record`); the model's arguments plain values that agree with it (a
    run made by :func:`fit` may add sizes, e.g. ``conv_channels``); the model they describe, built
    on the ``meta`` device (which allocates no memory), at most :data:`MAX_PARAMETERS`
    parameters; and the weights exactly that model's, names and shapes.

    Raises:
        CheckpointError: what does not fit, in one line.
    """
    record = state.get("record")
    if not isinstance(record, dict) or "config" not in record:
        raise CheckpointError(f"{path} has no run configuration: it was not written by capsnet.train.run")
    try:
        config = TrainConfig.from_record(record["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path} holds an invalid run configuration: {err}") from err
    kwargs = record.get("model_kwargs")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and _plain(v) for k, v in kwargs.items()):
        raise CheckpointError(
            f"{path}: its model arguments are not a mapping of names to plain values: {kwargs!r:.200}"
        )
    contradicted = [
        f"{k}={kwargs.get(k)!r} (configuration: {v!r})"
        for k, v in config.model_kwargs().items()
        if kwargs.get(k) != v
    ]
    if contradicted:
        raise CheckpointError(
            f"{path}: its model arguments contradict its configuration: {'; '.join(contradicted)}"
        )
    try:
        with torch.device("meta"):
            model = build_model(config.model, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: cannot build the {config.model} its record describes ({err})"
        ) from err
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS:
        raise CheckpointError(
            f"{path}: its record describes a {config.model} with {parameters:,} parameters, more than the "
            f"{MAX_PARAMETERS:,} capsnet builds"
        )
    expected = {k: v.shape for k, v in model.state_dict().items()}
    weights = {k: v.shape for k, v in state["model"].items()}
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} has shape {tuple(weights[k])}, not {tuple(shape)}"
        for k, shape in expected.items()
        if k in weights and weights[k] != shape
    ]
    if problems:
        raise CheckpointError(
            f"{path}: its weights do not fit the {config.model} its record describes ("
            + "; ".join(problems[:3])
            + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
            + ")"
        )
    return config


def run(
    config: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    device: torch.device | str | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    explicit: Collection[str] | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Build data and model from ``config`` and train; returns the model and its history.

    The run folder is held and checked (:mod:`capsnet.run_folder`) and the configuration, device
    and precision are checked before any data is loaded or model built.

    With ``resume`` the run continues with the configuration stored in its checkpoint: only the
    fields in :data:`RESUMABLE` (epochs, steps, test interval) may change, and every other field
    the caller set must equal the stored one. ``explicit`` names the fields the caller set
    (default: those that differ from :class:`TrainConfig`'s defaults; the command line passes the
    options it was given). ``run.json`` holds the configuration the last command trained with
    and lists every command that trained the run (``commands``).

    Raises:
        ConfigError: invalid options, or options that conflict with the stored run; and what
            :func:`fit` raises.
    """
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir, the folder of the run to continue")
    device = parse_device(device)
    if not resume:
        config = checked_config(config, device)
    folder = RunFolder(out_dir) if out_dir is not None else None
    if folder is not None:
        folder.check(resume)  # refused before the folder is made; checked again once it is held
    with folder.hold() if folder is not None else nullcontext():
        commands = [command] if command else []
        if folder is not None:
            folder.check(resume)
        if folder is not None and resume:
            stored = folder.load()
            config = checked_config(_resumed(config_of(stored, folder.checkpoint), config, explicit), device)
            commands = stored["record"].get("commands", []) + commands
        torch.manual_seed(config.seed)
        model = build_model(config.model, **config.model_kwargs()).to(device)
        train, test = make_data(config, device, data_root)
        if config.steps is not None:  # a budget of optimiser steps fixes the number of epochs
            config = replace(config, epochs=-(-config.steps // len(train)))
        record = {"config": asdict(config), "commands": commands, "model_kwargs": config.model_kwargs()}
        more_tests = make_more_tests(config, device, data_root)
        checks = None
        if config.val_every is not None:
            checks = ValidationChecks(
                more_tests["val"], config.val_every, config.stop_at_val_accuracy, config.val_patience
            )
        history = fit(
            model,
            train,
            test,
            epochs=config.epochs,
            lr=config.lr,
            lr_decay=config.lr_decay,
            decay_steps=config.decay_steps,
            lr_schedule=config.lr_schedule,
            recon_weight=config.recon_weight if config.model == "capsnet" else 0.0,
            loss=config.loss,
            logit_scale=config.logit_scale,
            max_steps=config.steps,
            freeze_conv1_after=config.freeze_conv1_after,
            more_tests=more_tests,
            test_every=config.test_every,
            checks=checks,
            precision=config.precision,
            out_dir=out_dir,
            resume=resume,
            progress=progress,
            record=record,
        )
    return model, history


def _resumed(stored: TrainConfig, given: TrainConfig, explicit: Collection[str] | None) -> TrainConfig:
    """The configuration a resumed run trains with: ``stored``, with those :data:`RESUMABLE`
    fields of ``given`` that the caller set (``explicit``); a conflicting field is refused."""
    if explicit is None:
        explicit = [f.name for f in fields(TrainConfig) if getattr(given, f.name) != f.default]
    conflicts = [
        f"{_label(name)} {getattr(given, name)!r} (the run's: {getattr(stored, name)!r})"
        for name in explicit
        if name not in RESUMABLE and getattr(given, name) != getattr(stored, name)
    ]
    if conflicts:
        raise ConfigError(
            "--resume continues a run with its stored configuration, and these options differ from it: "
            + "; ".join(conflicts)
            + ". Only --epochs, --steps and --test-every can change: drop the others, or train into "
            "a new folder"
        )
    changes = {name: getattr(given, name) for name in RESUMABLE if name in explicit}
    if "epochs" in changes and "steps" not in changes:
        changes["steps"] = None  # an epoch budget replaces the run's step budget
    return replace(stored, **changes)


def load_trained(path: str | Path, device: torch.device | str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model from a run's ``checkpoint.pt`` or ``weights-fp16.pt``; returns it (in
    float32, eval mode, on ``device``: the CPU unless one is given) and the run's record
    (configuration, hardware, ...). The file is always read onto the CPU first, and its record is
    checked (:func:`config_of`) before any model is built.

    Raises:
        CheckpointError: the file is damaged, not capsnet's, or describes an invalid model.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    state = load_checkpoint(path, map_location="cpu")
    config_of(state, path)
    record = state["record"]
    model = build_model(record["config"]["model"], **record["model_kwargs"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()})
    return model.to(device).eval(), record


def images_fingerprint(batches: DeviceBatches) -> str:
    """SHA-256 of the images and labels of ``batches``, in order: two runs with the same
    fingerprint were tested on the same images."""
    digest = hashlib.sha256()
    for tensor in (batches.images, batches.labels):
        digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _with_per_image(result: dict[str, Any], batches: DeviceBatches) -> dict[str, Any]:
    """``result`` of :func:`evaluate` with ``per_image``, its ``"predicted"`` tensor written as
    text: ``predicted`` (one digit per image, in the test order) and ``correct`` (``1`` right,
    ``0`` wrong), beside ``images_sha256`` (:func:`images_fingerprint`)."""
    predicted = result.pop("predicted")
    if predicted.numel() and int(predicted.max()) > 9:
        raise ValueError("per-image records hold one digit per image: at most 10 classes")
    correct = predicted == batches.labels.cpu()
    return {
        **result,
        "images_sha256": images_fingerprint(batches),
        "predicted": "".join(map(str, predicted.tolist())),
        "correct": "".join("1" if right else "0" for right in correct.tolist()),
    }


def export_weights(out_dir: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """Finish a run: save its weights in float16 as ``weights-fp16.pt``, evaluate exactly those
    weights (in float32, on the run's test set and further sets), and rewrite ``metrics.jsonl``
    and ``run.json`` from the checkpoint with the result as ``run.json["final"]``: loss,
    accuracy and error, and per image (see :func:`_with_per_image`) the predicted class and
    whether it was right, with a fingerprint of the images, so that runs tested on the same
    images can be compared pairwise (:func:`capsnet.reference.per_image`)."""
    folder = RunFolder(out_dir)
    with folder.hold():
        state = folder.load()
        config_of(state, folder.checkpoint)
        model, record = load_trained(folder.checkpoint, "cpu")
        save_fp16_weights(folder.weights, model, {"record": record, "epoch": state["epoch"]})
        model, record = load_trained(folder.weights, default_device())
        config = TrainConfig.from_record(record["config"])
        device = next(model.parameters()).device
        _, test = make_data(config, device, data_root)
        settings = {
            "precision": "fp32",
            "recon_weight": config.recon_weight,
            "loss": config.loss,
            "logit_scale": config.logit_scale,
            "per_image": True,
        }
        final: dict[str, Any] = _with_per_image(evaluate(model, test, **settings), test)
        for name, batches in make_more_tests(config, device, data_root).items():
            final[name] = _with_per_image(evaluate(model, batches, **settings), batches)
        final.update(epoch=state["epoch"], weights=folder.weights.name, test_images=len(test.labels))
        folder.write_records(state, final)
    return final
