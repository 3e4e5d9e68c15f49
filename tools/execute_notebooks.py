"""Execute the book's notebooks top to bottom: in place (this is how their stored outputs are made),
or into another folder (checks that must leave the stored outputs alone).

The HTML book is built with execution switched off (``execute_notebooks: "off"`` in _config.yml), so
what readers see online is exactly what this tool stores. Each notebook runs in a fresh kernel, from
the first cell to the last, in the folder it is written to, with:

- ``CAPSNET_PROFILE=cpu`` unless ``--profile`` says otherwise (see ``capsnet.profiles``: ``smoke``:
  seconds, ``cpu``: minutes on a laptop CPU, ``colab``: a free Colab GPU, ``paper``: the paper's
  full setup);
- Jupyter's inline matplotlib backend (an ``MPLBACKEND`` from the environment is dropped for the
  kernel, or the figures would not be stored);
- no ipywidget state kept: the HTML book has no kernel, so its sliders are precomputed frames
  (``capsnet.plotting.frames_player``); the ipywidgets versions, for Colab and Jupyter, sit in cells
  the book removes, and their state would only make every page heavier;
- the Colab install cell's ``CAPSNET_RELEASE = "v..."`` set to this package's version, so that a
  stored notebook names the release it was executed with (and installs that one on Colab).

Nothing is stripped: outputs and metadata are written as the run leaves them, plus a
``capsnet`` entry in the notebook metadata that records the release, the profile, the hardware used
and the wall time. A notebook whose run fails is not written (in place: left untouched) and the tool
exits with status 1.

Usage (from the repository root)::

    python tools/execute_notebooks.py                       # every notebook listed in _toc.yml
    python tools/execute_notebooks.py book/05_routing_by_agreement.ipynb
    python tools/execute_notebooks.py --profile smoke book/03_capsules_vs_neurons.ipynb
    python tools/execute_notebooks.py --profile colab --output-dir scratch/executed   # book/ untouched
    CAPSNET_DATA=../shared/data python tools/execute_notebooks.py   # data without downloading

It prints the wall time of each notebook and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

import capsnet
from capsnet.hardware import describe
from capsnet.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]

RELEASE = f"v{capsnet.__version__}"
# The line of the Colab install cell that names the release it installs.
RELEASE_LINE = re.compile(r'^CAPSNET_RELEASE = "[^"\n]*"$', re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    """How one notebook's run went: where it was written (if it ran through), its wall time in
    seconds, and the error that stopped it (``None`` if none did)."""

    notebook: Path
    written: Path | None
    seconds: float
    error: str | None


def toc_notebooks() -> list[Path]:
    """The notebooks listed in _toc.yml, in reading order."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    chapters = [chapter["file"] for part in toc.get("parts", []) for chapter in part["chapters"]]
    entries = [toc["root"], *chapters]
    return [REPO / f"{entry}.ipynb" for entry in entries if (REPO / f"{entry}.ipynb").exists()]


def install_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    """The notebook's Colab install cell: its first code cell, if that sets ``CAPSNET_RELEASE``."""
    first = next((cell for cell in nb.cells if cell.cell_type == "code"), None)
    return first if first is not None and RELEASE_LINE.search(first.source) else None


def pin_release(nb: nbformat.NotebookNode, release: str = RELEASE) -> bool:
    """Make the install cell name ``release``; False if the notebook has no install cell."""
    cell = install_cell(nb)
    if cell is None:
        return False
    cell.source = RELEASE_LINE.sub(f'CAPSNET_RELEASE = "{release}"', cell.source)
    return True


def execute(source: Path, target: Path, profile: str, timeout: int, kernel: str) -> float:
    """Run the notebook ``source`` in a fresh kernel, working in ``target``'s folder, and save it as
    ``target`` (which may be ``source``); return the wall time in seconds.

    Raises CellExecutionError (writing nothing) when a cell fails.
    """
    nb = nbformat.read(source, as_version=4)
    pin_release(nb)
    target.parent.mkdir(parents=True, exist_ok=True)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(target.parent)}},
        # True: nbclient's output-widget hooks fail without it (KeyError on the widget's id); the
        # state is dropped below instead.
        store_widget_state=True,
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    # The book's sliders are precomputed frames; the widgets' state would only weigh pages down.
    nb.metadata.pop("widgets", None)
    nb.metadata["capsnet"] = {
        "release": RELEASE,
        "profile": profile,
        "hardware": describe(),
        "wall_time_s": round(seconds, 1),
    }
    nbformat.write(nb, target)
    return seconds


def run_notebooks(
    notebooks: list[Path],
    profile: str,
    output_dir: Path | None = None,
    timeout: int = 1200,
    kernel: str = "python3",
    jobs: int = 1,
) -> list[Outcome]:
    """Execute ``notebooks`` in the ``profile`` (``jobs`` at a time), each into ``output_dir`` or, if
    that is None, in place; print one line per notebook as it ends, and return the outcomes in the
    order given. The kernels inherit this process's environment, with ``CAPSNET_PROFILE`` set."""
    os.environ["CAPSNET_PROFILE"] = profile
    os.environ.pop("MPLBACKEND", None)

    print(f"profile {profile}, release {RELEASE}; {describe()}", flush=True)
    tasks = [(path, output_dir, profile, timeout, kernel) for path in notebooks]
    if jobs == 1:
        return [_run_one(task) for task in tasks]
    # One process per notebook client: nbclient's clients share zmq and asyncio state within a
    # process, and in threads a client can miss its kernel's replies and wait forever.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_run_one, tasks))


def _run_one(task: tuple[Path, Path | None, str, int, str]) -> Outcome:
    """Execute one notebook (see :func:`run_notebooks`) and print how it went."""
    path, output_dir, profile, timeout, kernel = task
    source = path.resolve()
    target = output_dir.resolve() / source.name if output_dir is not None else source
    start = time.perf_counter()
    try:
        seconds = execute(source, target, profile, timeout, kernel)
    except (CellExecutionError, CellTimeoutError) as error:
        seconds = time.perf_counter() - start
        print(f"{path} FAILED after {seconds:.1f} s (not written)\n{error}", file=sys.stderr, flush=True)
        return Outcome(path, None, seconds, str(error))
    print(f"{path} {seconds:.1f} s -> {target}", flush=True)
    return Outcome(path, target, seconds, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebook in _toc.yml)"
    )
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES), help="CAPSNET_PROFILE of the run (default: cpu)"
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        help="write the executed notebooks into this folder (and run them there) instead of in place",
    )
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may run (default: 1200)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks run at the same time (default: 1)")
    args = parser.parse_args(argv)

    notebooks = args.notebooks or toc_notebooks()
    missing = [str(path) for path in notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    outcomes = run_notebooks(notebooks, args.profile, args.output_dir, args.timeout, args.kernel, args.jobs)
    failed = [str(outcome.notebook) for outcome in outcomes if outcome.error is not None]
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
