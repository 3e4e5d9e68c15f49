"""The recorded reference run: its files, its loader, and that its weights reproduce its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import capsnet
from capsnet import reference
from capsnet.data import DownloadError
from capsnet.train import TrainConfig, evaluate, make_data

RUN = Path(__file__).resolve().parent.parent / "runs" / "mnist-reference"
recorded = pytest.mark.skipif(
    not (RUN / "weights-fp16.pt").is_file(), reason="the reference run has not been recorded"
)


@recorded
def test_record_says_how_the_run_was_made():
    record = capsnet.reference.reference_record()
    assert record["commands"] and all(c.startswith("python -m capsnet train") for c in record["commands"])
    assert record["hardware"] and record["wall_seconds"] > 0
    assert len(record["metrics"]) == record["final"]["epoch"] == record["epochs_done"]
    assert record["config"]["model"] == "capsnet" and record["config"]["train_size"] == 0
    assert record["final"]["test_images"] == 10_000


@recorded
def test_weights_are_compact_and_rebuild_the_paper_model():
    state = torch.load(RUN / "weights-fp16.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state["model"].values())
    model, _ = capsnet.load_reference(device="cpu")
    assert isinstance(model, capsnet.CapsNet)
    assert sum(p.numel() for p in model.parameters()) == 8_215_568
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training


@recorded
def test_evaluating_the_weights_reproduces_the_recorded_accuracy():
    if not _data_available():
        pytest.skip("MNIST is not available here (set CAPSNET_DATA)")
    model, record = capsnet.load_reference(device="cpu")
    _, test = make_data(TrainConfig.from_record(record["config"]), torch.device("cpu"))
    result = evaluate(model, test, precision="fp32", recon_weight=record["config"]["recon_weight"])
    assert result["accuracy"] == pytest.approx(record["final"]["accuracy"], abs=1e-12)


def _data_available() -> bool:
    try:
        capsnet.data.locate_file("mnist", "t10k-images-idx3-ubyte", download=False)
    except capsnet.data.DataError:
        return False
    return True


def test_unknown_reference_run_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown reference run 'cifar'.*mnist-reference"):
        capsnet.load_reference("cifar")


def test_without_checkout_files_the_run_is_downloaded_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(reference, "__file__", str(tmp_path / "site-packages" / "capsnet" / "reference.py"))
    fetched = []

    def fake_download(urls, target, progress=True):
        fetched.append(urls[0])
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.name == "run.json":
            target.write_text(json.dumps({"commands": ["python -m capsnet train"]}))
        else:
            target.write_text(json.dumps({"epoch": 1}) + "\n")
        return target

    monkeypatch.setattr(reference, "download_file", fake_download)
    record = reference.reference_record()
    assert record["metrics"] == [{"epoch": 1}]
    assert fetched == [f"{reference.RUNS_URL}mnist-reference/{f}" for f in reference._RECORD_FILES]
    assert (tmp_path / "capsnet" / "runs" / "mnist-reference" / "run.json").is_file()
    reference.reference_record()  # cached now: nothing fetched again
    assert len(fetched) == 2


def test_no_files_and_no_network_gives_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(reference, "__file__", str(tmp_path / "site-packages" / "capsnet" / "reference.py"))

    def offline(urls, target, progress=True):
        raise DownloadError(f"{urls[0]}: no network")

    monkeypatch.setattr(reference, "download_file", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded.*checkout of the book"):
        capsnet.load_reference()


def test_recorded_files_come_from_the_mirror_named_by_the_environment(tmp_path, monkeypatch):
    # Colab without a checkout: runs/ files are downloaded from $CAPSNET_RUNS_URL when it is set
    # (a file:// mirror here, as in the simulated Colab check), once, into the cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(reference, "__file__", str(tmp_path / "site-packages" / "capsnet" / "reference.py"))
    mirror = tmp_path / "mirror"
    (mirror / "bench").mkdir(parents=True)
    (mirror / "bench" / "cpu-2core.json").write_text('{"batch_size": 128}')
    monkeypatch.setenv("CAPSNET_RUNS_URL", mirror.as_uri())
    assert reference.runs_url() == mirror.as_uri() + "/"
    path = reference.recorded_file("bench/cpu-2core.json")
    assert path == tmp_path / "cache" / "capsnet" / "runs" / "bench" / "cpu-2core.json"
    assert json.loads(path.read_text()) == {"batch_size": 128}
    monkeypatch.delenv("CAPSNET_RUNS_URL")
    assert reference.runs_url() == reference.RUNS_URL


def test_error_summary_tells_the_planned_end_from_the_chosen_one():
    metrics = [{"epoch": e, "test_error": err} for e, err in enumerate([1.0, 0.8, 0.6, 0.7, 0.5], start=1)]
    record = {
        "commands": ["capsnet train --epochs 3 --out x", "capsnet train --out x --resume --epochs 5"],
        "config": {"epochs": 5},
        "metrics": metrics,
        "final": {"epoch": 5, "error": 0.5},
    }
    summary = reference.test_error_summary(record, last=2)
    assert (summary["planned_epoch"], summary["planned_error"]) == (3, 0.6)
    assert summary["last_epochs"] == (4, 5)
    assert summary["last_mean"] == pytest.approx(0.6)
    assert summary["last_sd"] == pytest.approx(0.1414, abs=1e-4)
    assert (summary["final_epoch"], summary["final_error"], summary["best_error"]) == (5, 0.5, 0.5)
    assert summary["evaluations"] == 5


def test_error_summary_of_the_reference_run_matches_its_metrics():
    record = reference.reference_record()
    summary = reference.test_error_summary(record)
    planned = next(m for m in record["metrics"] if m["epoch"] == summary["planned_epoch"])
    assert summary["planned_error"] == planned["test_error"]
    assert summary["best_error"] <= summary["last_mean"] and summary["evaluations"] == len(record["metrics"])
