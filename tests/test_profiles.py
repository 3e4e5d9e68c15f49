"""Profiles, the one table of chapter sizes, and the time budget of every chapter under every
profile (estimated from the arithmetic of its experiments: capsnet.budget)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import capsnet.profiles as profiles
from capsnet import budget
from capsnet.profiles import CHAPTER_SIZES, PROFILES, chapter_sizes, get_profile

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(REPO.glob("book/[0-9][0-9]_*.ipynb"))


def test_get_profile_by_name_and_environment(monkeypatch) -> None:
    assert get_profile("smoke") is PROFILES["smoke"]
    assert get_profile("smoke").train_size == 512
    monkeypatch.setenv("CAPSNET_PROFILE", "paper")
    assert get_profile().name == "paper"
    assert get_profile("cpu").name == "cpu"  # a name beats the environment
    monkeypatch.delenv("CAPSNET_PROFILE")
    assert get_profile().name == ("colab" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("cuda", "expected"), [(True, "colab"), (False, "cpu")])
def test_default_profile_follows_the_device(monkeypatch, cuda, expected) -> None:
    # paper is opt-in: a GPU gets the 10-minute colab profile, never hours of training by default
    monkeypatch.delenv("CAPSNET_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert get_profile().name == expected


def test_unknown_profile(monkeypatch) -> None:
    with pytest.raises(ValueError, match="'tiny'.*smoke, cpu, colab, paper"):
        get_profile("tiny")
    monkeypatch.setenv("CAPSNET_PROFILE", "gpu")
    with pytest.raises(ValueError, match="'gpu'.*smoke, cpu, colab, paper.*CAPSNET_PROFILE"):
        get_profile()


@pytest.mark.parametrize("chapter", sorted(CHAPTER_SIZES))
def test_every_chapter_is_sized_for_every_profile_with_the_same_names(chapter) -> None:
    sizes = CHAPTER_SIZES[chapter]
    assert set(sizes) == set(PROFILES), f"chapter {chapter} lacks sizes for {set(PROFILES) - set(sizes)}"
    names = {profile: set(values) for profile, values in sizes.items()}
    assert len({frozenset(n) for n in names.values()}) == 1, f"chapter {chapter}: {names}"


def test_chapter_sizes_is_read_only_and_follows_the_profile(monkeypatch) -> None:
    monkeypatch.setenv("CAPSNET_PROFILE", "smoke")
    assert chapter_sizes(11) == CHAPTER_SIZES[11]["smoke"]
    assert chapter_sizes(11, "colab")["train_pairs"] == 60_000
    with pytest.raises(TypeError):
        chapter_sizes(11)["epochs"] = 100  # type: ignore[index]
    with pytest.raises(KeyError, match="chapter 2 has no sizes"):
        chapter_sizes(2)


def code_of(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("notebook", CHAPTERS, ids=lambda p: p.stem)
def test_notebooks_take_their_sizes_from_the_table(notebook) -> None:
    """No sizes keyed by profile name, no scaling by a profile factor, in any chapter: every size
    comes from capsnet.profiles (so a new profile cannot raise KeyError in a notebook, and the
    budget test below sees every experiment)."""
    code = code_of(notebook)
    assert "[profile.name]" not in code and "profile.scale" not in code
    assert not re.search(r"profile\.name\s*==", code), "a size chosen by comparing the profile's name"
    number = int(notebook.name[:2])
    used = {int(n) for n in re.findall(r"chapter_sizes\((\d+)\)", code)}
    assert used <= {number}, f"{notebook.name} reads another chapter's sizes: {used}"
    if number in CHAPTER_SIZES:
        assert used == {number}, f"{notebook.name} has sizes in capsnet.profiles but does not read them"


@pytest.mark.parametrize("profile", sorted(budget.BUDGETS))
@pytest.mark.parametrize("chapter", budget.CHAPTERS)
def test_every_chapter_fits_its_profiles_time_budget(chapter, profile) -> None:
    machine, limit = budget.BUDGETS[profile]
    seconds = budget.chapter_seconds(chapter, profile)
    work = "; ".join(
        f"{w.what}: {w.flops / 1e12:.2f} TFLOP, {w.steps} steps on the {w.on}"
        for w in budget.chapter_work(chapter, profile)
    )
    assert seconds <= limit, (
        f"chapter {chapter} needs about {seconds / 60:.1f} min under {profile} on "
        f"{budget.MACHINES[machine].name}, over its {limit / 60:.0f} min ({work})"
    )


def test_estimates_grow_with_the_profile_and_count_real_work() -> None:
    for chapter in (6, 9, 11, 14):
        cpu = budget.chapter_seconds(chapter, "cpu", machine="laptop")
        paper = budget.chapter_seconds(chapter, "paper", machine="laptop")
        assert paper > cpu > budget.SETUP_SECONDS
    # chapter 9's live run: the paper profile is 50 epochs of 60,000 images at 1.2 GFLOP each
    paper_run = budget.chapter_work(9, "paper")[0]
    assert paper_run.flops == pytest.approx(50 * 60_000 * 1.199e9, rel=0.01)
    assert paper_run.steps == 50 * 469


def test_paper_profile_warns_how_long_it_takes(capsys) -> None:
    line = budget.estimate_line(11, "paper")
    assert "CAPSNET_PROFILE=colab" in line and " h on a Colab T4" in line
    assert budget.announce(11, "paper") is None  # a notebook cell ending with it shows no repeat
    assert capsys.readouterr().out == line + "\n"
    assert "CAPSNET_PROFILE" not in budget.estimate_line(11, "colab")


def test_profiles_module_has_no_size_outside_its_table() -> None:
    assert set(vars(profiles.Profile)["__dataclass_fields__"]) == {
        "name", "train_size", "test_size", "epochs", "batch_size", "meant_for"
    }  # fmt: skip


def test_training_estimate_before_a_paper_run() -> None:
    from capsnet.cli import _estimate
    from capsnet.train import TrainConfig

    line = _estimate(TrainConfig(profile="paper").resolved())
    # 50 epochs x 60,000 images x 1.2 GFLOP = 3.6 PFLOP: under half an hour at 4 TFLOP/s, hours on a laptop
    assert line.startswith("3,000,000 training images at 1.20 GFLOP each")
    assert " min on a Colab T4 GPU" in line and " h on a laptop CPU" in line
    steps = _estimate(TrainConfig(profile="paper", steps=100, batch_size=64).resolved())
    assert steps.startswith("6,400 training images")
