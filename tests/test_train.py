"""The training engine: exact resume, the learning-rate schedule, non-finite losses, the run
folder's files, evaluation, precision, exported float16 weights, and profiles.

Everything trains tiny models on tiny random data for a handful of steps (one CPU thread: for
models this small, thread hand-offs cost more than they save)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import capsnet
import capsnet.reference
import capsnet.train as train_module
from capsnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from capsnet.data import DataError, DeviceBatches, locate_file
from capsnet.hardware import _cpu_has_bf16, autocast, describe, resolve_precision
from capsnet.losses import margin_loss, reconstruction_loss
from capsnet.run_folder import LOCK
from capsnet.train import (
    ConfigError,
    NonFiniteLossError,
    TrainConfig,
    adam,
    batch_loss,
    evaluate,
    export_weights,
    fit,
    load_trained,
    make_data,
    make_more_tests,
)

TINY_CAPSNET = {"conv_channels": 16, "primary_types": 4, "decoder_hidden": (32, 64)}
TINY_BASELINE = {"channels": (4, 4, 4), "hidden": (8, 8)}
BUILDERS = {
    "capsnet": lambda: capsnet.CapsNet(**TINY_CAPSNET),
    "baseline": lambda: capsnet.BaselineCNN(**TINY_BASELINE),
    # random couplings draw from the global random number generator, in evaluation too
    "capsnet-random": lambda: capsnet.CapsNet(**TINY_CAPSNET, coupling="random"),
}
TIMING_KEYS = {"seconds", "train_images_per_s", "train_seconds"}
METRIC_KEYS = {
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_accuracy",
    "train_images_per_s",
    "train_seconds",
    "test_loss",
    "test_accuracy",
    "test_error",
    "seconds",
}
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 48, batch: int = 16, seed: int = 0) -> tuple[DeviceBatches, DeviceBatches]:
    """Random uint8 images: training batches shuffled and shifted as in real runs, test batches."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=gen)
    train = DeviceBatches(images, labels, batch, shuffle=True, max_shift=2, seed=seed)
    return train, DeviceBatches(images[:20], labels[:20], 8)


def _train(kind: str, out: Path | None, epochs: int, *, init_seed: int = 0, **kwargs):
    """A fresh model (as a new process would build it) trained by :func:`fit`."""
    torch.manual_seed(init_seed)
    model = BUILDERS[kind]()
    train, test = _data()
    kwargs = {"precision": "fp32", "progress": False, **kwargs}
    return model, fit(model, train, test, epochs=epochs, out_dir=out, **kwargs)


def _files(folder: Path) -> list[str]:
    """The files in a run folder, but for the lock file (kept or removed by filelock's version)."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK)


def _without_timings(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in history]


def _read_metrics(out: Path) -> list[dict]:
    def reject(constant):  # NaN / Infinity are not JSON
        raise ValueError(f"metrics.jsonl holds {constant}")

    return [
        json.loads(line, parse_constant=reject) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("kind", ["capsnet", "baseline"])
def test_resume_is_exact(tmp_path, kind):
    """4 epochs straight == 2 epochs, then a restart (new model with other initial weights, new
    optimiser, other global RNG state) resumed up to 4: same weights, same metrics."""
    straight, history = _train(kind, tmp_path / "straight", 4)
    _train(kind, tmp_path / "resumed", 2)
    resumed, resumed_history = _train(kind, tmp_path / "resumed", 4, init_seed=123, resume=True)
    _assert_same_weights(straight, resumed)
    assert [m["epoch"] for m in resumed_history] == [1, 2, 3, 4]
    assert _without_timings(resumed_history) == _without_timings(history)
    assert _without_timings(_read_metrics(tmp_path / "resumed")) == _without_timings(history)
    run_record = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run_record["epochs_done"] == 4
    assert run_record["wall_seconds"] == pytest.approx(sum(m["seconds"] for m in resumed_history))


def test_resume_restores_the_random_state(tmp_path, monkeypatch):
    """The baseline's dropout draws from the global RNG: without restoring it, the resumed run
    differs. (Shows that test_resume_is_exact[baseline] can fail.)"""
    straight, _ = _train("baseline", tmp_path / "straight", 2)
    _train("baseline", tmp_path / "resumed", 1)
    monkeypatch.setattr(train_module, "_set_rng_state", lambda state: None)
    resumed, _ = _train("baseline", tmp_path / "resumed", 2, init_seed=123, resume=True)
    assert not all(
        torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True)
    )


def test_resume_to_the_same_epoch_count_trains_no_more(tmp_path):
    model, history = _train("capsnet", tmp_path, 1)
    again, again_history = _train("capsnet", tmp_path, 1, init_seed=5, resume=True)
    _assert_same_weights(model, again)
    assert again_history == history


def test_existing_run_folder_needs_resume(tmp_path):
    _train("baseline", tmp_path, 1)
    with pytest.raises(FileExistsError, match="resume=True"):
        _train("baseline", tmp_path, 2)
    assert len(_read_metrics(tmp_path)) == 1  # untouched


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="needs out_dir"):
        _train("baseline", None, 1, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        _train("baseline", tmp_path / "empty", 1, resume=True)
    assert not (tmp_path / "empty").exists()  # refused before anything was made


def test_bad_arguments():
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        _train("baseline", None, -1)
    with pytest.raises(ValueError, match="fp32"):
        _train("baseline", None, 1, precision="fp64")


# ----------------------------------------------------------------------------- learning rate


def test_learning_rate_schedule(monkeypatch):
    """Step s (0-based) uses lr * decay ** (s / decay_steps), the paper's smooth exponential decay."""
    used = []
    adam_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return adam_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    _, history = _train("baseline", None, 2, decay_steps=2)  # 3 steps per epoch
    assert len(used) == 6
    for s, lr in enumerate(used):
        assert lr == pytest.approx(1e-3 * 0.96 ** (s / 2), rel=1e-12)
    for metrics in history:  # the rate the next step will use
        assert metrics["lr"] == pytest.approx(1e-3 * 0.96 ** (metrics["step"] / 2), rel=1e-12)
    assert [m["step"] for m in history] == [3, 6]


def test_adam_is_fused_on_the_cpu_and_equals_the_default_to_rounding():
    """``adam`` takes PyTorch's fused kernel on the CPU; 30 steps under a changing learning rate
    end where the default implementation ends, up to float64 rounding."""
    start = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ends = []
    for make in (adam, lambda params, lr: torch.optim.Adam(params, lr=lr)):
        weight = torch.nn.Parameter(start.clone())
        optimizer = make([weight], 1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        gradients = torch.Generator().manual_seed(1)
        for _ in range(30):
            weight.grad = torch.randn(500, dtype=torch.float64, generator=gradients)
            optimizer.step()
            schedule.step()
        ends.append(weight.detach())
    assert adam([torch.nn.Parameter(start)], 1e-3).defaults["fused"] is True
    assert not torch.equal(ends[0], start)
    torch.testing.assert_close(ends[0], ends[1], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------------- non-finite losses


def _loss_patch(monkeypatch, at_step: int, make_bad):
    """Replace the training loss at (1-based) training step ``at_step`` by ``make_bad(loss, model)``."""
    real = train_module.batch_loss
    steps = [0]

    def patched(model, x, y, recon_weight, train, **options):
        loss, scores = real(model, x, y, recon_weight, train, **options)
        if train:
            steps[0] += 1
            if steps[0] == at_step:
                loss = make_bad(loss, model)
        return loss, scores

    monkeypatch.setattr(train_module, "batch_loss", patched)


def _assert_good_checkpoint_of_epoch_1(out: Path) -> None:
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(v.isfinite().all() for v in state["model"].values())
    assert len(_read_metrics(out)) == 1
    assert json.loads((out / "run.json").read_text())["epochs_done"] == 1


NAN_CASES = {
    # NaN loss and NaN gradients: the weights become NaN from then on
    "nan-weights": (5, lambda loss, model: loss * float("nan")),
    # a NaN loss whose gradient is finite: training could carry on, but the loss is not a number
    "nan-value": (5, lambda loss, model: loss + float("nan")),
    # an infinite loss value
    "inf-value": (5, lambda loss, model: loss + float("inf")),
    # a finite loss with NaN gradients at the last step of epoch 2 (sqrt'(0) * 0 = inf * 0)
    "nan-gradient": (
        6,
        lambda loss, model: loss + torch.sqrt(0.0 * sum(p.sum() for p in model.parameters())),
    ),
}


@pytest.mark.parametrize("case", NAN_CASES)
def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, case):
    """3 steps per epoch; the bad step is in epoch 2. Error, and epoch 1's checkpoint is intact
    and resumable."""
    at_step, make_bad = NAN_CASES[case]
    _loss_patch(monkeypatch, at_step, make_bad)
    with pytest.raises(NonFiniteLossError, match="in epoch 2") as info:
        _train("capsnet", tmp_path, 3)
    message = str(info.value)
    assert str(tmp_path) in message and "--lr" in message  # where the good checkpoint is, what to try
    _assert_good_checkpoint_of_epoch_1(tmp_path)
    monkeypatch.undo()
    _, history = _train("capsnet", tmp_path, 2, resume=True)
    assert [m["epoch"] for m in history] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in history)


def test_non_finite_loss_in_the_first_epoch_writes_nothing(tmp_path, monkeypatch):
    _loss_patch(monkeypatch, 2, NAN_CASES["nan-weights"][1])
    with pytest.raises(NonFiniteLossError, match=r"loss became nan in epoch 1") as info:
        _train("capsnet", tmp_path, 2)
    assert not (tmp_path / "checkpoint.pt").exists()
    assert "No checkpoint was written" in str(info.value) and str(tmp_path) not in str(info.value)


def test_divergence_with_a_huge_learning_rate(tmp_path):
    """A real divergence, no patching: the baseline CNN with lr = 1e10 (CapsNet's lengths are
    bounded by the squash, so it does not reach NaN this way)."""
    with pytest.raises(NonFiniteLossError, match="loss became nan in epoch 1.*Try a lower learning rate"):
        _train("baseline", tmp_path, 3, lr=1e10)
    assert not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- run folder


def test_metrics_and_run_record(tmp_path):
    record = {"config": {"note": "anything the caller wants kept"}, "model_kwargs": TINY_CAPSNET}
    _, history = _train("capsnet", tmp_path, 2, record=record)
    lines = _read_metrics(tmp_path)
    assert lines == history
    assert [m["epoch"] for m in lines] == [1, 2]
    assert [m["step"] for m in lines] == [3, 6]  # 48 images, batches of 16
    for m in lines:
        assert set(m) == METRIC_KEYS
        assert 0 <= m["train_accuracy"] <= 1 and 0 <= m["test_accuracy"] <= 1
        assert m["test_error"] == pytest.approx(100 * (1 - m["test_accuracy"]))
        assert m["seconds"] > 0 and m["train_images_per_s"] > 0
    run_record = json.loads((tmp_path / "run.json").read_text())
    assert run_record["config"] == record["config"]
    assert run_record["model_kwargs"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in TINY_CAPSNET.items()
    }
    assert run_record["hardware"] == describe(CPU)
    assert run_record["precision"] == "fp32"
    assert run_record["epochs"] == run_record["epochs_done"] == 2
    assert run_record["wall_seconds"] == pytest.approx(sum(m["seconds"] for m in lines))
    assert _files(tmp_path) == ["checkpoint.pt", "metrics.jsonl", "run.json"]


def test_a_resumed_run_keeps_its_record(tmp_path):
    _train("baseline", tmp_path, 1, record={"config": {"note": "kept"}, "commands": ["first"]})
    _train("baseline", tmp_path, 2, resume=True)  # no record passed: the stored one goes on
    run_record = json.loads((tmp_path / "run.json").read_text())
    assert (run_record["config"], run_record["commands"], run_record["epochs"]) == (
        {"note": "kept"},
        ["first"],
        2,
    )
    _train("baseline", tmp_path, 3, resume=True, record={"commands": ["first", "second"]})
    run_record = json.loads((tmp_path / "run.json").read_text())
    assert (run_record["config"], run_record["commands"]) == ({"note": "kept"}, ["first", "second"])


def test_without_test_batches_or_folder():
    torch.manual_seed(0)
    model = BUILDERS["capsnet"]()
    history = fit(model, _data()[0], epochs=1, precision="fp32", progress=False)
    assert set(history[0]) == {k for k in METRIC_KEYS if not k.startswith("test_")}


def test_progress_output(capsys):
    _train("baseline", None, 1, progress=True)
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["epoch"] == 1 and set(shown) == METRIC_KEYS


# ----------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("kind", ["capsnet", "baseline"])
def test_evaluate_matches_a_hand_count(kind):
    """20 images in batches of 7, 7 and 6; labels chosen so that exactly 5 predictions are right."""
    torch.manual_seed(0)
    model = BUILDERS[kind]()
    images = torch.randint(
        0, 256, (20, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    x = images.float() / 255
    model.eval()
    with torch.no_grad():
        out = model(x)
    scores = out.lengths if kind == "capsnet" else out
    predicted = scores.argmax(dim=1)
    labels = torch.where(torch.arange(20) < 5, predicted, (predicted + 1) % 10)
    with torch.no_grad():
        if kind == "capsnet":
            expected_loss = margin_loss(out.lengths, labels) + 5e-4 * reconstruction_loss(
                out.reconstructions, x
            )
        else:
            expected_loss = torch.nn.functional.cross_entropy(out, labels)
    model.train()
    result = evaluate(model, DeviceBatches(images, labels, 7), precision="fp32")
    assert result["accuracy"] == 5 / 20
    assert result["error"] == pytest.approx(75.0)
    assert result["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert model.training  # evaluate puts the model back in the mode it found it in


def test_evaluate_in_auto_precision():
    torch.manual_seed(0)
    model = BUILDERS["capsnet"]()
    _, test = _data()
    fp32 = evaluate(model, test, precision="fp32")
    auto = evaluate(model, test, precision="auto")
    assert 0 <= auto["accuracy"] <= 1
    assert auto["loss"] == pytest.approx(fp32["loss"], rel=0.05)  # bf16 rounding at most


# ----------------------------------------------------------------------------- precision


def _cpuinfo_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_auto_precision_on_the_cpu():
    resolved = resolve_precision("auto", CPU)
    assert resolved == ("bf16" if _cpu_has_bf16() else "fp32")
    flags = _cpuinfo_flags()
    if flags is not None and {"avx512_bf16", "amx_bf16"} & flags:
        assert resolved == "bf16"  # a CPU with bf16 instructions gets bf16
    if resolved == "bf16":
        with autocast(resolved, CPU):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with autocast("fp32", CPU):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bad_precisions():
    with pytest.raises(ValueError, match="fp16 autocast is for CUDA"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16.*'half'"):
        resolve_precision("half", CPU)
    torch.manual_seed(0)
    model = BUILDERS["baseline"]()
    with pytest.raises(ValueError, match="fp16"):
        evaluate(model, _data()[1], precision="fp16")
    with pytest.raises(ValueError, match="fp16"):
        fit(model, _data()[0], epochs=1, precision="fp16", progress=False)


# ----------------------------------------------------------------------------- exported weights


@pytest.fixture
def mnist_root():
    try:
        for file in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
            locate_file("mnist", file, download=False)
    except DataError:
        pytest.skip("MNIST is not available offline (set CAPSNET_DATA)")


def test_export_weights_and_load_trained(tmp_path, mnist_root):
    config = TrainConfig(
        profile="smoke", train_size=64, test_size=64, batch_size=32, precision="fp32"
    ).resolved()
    train, test = make_data(config, CPU)
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET, **config.model_kwargs())
    record = {"config": asdict(config), "model_kwargs": {**config.model_kwargs(), **TINY_CAPSNET}}
    fit(model, train, test, epochs=1, precision="fp32", out_dir=tmp_path, record=record, progress=False)

    final = export_weights(tmp_path)
    run_record = json.loads((tmp_path / "run.json").read_text())
    assert run_record["final"] == final
    assert final["epoch"] == 1 and final["test_images"] == 64 and final["weights"] == "weights-fp16.pt"
    assert run_record["config"] == json.loads(json.dumps(asdict(config)))  # the rest is kept

    fp32_file = tmp_path / "fp32.pt"
    torch.save(model.state_dict(), fp32_file)
    ratio = (tmp_path / "weights-fp16.pt").stat().st_size / fp32_file.stat().st_size
    assert 0.45 < ratio < 0.6, ratio

    from_checkpoint, _ = load_trained(tmp_path / "checkpoint.pt", "cpu")
    _assert_same_weights(from_checkpoint, model)
    loaded, loaded_record = load_trained(tmp_path / "weights-fp16.pt", "cpu")
    assert not loaded.training
    assert loaded_record["config"] == run_record["config"]
    for (name, value), trained in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert value.dtype == torch.float32, name
        assert torch.equal(value, trained.half().float()), name
    again = evaluate(
        loaded, make_data(config, CPU)[1], precision="fp32", recon_weight=config.recon_weight, per_image=True
    )
    assert again["accuracy"] == final["accuracy"]
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-12)

    # per image: the predicted class and whether it was right, with the images' fingerprint
    assert final["predicted"] == "".join(map(str, again["predicted"].tolist()))
    assert len(final["correct"]) == 64 and final["correct"].count("1") == round(64 * final["accuracy"])
    assert final["images_sha256"] == train_module.images_fingerprint(test)
    recorded = capsnet.reference.per_image(run_record)
    assert torch.equal(recorded["correct"], again["predicted"] == test.labels)
    assert torch.equal(recorded["predicted"], again["predicted"])
    with pytest.raises(LookupError, match="no per-image record of its 'val' images.*train it again"):
        capsnet.reference.per_image(run_record, "val")


def test_every_run_is_tested_on_the_same_images(mnist_root):
    """The test subset comes from test_seed (TEST_SEED unless given), not from the run's seed; a
    record written before test_seed existed keeps the images it was tested on (seed + 1)."""
    configs = [TrainConfig(profile="smoke", train_size=32, test_size=48, seed=s).resolved() for s in (0, 1)]
    assert {c.test_seed for c in configs} == {train_module.TEST_SEED}
    (train0, test0), (train1, test1) = (make_data(c, CPU) for c in configs)
    assert torch.equal(test0.images, test1.images) and torch.equal(test0.labels, test1.labels)
    assert not torch.equal(train0.images, train1.images)
    assert train_module.images_fingerprint(test0) == train_module.images_fingerprint(test1)
    other = make_data(replace(configs[0], test_seed=7), CPU)[1]
    assert train_module.images_fingerprint(other) != train_module.images_fingerprint(test0)

    legacy = {k: v for k, v in asdict(configs[1]).items() if k != "test_seed"}
    assert TrainConfig.from_record(legacy).test_seed == 2  # seed 1 drew its test images with seed 2


def test_load_trained_needs_a_run_configuration(tmp_path):
    _train("baseline", tmp_path, 1)  # no record: fit alone does not know how to rebuild the model
    with pytest.raises(CheckpointError, match="no run configuration"):
        load_trained(tmp_path / "checkpoint.pt", "cpu")


def test_load_trained_checks_a_crafted_record_before_building_anything(tmp_path, monkeypatch):
    # A record that asks for an absurd model is refused from its description alone: build_model
    # is never called (it would try to allocate the weights).
    state = {
        "model": {},
        "record": {
            "config": {**asdict(TrainConfig().resolved()), "model": "capsnet"},
            "model_kwargs": {"conv_channels": 10**9},
        },
    }
    path = tmp_path / "weights-fp16.pt"
    save_checkpoint(path, state)
    monkeypatch.setattr(train_module, "build_model", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(CheckpointError):
        load_trained(path, "cpu")


def test_train_config_takes_sizes_from_the_profile(monkeypatch):
    smoke = TrainConfig(profile="smoke").resolved()
    assert (smoke.profile, smoke.epochs, smoke.batch_size, smoke.train_size, smoke.test_size) == (
        "smoke",
        1,
        64,
        512,
        256,
    )
    paper = TrainConfig(profile="paper").resolved()
    assert (paper.epochs, paper.batch_size, paper.train_size, paper.test_size) == (50, 128, 0, 0)  # 0 = all
    mine = TrainConfig(profile="smoke", epochs=3, batch_size=8, train_size=0, test_size=10).resolved()
    assert (mine.epochs, mine.batch_size, mine.train_size, mine.test_size) == (3, 8, 0, 10)
    with pytest.raises(ConfigError, match=r"epochs \(--epochs\) must be an integer from 1 to 10,000, got 0"):
        TrainConfig(profile="paper", epochs=0).resolved()
    monkeypatch.setenv("CAPSNET_PROFILE", "cpu")
    from_env = TrainConfig().resolved()
    assert (from_env.profile, from_env.train_size, from_env.epochs) == ("cpu", 12_000, 2)
    assert from_env.resolved() == from_env
    with pytest.raises(ValueError, match="unknown profile"):
        TrainConfig(profile="huge").resolved()


def test_train_config_model_kwargs():
    config = TrainConfig(routing_iterations=1, coupling="uniform", decoder=False)
    model = capsnet.CapsNet(**TINY_CAPSNET, **config.model_kwargs())
    assert model.decoder is None
    assert TrainConfig(model="baseline").model_kwargs() == {}


# ----------------------------------------------------------------------------- ablation switches


def test_cross_entropy_loss_uses_the_lengths_as_logits():
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET).eval()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    loss, lengths = batch_loss(model, x, y, 0.0, train=False, loss="cross_entropy")
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(model(x).lengths, y))
    margin, _ = batch_loss(model, x, y, 0.0, train=False)
    assert torch.allclose(margin, margin_loss(lengths, y))
    assert not torch.allclose(loss, margin)
    with pytest.raises(ValueError, match="loss must be one of margin, cross_entropy, got 'hinge'"):
        batch_loss(model, x, y, 0.0, train=False, loss="hinge")


def test_cross_entropy_with_a_temperature_scales_the_lengths():
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET).eval()
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6)
    loss, lengths = batch_loss(model, x, y, 0.0, train=False, loss="cross_entropy", logit_scale=10.0)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(10.0 * lengths, y))
    # the floor log(1 + 9/e) of unscaled lengths, and how a temperature lowers it
    best = torch.zeros(1, 10)
    best[0, 0] = 1.0
    floor = torch.nn.functional.cross_entropy(best, torch.tensor([0])).item()
    assert floor == pytest.approx(math.log(1 + 9 / math.e))
    assert torch.nn.functional.cross_entropy(10 * best, torch.tensor([0])).item() < 1e-3
    assert TrainConfig(profile="smoke", loss="cross_entropy", logit_scale=30).resolved().logit_scale == 30
    with pytest.raises(ConfigError, match=r"logit_scale \(--logit-scale\) scales the logits of --loss"):
        TrainConfig(profile="smoke", logit_scale=10).resolved()
    for bad in (0, -1.0, 1000, True, "10"):
        with pytest.raises(ConfigError, match=r"logit_scale \(--logit-scale\) must be a number above 0"):
            TrainConfig(profile="smoke", loss="cross_entropy", logit_scale=bad).resolved()


def test_max_steps_stops_in_the_middle_of_an_epoch(tmp_path):
    _, history = _train("capsnet", tmp_path, 5, max_steps=4)  # 3 batches per epoch
    assert [m["step"] for m in history] == [3, 4]
    _, again = _train("capsnet", tmp_path, 5, max_steps=4, resume=True)  # nothing left to do
    assert [m["step"] for m in again] == [3, 4]


def test_a_step_budget_is_extended_exactly(tmp_path):
    """2 steps (epoch 1 cut short), resumed to 5, then to 3 whole epochs: the same weights and
    metrics as runs trained straight to those budgets (3 batches per epoch)."""
    straight, history = _train("baseline", tmp_path / "straight", 5, max_steps=5)
    _train("baseline", tmp_path / "split", 5, max_steps=2)
    resumed, resumed_history = _train(
        "baseline", tmp_path / "split", 5, max_steps=5, resume=True, init_seed=9
    )
    _assert_same_weights(straight, resumed)
    assert [m["step"] for m in resumed_history] == [3, 5]
    assert _without_timings(resumed_history) == _without_timings(history)
    assert _without_timings(_read_metrics(tmp_path / "split")) == _without_timings(history)
    straight, history = _train("baseline", tmp_path / "epochs", 3)
    resumed, resumed_history = _train("baseline", tmp_path / "split", 3, resume=True)  # no step budget now
    _assert_same_weights(straight, resumed)
    assert _without_timings(resumed_history) == _without_timings(history)


def test_changing_test_every_on_resume_changes_no_weights(tmp_path, monkeypatch):
    """Evaluation runs on its own copy of the random state: CapsNet with random couplings draws
    from it when evaluated, yet evaluating more or less often leaves training as it was."""
    straight, _ = _train("capsnet-random", tmp_path / "straight", 3)
    _train("capsnet-random", tmp_path / "resumed", 1)
    resumed, history = _train("capsnet-random", tmp_path / "resumed", 3, test_every=3, resume=True)
    _assert_same_weights(straight, resumed)
    assert ["test_accuracy" in m for m in history] == [True, False, True]
    monkeypatch.setattr(torch.random, "fork_rng", lambda **kwargs: contextlib.nullcontext())
    unforked, _ = _train("capsnet-random", tmp_path / "unforked", 3, test_every=2)
    assert not all(
        torch.equal(a, b) for a, b in zip(straight.parameters(), unforked.parameters(), strict=True)
    )


def test_resume_with_a_smaller_budget_is_refused(tmp_path):
    _train("baseline", tmp_path, 2)
    with pytest.raises(
        ConfigError, match=r"trained 2 epochs already: ask for at least that many \(--epochs\)"
    ):
        _train("baseline", tmp_path, 1, resume=True)
    with pytest.raises(ConfigError, match=r"taken 6 optimiser steps already.*\(--steps\), not 4"):
        _train("baseline", tmp_path, 2, max_steps=4, resume=True)
    assert len(_read_metrics(tmp_path)) == 2


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_resume_loads_the_checkpoint_to_the_cpu_whatever_the_model_device(tmp_path):
    """The model's device must not decide where the checkpoint is loaded: the random number
    generator's state must stay a CPU byte tensor (on CUDA, map_location=device broke every
    resume). A model on the meta device stands in for a GPU here: loading the checkpoint there
    would make torch.set_rng_state fail."""
    _train("capsnet", tmp_path, 1)
    with torch.device("meta"):
        model = BUILDERS["capsnet"]()
    history = fit(
        model, _data()[0], epochs=1, precision="fp32", out_dir=tmp_path, resume=True, progress=False
    )
    assert [m["epoch"] for m in history] == [1]
    assert model.conv1.weight.device.type == "meta"  # the weights were copied to the model's device


def test_rng_states_are_restored_as_cpu_byte_tensors(monkeypatch):
    saved = train_module._rng_state()
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    state = {"torch": saved["torch"].clone(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    torch.manual_seed(123)
    train_module._set_rng_state(state)
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert len(restored) == 1  # one state per GPU there is
    assert all(s.device.type == "cpu" and s.dtype == torch.uint8 for s in restored)


def test_records_are_strict_json(tmp_path):
    """NaN is not JSON: a record holding one is refused before anything is written."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        _train("baseline", tmp_path, 1, record={"note": float("nan")})
    assert _files(tmp_path) == []


def test_the_progress_value_is_read_at_once_on_the_cpu():
    assert train_module._HostValue().read(torch.tensor(2.5, dtype=torch.float64)) == 2.5


def test_test_every():
    _, history = _train("baseline", None, 5, test_every=2)
    assert ["test_accuracy" in m for m in history] == [False, True, False, True, True]
    _, history = _train("baseline", None, 5, test_every=100, max_steps=7)  # 3 batches per epoch
    assert ["test_accuracy" in m for m in history] == [False, False, True]
    with pytest.raises(ValueError, match="test_every must be >= 1"):
        _train("baseline", None, 1, test_every=0)


def test_more_tests_are_evaluated_every_epoch():
    _, extra = _data(seed=1)
    _, history = _train("baseline", None, 2, more_tests={"other": extra})
    for metrics in history:
        assert {"other_loss", "other_accuracy", "other_error"} <= set(metrics)
        assert metrics["other_error"] == pytest.approx(100 * (1 - metrics["other_accuracy"]))


def test_train_config_checks_ablation_settings():
    with pytest.raises(ConfigError, match=r"unknown dataset \(--dataset\) 'emnist'.*translated-mnist"):
        TrainConfig(dataset="emnist").resolved()
    with pytest.raises(ConfigError, match=r"unknown loss \(--loss\) 'mse': choose one of margin"):
        TrainConfig(loss="mse").resolved()
    with pytest.raises(ConfigError, match=r"steps \(--steps\) must be an integer from 1 to"):
        TrainConfig(steps=0).resolved()
    config = TrainConfig(squashed=False, dataset="translated-mnist")
    assert config.model_kwargs()["squashed"] is False and config.model_kwargs()["input_size"] == 40
    assert TrainConfig(model="cnn-small", dataset="translated-mnist").model_kwargs() == {"input_size": 40}


def test_translated_mnist_data(mnist_root):
    config = TrainConfig(dataset="translated-mnist", profile="smoke", train_size=32, test_size=16).resolved()
    train, test = make_data(config, CPU)
    assert train.images.shape == (32, 1, 40, 40) and test.images.shape == (16, 1, 40, 40)
    ((name, affnist),) = make_more_tests(config, CPU).items()
    assert name == "affnist_style" and affnist.images.shape == (16, 1, 40, 40)
    assert torch.equal(affnist.labels, test.labels)  # the same test digits, transformed differently
    assert not torch.equal(affnist.images, test.images)
    # each translated test image holds all the ink of its MNIST test digit, unchanged
    split = capsnet.data.load_dataset("mnist", "test")
    digits, labels = train_module._subset(split.images, split.labels, 16, config.test_seed)
    assert torch.equal(test.labels, labels)
    assert torch.equal(test.images.sum(dim=(1, 2, 3)), digits.sum(dim=(1, 2, 3)))
    assert make_more_tests(TrainConfig(profile="smoke").resolved(), CPU) == {}


# ----------------------------------------------------------------------------- checked configurations


BAD_CONFIGS = {
    "batch_size": (
        [0, -1, 4097, True, "64", 2.0],
        r"batch_size \(--batch-size\) must be an integer from 1 to 4,096",
    ),
    "train_size": ([-1], r"train_size \(--train-size\) must be an integer from 0 to"),
    "test_size": ([-5], r"test_size \(--test-size\) must be an integer from 0 to"),
    "max_shift": ([-1, 8, 1000], r"max_shift \(--max-shift\) must be an integer from 0 to 7,"),
    "lr": ([0, -1.0, 2.0, float("nan"), float("inf")], r"lr \(--lr\) must be a number above 0 and at most 1"),
    "lr_decay": ([0.0, 1.5], r"lr_decay must be a number above 0 and at most 1"),
    "recon_weight": ([-0.1, 5.0], r"recon_weight \(--recon-weight\) must be a number from 0 to 1"),
    "routing_iterations": (
        [0, 21],
        r"routing_iterations \(--routing-iterations\) must be an integer from 1 to 20",
    ),
    "epochs": ([0, 10_001], r"epochs \(--epochs\) must be an integer from 1 to 10,000"),
    "steps": ([0], r"steps \(--steps\) must be an integer from 1"),
    "test_every": ([0], r"test_every \(--test-every\) must be an integer from 1"),
    "seed": ([-1, 2**32], r"seed \(--seed\) must be an integer from 0 to 4,294,967,295"),
    "decay_steps": ([0], r"decay_steps must be an integer from 1"),
    "model": (
        ["capsnet2", None],
        r"unknown model \(--model\) .*: choose one of capsnet, baseline, cnn-small",
    ),
    "coupling": (["learned"], r"unknown coupling \(--coupling\) 'learned': choose one of dynamic, uniform"),
    "decoder": ([0, "yes"], r"decoder \(--no-decoder\) must be true or false"),
}


@pytest.mark.parametrize("field", BAD_CONFIGS)
def test_every_field_is_checked_against_its_bounds(field):
    values, message = BAD_CONFIGS[field]
    for value in values:
        with pytest.raises(ConfigError, match=message):
            TrainConfig(profile="smoke", **{field: value}).resolved()


def test_bounds_that_depend_on_the_data():
    assert TrainConfig(profile="smoke", max_shift=7).resolved().max_shift == 7
    assert TrainConfig(profile="smoke", dataset="translated-mnist", max_shift=10).resolved().max_shift == 10
    with pytest.raises(ConfigError, match="from 0 to 10, got 11"):
        TrainConfig(profile="smoke", dataset="translated-mnist", max_shift=11).resolved()
    assert TrainConfig(profile="smoke", batch_size=1, lr=1, recon_weight=0).resolved().batch_size == 1


def test_a_configuration_from_a_record_is_checked():
    stored = asdict(TrainConfig(profile="smoke").resolved())
    assert TrainConfig.from_record(stored) == TrainConfig(profile="smoke").resolved()
    with pytest.raises(ConfigError, match="unknown configuration fields: layers, note"):
        TrainConfig.from_record({**stored, "layers": 1000, "note": "x"})
    with pytest.raises(ConfigError, match="must be a mapping of its fields, got list"):
        TrainConfig.from_record([1, 2])
    with pytest.raises(ConfigError, match=r"routing_iterations .* got 1000000000"):
        TrainConfig.from_record({**stored, "routing_iterations": 10**9})


def _run_file(tmp_path: Path, **changes) -> tuple[dict, Path]:
    """A weights file as :func:`export_weights` writes it (tiny CapsNet), with ``changes`` made
    to its record or weights (keys ``config``, ``model_kwargs``, ``model``)."""
    config = TrainConfig(profile="smoke").resolved()
    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET)
    state = {
        "model": model.state_dict(),
        "record": {"config": asdict(config), "model_kwargs": {**config.model_kwargs(), **TINY_CAPSNET}},
    }
    state["record"].update({k: v for k, v in changes.items() if k != "model"})
    state["model"] = changes.get("model", state["model"])
    path = tmp_path / "weights-fp16.pt"
    torch.save(state, path)
    return state, path


def test_config_of_accepts_what_fit_and_export_write(tmp_path):
    state, path = _run_file(tmp_path)
    assert train_module.config_of(state, path) == TrainConfig.from_record(state["record"]["config"])


_SMOKE_CONFIG = asdict(TrainConfig(profile="smoke").resolved())
_TINY_KWARGS = {**TrainConfig().model_kwargs(), **TINY_CAPSNET}
CRAFTED = {
    "huge": (
        {"model_kwargs": {**_TINY_KWARGS, "conv_channels": 1_000_000, "primary_types": 1_000_000}},
        r"with [\d,]+ parameters, more than",
    ),
    "unknown model": (
        {"config": {**_SMOKE_CONFIG, "model": "resnet"}},
        r"invalid run configuration: unknown model",
    ),
    "extra config key": ({"config": {**_SMOKE_CONFIG, "width": 3}}, r"unknown configuration fields: width"),
    "extra argument": ({"model_kwargs": {**_TINY_KWARGS, "width": 3}}, r"cannot build the capsnet .*width"),
    "contradiction": (
        {"model_kwargs": {**_TINY_KWARGS, "routing_iterations": 5}},
        r"routing_iterations=5 \(con",
    ),
    "not plain": (
        {"model_kwargs": {**_TINY_KWARGS, "decoder_hidden": list(range(100))}},
        r"not a mapping of names",
    ),
    "wrong shape": ({"model_kwargs": {**_TINY_KWARGS, "primary_types": 8}}, r"primary.*has shape .*, not"),
    "no config": ({"config": None}, r"invalid run configuration: .*mapping"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_config_of_refuses_crafted_records_before_building_anything(tmp_path, case):
    """E.g. a record that describes a model of petabytes is refused by its parameter count, from
    a model built on the meta device: allocating it for real would fail with another message."""
    changes, message = CRAFTED[case]
    state, path = _run_file(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=message):
        train_module.config_of(state, path)


def test_config_of_refuses_weights_that_do_not_fit(tmp_path):
    weights = dict(_run_file(tmp_path)[0]["model"])
    del weights["conv1.bias"]
    weights.update({"conv1.weight": torch.zeros(3), "extra.weight": torch.zeros(1)})
    state, path = _run_file(tmp_path, model=weights)
    message = r"do not fit the capsnet .*\(missing conv1.bias; unexpected extra.weight; conv1.weight has"
    with pytest.raises(CheckpointError, match=message):
        train_module.config_of(state, path)


def test_evaluating_random_couplings_gives_one_number_and_leaves_the_generators_alone(one_thread):
    from capsnet.data import DeviceBatches
    from capsnet.train import evaluate

    torch.manual_seed(0)
    model = capsnet.CapsNet(**TINY_CAPSNET, coupling="random")
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    batches = DeviceBatches(images, torch.arange(16) % 10, 8, torch.device("cpu"))
    state = torch.get_rng_state()
    first = evaluate(model, batches)
    torch.manual_seed(123)  # another global state: the couplings must not depend on it
    second = evaluate(model, batches)
    assert first == second
    torch.set_rng_state(state)
    evaluate(model, batches)
    assert torch.equal(torch.get_rng_state(), state), "evaluation moved the global generator"


# ----------------------------------------------------------------------------- validation checks


def _checked(out: Path | None, epochs: int, target: float | None, patience: int | None = None, **kwargs):
    """The baseline trained with validation checks every 2 steps (3 batches per epoch) on 20 of its
    training images, also evaluated at every epoch's end as ``val_*``."""
    _, val = _data()
    checks = train_module.ValidationChecks(val, every=2, target=target, patience=patience)
    return _train("baseline", out, epochs, checks=checks, more_tests={"val": val}, **kwargs)


def test_validation_checks_are_recorded_and_leave_training_alone():
    plain, _ = _train("baseline", None, 3)
    checked, history = _checked(None, 3, target=None)
    _assert_same_weights(plain, checked)
    assert [[step for step, _ in m["val_checks"]] for m in history] == [[2], [4, 6], [8]]
    assert history[1]["val_checks"][-1][1] == history[1]["val_accuracy"]  # step 6 ends epoch 2
    assert all("stopped_at" not in m for m in history)


def test_training_stops_when_validation_accuracy_reaches_the_target(tmp_path):
    """The first check at or above the target ends training there; the test sets are evaluated
    at that point, and the weights are those of a run given exactly that many steps."""
    _, monitored = _checked(None, 4, target=None, lr=1e-2)
    checks = [check for m in monitored for check in m["val_checks"]]
    target = max(accuracy for _, accuracy in checks)
    step = next(s for s, accuracy in checks if accuracy >= target)
    stopped, history = _checked(tmp_path, 4, target=target, lr=1e-2)
    assert history[-1]["stopped_at"] == {"step": step, "accuracy": target, "target": target}
    assert history[-1]["step"] == step and "test_accuracy" in history[-1]
    budgeted, _ = _train("baseline", None, 4, max_steps=step, lr=1e-2)
    _assert_same_weights(stopped, budgeted)
    resumed, again = _checked(tmp_path, 6, target=target, resume=True, init_seed=7, lr=1e-2)
    assert _without_timings(again) == _without_timings(history)  # a stopped run trains no further
    _assert_same_weights(stopped, resumed)


def test_patience_stops_after_that_many_checks_without_a_new_best():
    rule = train_module.ValidationChecks(batches=None, every=1, patience=2)
    checks = [[1, 0.5], [2, 0.6], [3, 0.6], [4, 0.55], [5, 0.7]]
    assert [rule.stop(checks[:n]) for n in (1, 2, 3)] == [None, None, None]  # a tie is no new best
    assert rule.stop(checks[:4]) == {
        "step": 4,
        "accuracy": 0.55,
        "patience": 2,
        "best_step": 2,
        "best_accuracy": 0.6,
    }
    with_target = train_module.ValidationChecks(batches=None, every=1, target=0.55, patience=2)
    assert with_target.stop(checks[:2]) == {"step": 2, "accuracy": 0.6, "target": 0.55}


def test_patience_counts_checks_across_epochs_and_a_resume(tmp_path):
    """Checks of earlier epochs count, also those of a run resumed from its checkpoint: a run
    stopped by patience stops at the same step, with the same weights, either way."""
    _, monitored = _checked(None, 8, target=None, lr=1e-2)
    checks = [check for m in monitored for check in m["val_checks"]]
    best, expected = 0, None  # patience 4: the 4th check in a row that is no new best
    for i, (step, accuracy) in enumerate(checks):
        if accuracy > checks[best][1]:
            best = i
        elif i - best == 4:
            expected = (step, checks[best][0])
            break
    assert expected is not None and expected[1] <= 9 < expected[0], "best in epoch 1-3, stop after"
    one, history = _checked(None, 8, target=None, patience=4, lr=1e-2)
    stopped = history[-1]["stopped_at"]
    assert (stopped["step"], stopped["best_step"], stopped["patience"]) == (*expected, 4)
    assert history[-1]["step"] == expected[0] and "test_accuracy" in history[-1]
    _checked(tmp_path, 3, target=None, patience=4, lr=1e-2)
    resumed, again = _checked(tmp_path, 8, target=None, patience=4, resume=True, init_seed=7, lr=1e-2)
    assert again[-1]["stopped_at"] == stopped
    _assert_same_weights(one, resumed)


def test_validation_check_options_are_checked():
    config = TrainConfig(profile="smoke", val_size=100, val_every=5, stop_at_val_accuracy=0.9).resolved()
    assert (config.val_every, config.stop_at_val_accuracy) == (5, 0.9)
    with pytest.raises(
        ConfigError, match=r"val_every \(--val-every\) evaluates the validation split.*--val-size"
    ):
        TrainConfig(profile="smoke", val_every=5).resolved()
    with pytest.raises(ConfigError, match=r"needs the validation checks it stops on: add --val-every"):
        TrainConfig(profile="smoke", val_size=100, stop_at_val_accuracy=0.9).resolved()
    for bad in (0, 1.5, 95, True, "0.9"):
        with pytest.raises(
            ConfigError, match=r"stop_at_val_accuracy \(--stop-at-val-accuracy\) is an accuracy"
        ):
            TrainConfig(profile="smoke", val_size=100, val_every=5, stop_at_val_accuracy=bad).resolved()
    with pytest.raises(ConfigError, match=r"val_patience \(--val-patience\) counts the validation checks"):
        TrainConfig(profile="smoke", val_size=100, val_patience=3).resolved()
    with pytest.raises(ConfigError, match=r"val_patience \(--val-patience\) must be an integer from 1"):
        TrainConfig(profile="smoke", val_size=100, val_every=5, val_patience=0).resolved()
    with pytest.raises(ConfigError, match=r"val_every \(--val-every\) must be an integer from 1"):
        TrainConfig(profile="smoke", val_size=100, val_every=0).resolved()
