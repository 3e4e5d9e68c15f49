"""Rewrite the README's "The reference run" section from the run's own record.

The numbers in that section are never typed by hand: run this after the reference run changes
(``python tools/readme_reference.py`` from the repository root). It replaces everything from the
section's heading to the end of README.md, where the section sits.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from capsnet.reference import test_error_summary

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "runs" / "mnist-reference"
HEADING = "## The reference run"
TARGET = 0.995


def section() -> str:
    run = json.loads((RUN / "run.json").read_text())
    metrics = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = run["final"]
    commands = "\n".join(run["commands"])
    accuracies = ", ".join(f"{100 * m['test_accuracy']:.2f}" for m in metrics)
    seconds = [m["seconds"] for m in metrics]
    best = max(metrics, key=lambda m: m["test_accuracy"])
    lr_left = metrics[-1]["lr"] / run["config"]["lr"]
    summary = test_error_summary({**run, "metrics": metrics})
    paragraph = " ".join(
        [
            f"on the 2-core CPU ({run['hardware']}; {run['precision']} mixed precision):",
            f"{run['epochs_done']} epochs of 60,000 images in {run['wall_seconds']:,.0f} s of training",
            f"({run['wall_seconds'] / 3600:.1f} h; an epoch took {min(seconds) / 60:.0f} to",
            f"{max(seconds) / 60:.0f} min, depending on what else the machine was running).",
            "The number fixed before training, at the end of the schedule its first command set",
            f"(epoch {summary['planned_epoch']}, evaluated in {run['precision']} during training), is",
            f"**{summary['planned_error']:.2f}% test error**.",
            "The run was then continued, one epoch at a time after epoch 12, to stop at the first epoch",
            "whose final evaluation reaches 99.5%, the target set for it: a stopping rule that looks at the",
            "test set. Its final evaluation, in float32 on the stored float16 weights over all",
            f"{final['test_images']:,} test images, is {100 * final['accuracy']:.2f}%",
            f"({final['error']:.2f}% error): the best of {summary['evaluations']} test evaluations, so it",
            "flatters the model. Per-epoch test accuracy",
            f"(`metrics.jsonl`, evaluated in {run['precision']}):",
            f"{accuracies}% (best {100 * best['test_accuracy']:.2f}% after epoch {best['epoch']}). The",
            f"mean over epochs {summary['last_epochs'][0]}-{summary['last_epochs'][1]},",
            f"{summary['last_mean']:.2f}% (sd {summary['last_sd']:.2f} between those epochs), depends",
            "less on where the rule stopped. The run routes with gradients through the last routing",
            f"iteration only (`routing_gradient` {run['config']['routing_gradient']!r}), not through",
            "all three as the paper's Procedure 1 reads.",
            (
                "It reached the target after the last epoch listed."
                if final["accuracy"] >= TARGET
                else "It has not reached the target yet; the checkpoint is kept to continue it."
            ),
            "With the paper's slow learning-rate decay (0.96 every 2,000",
            f"steps) the rate is still {lr_left:.0%} of its start. The paper reports 0.25% error and",
            "careful re-implementations 0.30-0.36% after much longer training. Continue the run with",
            "`--resume --epochs N` from its checkpoint (not committed: 98 MB), or train the `paper`",
            "profile on a GPU. `capsnet.load_reference()` loads the weights and the record (chapters 9 to",
            "13 use it), and `python -m capsnet evaluate runs/mnist-reference/weights-fp16.pt`",
            "reproduces the accuracy.",
        ]
    )
    intro = "`runs/mnist-reference/` holds one recorded training of the paper's CapsNet on MNIST, made with"
    # no breaks at hyphens: a path in backquotes must stay on one line
    text = textwrap.fill(paragraph, 105, break_on_hyphens=False, break_long_words=False)
    return f"{HEADING}\n\n{intro}\n\n```bash\n{commands}\n```\n\n{text}\n"


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    if HEADING not in readme:
        raise SystemExit(f"README.md has no {HEADING!r} section")
    (ROOT / "README.md").write_text(readme.split(HEADING)[0] + section())
    print(section())


if __name__ == "__main__":
    main()
