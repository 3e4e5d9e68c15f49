"""Command line: ``python -m capsnet train | evaluate | bench``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .data import DATASETS
from .hardware import PRECISIONS
from .models import MODELS
from .profiles import PROFILES
from .sweeps import SWEEPS
from .train import GENERATED, LOSSES

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, export_weights, run

    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        profile=args.profile,
        epochs=args.epochs,
        batch_size=args.batch_size,
        train_size=args.train_size,
        test_size=args.test_size,
        lr=args.lr,
        recon_weight=args.recon_weight,
        max_shift=args.max_shift,
        precision=args.precision,
        seed=args.seed,
        routing_iterations=args.routing_iterations,
        routing_gradient=args.routing_gradient,
        coupling=args.coupling,
        decoder=not args.no_decoder,
        loss=args.loss,
        squashed=not args.no_squash,
        steps=args.steps,
        test_every=args.test_every,
    )
    out = Path(args.out) if args.out else Path("runs") / f"{args.dataset}-{args.model}-seed{args.seed}"
    command = "python -m capsnet " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run(
        config,
        out,
        resume=args.resume,
        device=args.device,
        data_root=args.data,
        progress=not args.quiet,
        command=command,
    )
    final = export_weights(out, args.data)
    print(
        f"{out}: test accuracy {final['accuracy']:.4%} (error {final['error']:.2f}%) "
        f"on {final['test_images']} images, weights in {out / final['weights']}"
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .train import TrainConfig, evaluate, load_trained, make_data

    model, record = load_trained(args.checkpoint, args.device)
    config = TrainConfig(**record["config"])
    if args.full_test_set:
        config = TrainConfig(**{**record["config"], "test_size": 0})
    _, test = make_data(config, next(model.parameters()).device, args.data)
    result = evaluate(
        model,
        test,
        precision=args.precision,
        recon_weight=config.recon_weight,
        loss=config.loss,
        progress=not args.quiet,
    )
    result["test_images"] = len(test.labels)
    print(json.dumps(result, indent=2))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .sweeps import run_sweep

    trained = run_sweep(args.name, args.root, args.only)
    print(f"sweep {args.name}: trained {len(trained)} run(s); records in {Path(args.root) / args.name}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

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
        default="mnist",
        help="data set (default mnist); translated-mnist: MNIST digits placed at random on 40x40, "
        "also tested on an affNIST-style set (the paper's section 5.2)",
    )
    t.add_argument("--model", choices=sorted(MODELS), default="capsnet", help="model (default capsnet)")
    t.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default=None,
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
        default=1,
        help="evaluate on the test set every N epochs and after the last (default 1)",
    )
    t.add_argument("--batch-size", type=int, help="batch size (default: the profile's)")
    t.add_argument("--train-size", type=int, help="training examples, 0 = all (default: the profile's)")
    t.add_argument("--test-size", type=int, help="test examples, 0 = all (default: the profile's)")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--max-shift", type=int, default=2, help="random shift in pixels (default 2)")
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="auto: bf16/fp16 mixed precision where the device is fast at it, else fp32",
    )
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--routing-iterations", type=int, default=3, help="routing iterations (default 3)")
    t.add_argument(
        "--routing-gradient",
        choices=["last", "all"],
        default="last",
        help="backpropagate through the last routing iteration only, or all (default last)",
    )
    t.add_argument(
        "--coupling",
        choices=["dynamic", "uniform", "random"],
        default="dynamic",
        help="dynamic routing, or fixed couplings for ablations (default dynamic)",
    )
    t.add_argument("--no-decoder", action="store_true", help="train without the reconstruction decoder")
    t.add_argument(
        "--recon-weight",
        type=float,
        default=5e-4,
        help="weight of the summed squared reconstruction error (default 0.0005)",
    )
    t.add_argument(
        "--loss",
        choices=LOSSES,
        default="margin",
        help="CapsNet's class loss: margin (the paper) or cross_entropy on the capsule lengths",
    )
    t.add_argument("--no-squash", action="store_true", help="ablation: capsules without the squash")
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


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); returns the exit status. Errors the
    user can act on (a taken run folder, a damaged checkpoint, missing data, a diverging run) are
    printed as one line, without a traceback, with exit status 1."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .train import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, DataError, NonFiniteLossError, FileExistsError, FileNotFoundError) as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 1
