"""Command line: ``python -m capsnet train | evaluate | sweep | bench``.

Every error a user can act on (an invalid option, a taken or busy run folder, a damaged
checkpoint, missing or unreadable data, a full disk, a diverging run) is one line on stderr,
without a traceback, and exit status 1; Ctrl-C is exit status 130 and says what was kept."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .data import DATASETS
from .hardware import PRECISIONS
from .models import MODELS
from .profiles import PROFILES
from .sweeps import SWEEPS
from .train import GENERATED, LOSSES, LR_SCHEDULES, RECIPES

__all__ = ["main"]

# The options of `train` that set a TrainConfig field of the same name; the flags set a field to
# False. Not given, they are None here, so a resumed run knows which options were given.
_CONFIG_OPTIONS = (
    *("dataset", "model", "profile", "epochs", "steps", "test_every", "batch_size", "train_size"),
    *("test_size", "lr", "max_shift", "precision", "seed", "routing_iterations", "routing_gradient"),
    *("coupling", "recon_weight", "loss", "logit_scale", "lr_schedule", "val_size", "test_seed"),
    *("val_every", "stop_at_val_accuracy", "val_patience", "freeze_conv1_after"),
)
_FLAGS = {"no_decoder": "decoder", "no_squash": "squashed"}
BENCH_MAX_STEPS = 10_000


class Interrupted(Exception):
    """Ctrl-C; the message says what was kept."""


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields set on the command line (a recipe's, then the options given)."""
    given = {name: getattr(args, name) for name in _CONFIG_OPTIONS if getattr(args, name) is not None}
    recipe = RECIPES[args.recipe] if getattr(args, "recipe", None) else {}
    return recipe | given | {field: False for flag, field in _FLAGS.items() if getattr(args, flag)}


def _train(args: argparse.Namespace) -> int:
    from .run_folder import RunFolder
    from .train import TrainConfig, checked_config, export_weights, parse_device, run

    given = _given(args)
    config = TrainConfig(**given)
    device = parse_device(args.device)
    if not args.resume:  # every option is checked before the folder is touched
        config = checked_config(config, device)
        if config.profile == "paper":  # hours: say so before they start
            print(f"profile paper: {_estimate(config)}", flush=True)
    out = Path(args.out) if args.out else Path("runs") / f"{config.dataset}-{config.model}-seed{config.seed}"
    command = "python -m capsnet " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    folder = RunFolder(out)
    folder.check(args.resume)  # refused before the folder is made; checked again once it is held
    try:
        with folder.hold():  # through training and export: no other process can use the folder
            run(
                config,
                out,
                resume=args.resume,
                device=device,
                data_root=args.data,
                progress=not args.quiet,
                command=command,
                explicit=given,
            )
            final = export_weights(out, args.data)
    except KeyboardInterrupt:
        kept = (
            f"the last checkpoint in {out} is kept: continue with --out {out} --resume"
            if folder.checkpoint.exists()
            else "no epoch had finished, so nothing was saved"
        )
        raise Interrupted(f"interrupted; {kept}") from None
    print(
        f"{out}: test accuracy {final['accuracy']:.4%} (error {final['error']:.2f}%) "
        f"on {final['test_images']} images, weights in {out / final['weights']}"
    )
    return 0


def _estimate(config: Any) -> str:
    """The expected training time of a resolved ``config`` (see :mod:`capsnet.budget`)."""
    from .budget import training_estimate
    from .models import build_model

    model = build_model(config.model, **config.model_kwargs())
    images = config.train_size or 60_000  # every data set here has 60,000 training images
    side = GENERATED[config.dataset].canvas if config.dataset in GENERATED else 28
    total = config.steps * config.batch_size if config.steps else images * config.epochs
    return training_estimate(model, side, total, config.batch_size)


def _evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .run_folder import strict_json
    from .train import checked_config, config_of, evaluate, load_trained, make_data, parse_device

    device = parse_device(args.device)
    config = config_of(load_checkpoint(args.checkpoint), args.checkpoint)  # before a model is built
    config = checked_config(replace(config, precision=args.precision), device)
    if args.full_test_set:
        config = replace(config, test_size=0)
    model, _ = load_trained(args.checkpoint, device)
    _, test = make_data(config, device, args.data)
    result = evaluate(
        model,
        test,
        precision=config.precision,
        recon_weight=config.recon_weight,
        loss=config.loss,
        logit_scale=config.logit_scale,
        progress=not args.quiet,
    )
    result["test_images"] = len(test.labels)
    print(strict_json(result, indent=2))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweeps import run_sweep

    extra = shlex.split(args.train_options or "")
    trained = run_sweep(
        args.name, args.root, args.only, time_budget=args.time_budget, parallel=args.parallel, extra=extra
    )
    print(f"sweep {args.name}: trained {len(trained)} run(s); records in {Path(args.root) / args.name}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main
    from .train import MAX_BATCH_SIZE, ConfigError, parse_device

    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"--batch-size must be from 1 to {MAX_BATCH_SIZE:,}, got {args.batch_size}")
    if not 1 <= args.steps <= BENCH_MAX_STEPS:
        raise ConfigError(f"--steps must be from 1 to {BENCH_MAX_STEPS:,}, got {args.steps}")
    parse_device(args.device)
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m capsnet",
        description="Train, evaluate and benchmark capsule networks (Sabour, Frosst & Hinton 2017).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model and record the run",
        description="Train CapsNet or the baseline CNN. The run folder gets checkpoint.pt (after every "
        "epoch, written atomically), metrics.jsonl, run.json and, at the end, weights-fp16.pt.",
    )
    t.add_argument(
        "--dataset",
        choices=sorted({*DATASETS, *GENERATED}),
        help="data set (default mnist); translated-mnist: MNIST digits placed at random on 40x40, "
        "also tested on an affNIST-style set (the paper's section 5.2)",
    )
    t.add_argument("--model", choices=sorted(MODELS), help="model (default capsnet)")
    t.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        help="run size: smoke (seconds), cpu (minutes), paper (GPU); default: "
        "$CAPSNET_PROFILE, else paper on CUDA and cpu otherwise",
    )
    t.add_argument(
        "--epochs",
        type=int,
        help="epochs in total (default: the profile's); with --resume, a larger number trains on",
    )
    t.add_argument(
        "--steps",
        type=int,
        help="a budget of optimiser steps instead of --epochs (the last epoch may be partial)",
    )
    t.add_argument(
        "--test-every",
        type=int,
        help="evaluate on the test set every N epochs and after the last (default 1)",
    )
    t.add_argument("--batch-size", type=int, help="batch size (default: the profile's)")
    t.add_argument("--train-size", type=int, help="training examples, 0 = all (default: the profile's)")
    t.add_argument("--test-size", type=int, help="test examples, 0 = all (default: the profile's)")
    t.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3; with onecycle: the peak)")
    t.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="paper: x0.96 every 2,000 steps (default); onecycle: linear warm-up over 15%% of the budget, "
        "then cosine decay to 0 at its end",
    )
    t.add_argument(
        "--val-size",
        type=int,
        help="training images held out for validation, the same for every run (default 0); "
        "evaluated as val_* beside the test set",
    )
    t.add_argument(
        "--val-every",
        type=int,
        help="also evaluate the validation split every N optimiser steps (needs --val-size); "
        "recorded as val_checks in metrics.jsonl",
    )
    t.add_argument(
        "--stop-at-val-accuracy",
        type=float,
        metavar="ACCURACY",
        help="stop training the first time a validation check reaches this accuracy (e.g. 0.95; "
        "needs --val-every), then test: for comparisons at matched accuracy",
    )
    t.add_argument(
        "--val-patience",
        type=int,
        metavar="CHECKS",
        help="stop training after this many validation checks in a row without a new best "
        "accuracy (needs --val-every), then test: training to convergence on validation",
    )
    t.add_argument(
        "--freeze-conv1-after",
        type=float,
        metavar="FRACTION",
        help="stop training CapsNet's first convolution after this fraction of the step budget "
        "(0 to 1; default: train it throughout): the later steps skip its gradients, about a "
        "third of a CPU step",
    )
    t.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a named set of options, each overridden by the option itself if given; fast: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["fast"].items()),
    )
    t.add_argument(
        "--max-shift", type=int, help="random shift in pixels (default 2; at most a quarter of the image)"
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto: bf16/fp16 mixed precision where the device is fast at it, else fp32",
    )
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument(
        "--test-seed",
        type=int,
        help="seed that draws the test subset, the same for every run by default (2018), so runs "
        "compare on the same images",
    )
    t.add_argument("--routing-iterations", type=int, help="routing iterations (default 3)")
    t.add_argument(
        "--routing-gradient",
        choices=["last", "all"],
        help="backpropagate through the last routing iteration only, or all (default last)",
    )
    t.add_argument(
        "--coupling",
        choices=["dynamic", "uniform", "random"],
        help="dynamic routing, or fixed couplings for ablations (default dynamic)",
    )
    t.add_argument(
        "--no-decoder", action="store_true", default=None, help="train without the reconstruction decoder"
    )
    t.add_argument(
        "--recon-weight",
        type=float,
        help="weight of the summed squared reconstruction error (default 0.0005)",
    )
    t.add_argument(
        "--loss",
        choices=LOSSES,
        help="CapsNet's class loss: margin (the paper) or cross_entropy on the capsule lengths",
    )
    t.add_argument(
        "--logit-scale",
        type=float,
        help="with --loss cross_entropy: the logits are the capsule lengths times this (default 1)",
    )
    t.add_argument(
        "--no-squash", action="store_true", default=None, help="ablation: capsules without the squash"
    )
    t.add_argument("--out", help="run folder (default runs/DATASET-MODEL-seedSEED)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda if available)")
    t.add_argument(
        "--data",
        help="folder holding mnist/ and fashion-mnist/ (default $CAPSNET_DATA, the cache, or a download)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint or weights file on its test set",
        description="Rebuild the model of a run from CHECKPOINT (checkpoint.pt or "
        "weights-fp16.pt) and print its loss, accuracy and error on the run's test set.",
    )
    e.add_argument("checkpoint", help="path to checkpoint.pt or weights-fp16.pt")
    e.add_argument("--full-test-set", action="store_true", help="use all test images, not the run's subset")
    e.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default fp32")
    e.add_argument("--device", help="torch device (default: cuda if available)")
    e.add_argument("--data", help="data folder (as for train)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_evaluate)

    s = sub.add_parser(
        "sweep",
        help="run one of the book's recorded experiments",
        description="Run the runs of a sweep (the experiments behind chapters 11-13) one after another "
        "into ROOT/NAME/RUN; finished runs are skipped, an interrupted one is resumed.",
    )
    s.add_argument("name", choices=sorted(SWEEPS), help="the sweep")
    s.add_argument("--root", default="runs", help="folder of the sweeps (default runs)")
    s.add_argument("--only", nargs="+", metavar="RUN", help="run only these runs of the sweep")
    s.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="measure one epoch first, then start only runs expected to finish within this many seconds "
        "(the others are skipped with a note in ROOT/NAME/sweep.json)",
    )
    s.add_argument("--parallel", type=int, default=1, help="runs trained at the same time (default 1)")
    s.add_argument(
        "--train-options",
        metavar="OPTIONS",
        help='train options added to every run, e.g. "--train-size 512 --epochs 2" for a quick check',
    )
    s.set_defaults(func=_sweep)

    b = sub.add_parser(
        "bench",
        help="measure training and inference throughput",
        description="Training and inference images/s of the paper's CapsNet, peak memory, "
        "and the machine's own matmul rate, as a table and as JSON.",
    )
    b.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    b.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    b.add_argument("--device", help="torch device (default: cuda if available)")
    b.add_argument("--json", default="bench.json", help="where to write the JSON (default bench.json)")
    b.set_defaults(func=_bench)
    return parser


def _os_error(err: OSError) -> str:
    """An operating system's error as one line that says what to do."""
    if err.filename is None:  # capsnet's own, e.g. FileExistsError for a taken run folder
        return str(err)
    advice = {
        errno.ENOSPC: "the disk is full: free some space",
        errno.EACCES: "check its permissions",
        errno.EPERM: "check its permissions",
    }.get(err.errno, "check the path")
    return f"{err.filename}: {err.strerror}; {advice}"


def _out_of_memory(err: BaseException) -> bool:
    return isinstance(err, MemoryError | torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(err)


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); returns the exit status. Errors the
    user can act on (an invalid option, a taken or busy run folder, a damaged checkpoint, missing
    or unreadable data, a full disk, too little memory, a diverging run) are printed as one line,
    without a traceback, with exit status 1; Ctrl-C gives exit status 130."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .run_folder import RunFolderError
    from .sweeps import SweepError
    from .train import ConfigError, NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = f"{parser.prog} {args.command}"
    try:
        return args.func(args)
    except Interrupted as err:
        message, status = f"{prefix}: {err}", 130
    except KeyboardInterrupt:
        message, status = f"{prefix}: interrupted", 130
    except (CheckpointError, ConfigError, DataError, NonFiniteLossError, RunFolderError, SweepError) as err:
        message, status = f"{prefix}: error: {err}", 1
    except OSError as err:
        message, status = f"{prefix}: error: {_os_error(err)}", 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        message, status = f"{prefix}: error: out of memory; try a smaller --batch-size", 1
    print(" ".join(message.split()), file=sys.stderr)  # one line, whatever the message held
    return status
