"""Execute the book's notebooks top to bottom, in place: this is how their stored outputs are made.

The HTML book is built with execution switched off (``execute_notebooks: "off"`` in _config.yml), so
what readers see online is exactly what this tool stores. Each notebook runs in a fresh kernel, from
the first cell to the last, in its own folder, with:

- ``CAPSNET_PROFILE=cpu`` unless ``--profile`` says otherwise (``smoke``: seconds, ``cpu``: minutes
  on a laptop CPU, ``paper``: the paper's full setup, for a GPU);
- Jupyter's inline matplotlib backend (an ``MPLBACKEND`` from the environment is dropped for the
  kernel, or the figures would not be stored);
- the state of every ipywidget saved into the notebook's metadata, so the widgets render from it.

Nothing is stripped: outputs, widget state and metadata are written as the run leaves them, plus a
``capsnet`` entry in the notebook metadata that records the profile and the hardware used. A notebook
whose run fails is left untouched and the tool exits with status 1.

Usage (from the repository root)::

    python tools/execute_notebooks.py                       # every notebook listed in _toc.yml
    python tools/execute_notebooks.py book/05_routing_by_agreement.ipynb
    python tools/execute_notebooks.py --profile smoke book/03_capsules_vs_neurons.ipynb
    CAPSNET_DATA=../shared/data python tools/execute_notebooks.py   # data without downloading

It prints the wall time of each notebook and the hardware it ran on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from capsnet.hardware import describe
from capsnet.profiles import PROFILES

REPO = Path(__file__).resolve().parents[1]


def toc_notebooks() -> list[Path]:
    """The notebooks listed in _toc.yml, in reading order."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    chapters = [chapter["file"] for part in toc.get("parts", []) for chapter in part["chapters"]]
    entries = [toc["root"], *chapters]
    return [REPO / f"{entry}.ipynb" for entry in entries if (REPO / f"{entry}.ipynb").exists()]


def execute(path: Path, profile: str, timeout: int, kernel: str) -> float:
    """Run one notebook in a fresh kernel and save it in place; return the wall time in seconds.

    Raises CellExecutionError (leaving the file untouched) when a cell fails.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.parent)}},
        store_widget_state=True,
        record_timing=False,
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata["capsnet"] = {"profile": profile, "hardware": describe(), "wall_time_s": round(seconds, 1)}
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="notebooks to run (default: every notebook in _toc.yml)"
    )
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES), help="CAPSNET_PROFILE of the run (default: cpu)"
    )
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may run (default: 1200)")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    args = parser.parse_args(argv)

    notebooks = args.notebooks or toc_notebooks()
    missing = [str(path) for path in notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")

    # The kernels inherit this process's environment.
    os.environ["CAPSNET_PROFILE"] = args.profile
    os.environ.pop("MPLBACKEND", None)

    print(f"profile {args.profile}; {describe()}", flush=True)
    failed = []
    for path in notebooks:
        print(f"{path} ...", end=" ", flush=True)
        try:
            seconds = execute(path.resolve(), args.profile, args.timeout, args.kernel)
        except CellExecutionError as error:
            print("FAILED (left unchanged)", flush=True)
            print(str(error), file=sys.stderr)
            failed.append(path)
        else:
            print(f"{seconds:.1f} s", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(map(str, failed))}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
