"""A simulated Colab: every chapter executed as a reader on Colab runs it, on this machine's CPU.

In a work folder (a temporary one unless ``--work`` names one), it

1. builds a wheel of the package (``pip wheel --no-deps``, from a copy of its sources, so that
   nothing is left in the checkout);
2. makes a virtual environment with only what Colab has (:data:`COLAB_PACKAGES`; no jupyter-book,
   no myst-nb, no checkout on ``sys.path``) and a Jupyter kernel that runs its Python;
3. mirrors the records committed under ``runs/`` (``git ls-files runs``: what the repository's
   download URL serves) into a folder of its own;
4. copies each chapter listed in _toc.yml alone into its own folder (no ``runs/``, no
   ``../shared`` beside it) and executes it there from this environment with nbclient (via
   ``execute_notebooks.run_notebooks``), in the ``smoke`` profile, with

   - ``CAPSNET_PIP_SPEC=<wheel>[book]``: the chapter's own install cell installs the wheel and its
     book extra (from PyPI), as it installs the release on Colab;
   - ``CAPSNET_RUNS_URL``: the mirror, as a ``file://`` URL, and a fresh cache
     (``XDG_CACHE_HOME``), so the reference runs are really downloaded;
   - ``CAPSNET_DATA``: MNIST from ``$CAPSNET_DATA``, else ``../shared/data`` beside the checkout.

Every chapter must pass; it prints each chapter's wall time (the first one's includes installing
the package and its book extra) and exits with status 1 if any failed. It needs PyPI (or the
machine's pip configuration) and the data; nothing else outside the repository.

Usage (from the repository root)::

    python tools/colab_sim.py                                   # every chapter, in sequence
    python tools/colab_sim.py book/02_inverse_graphics.ipynb    # some chapters
    python tools/colab_sim.py --work scratch/colab-sim          # keep the executed chapters
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from execute_notebooks import REPO, run_notebooks, toc_notebooks

# What a Colab runtime has that the book needs, installed in this order. torch first and pinned:
# this release installs from local disk (and on CPU); an unpinned torch pulls a multi-GB CUDA build.
COLAB_PACKAGES = (("torch==2.13.0",), ("numpy", "matplotlib", "ipywidgets", "tqdm", "ipykernel"))
KERNEL = "capsnet-colab-sim"


def data_folder() -> Path:
    """MNIST's folder, as the tests find it: ``$CAPSNET_DATA``, else ``../shared/data``."""
    folder = Path(os.environ.get("CAPSNET_DATA") or REPO.parent / "shared" / "data")
    if not folder.is_dir():
        raise SystemExit(
            f"colab_sim: no data folder at {folder}: set CAPSNET_DATA to the folder holding MNIST "
            "(the simulated Colab must not download it)"
        )
    return folder.resolve()


def pip(python: Path, *args: str | Path) -> None:
    """Run ``python -m pip`` quietly; on failure, show what it said and stop."""
    command = [str(python), "-m", "pip", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stdout + done.stderr)[-4000:]
        raise SystemExit(f"colab_sim: {' '.join(command)} failed:\n{said}")


def build_wheel(work: Path) -> Path:
    """The package's wheel, built from a copy of its sources in ``work``."""
    source = work / "source"
    shutil.copytree(REPO / "capsnet", source / "capsnet", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    pip(Path(sys.executable), "wheel", "--no-deps", "--quiet", "--wheel-dir", work / "wheel", source)
    (wheel,) = (work / "wheel").glob("capsnet-*.whl")
    return wheel


def make_colab_env(work: Path) -> Path:
    """A virtual environment with only Colab's packages, and a kernel running its Python (in the
    Jupyter folder ``work/jupyter``); returns the environment's folder."""
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    for packages in COLAB_PACKAGES:
        pip(python, "install", "--quiet", *packages)
    spec = work / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    kernel = {
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (simulated Colab)",
        "language": "python",
    }
    (spec / "kernel.json").write_text(json.dumps(kernel, indent=1))
    return venv


def mirror_runs(work: Path) -> Path:
    """A copy of the records committed under runs/, the files the download URL serves."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "runs"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    mirror = work / "mirror"
    for name in filter(None, listed.split("\0")):
        target = mirror / Path(name).relative_to("runs")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return mirror


def colab_variables(work: Path, venv: Path, wheel: Path, mirror: Path, data: Path) -> dict[str, str]:
    """What the kernels' environment changes: the simulated Colab's Python first on the PATH, a
    fresh cache (pip's own kept), and the variables the chapters read."""
    pip_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"
    return {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": str(venv),
        "JUPYTER_PATH": str(work / "jupyter"),
        "XDG_CACHE_HOME": str(work / "cache"),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(pip_cache),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "CAPSNET_DATA": str(data),
        "CAPSNET_PIP_SPEC": f"{wheel}[book]",
        "CAPSNET_RUNS_URL": mirror.as_uri() + "/",
    }


def simulate(notebooks: list[Path], work: Path, jobs: int = 1, timeout: int = 600) -> bool:
    """Execute ``notebooks`` in a simulated Colab set up in ``work``; True if every one passed."""
    data = data_folder()
    start = time.perf_counter()
    wheel = build_wheel(work)
    print(f"wheel {wheel.name}: {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    venv = make_colab_env(work)
    packages = ", ".join(package for group in COLAB_PACKAGES for package in group)
    print(f"Colab environment ({packages}): {time.perf_counter() - start:.1f} s", flush=True)
    mirror = mirror_runs(work)

    copies = []
    for path in notebooks:
        folder = work / "chapters" / path.stem
        folder.mkdir(parents=True)
        copies.append(Path(shutil.copy2(path, folder / path.name)))
    # The kernels inherit this process's environment: no checkout on their Python path.
    for name in ("PYTHONPATH", "PYTHONHOME"):
        os.environ.pop(name, None)
    os.environ.update(colab_variables(work, venv, wheel, mirror, data))
    outcomes = run_notebooks(copies, "smoke", timeout=timeout, kernel=KERNEL, jobs=jobs)

    print("\nchapter                                      seconds  result")
    for outcome in outcomes:
        result = "ok" if outcome.error is None else "FAILED"
        print(f"{outcome.notebook.stem:<44} {outcome.seconds:>7.1f}  {result}")
    print(f"{'all chapters':<44} {sum(outcome.seconds for outcome in outcomes):>7.1f}")
    return all(outcome.error is None for outcome in outcomes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="chapters to run (default: every chapter in _toc.yml)"
    )
    parser.add_argument("--work", type=Path, help="work folder, kept afterwards (default: a temporary one)")
    parser.add_argument("--jobs", type=int, default=1, help="chapters run at the same time (default: 1)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default: 600)")
    args = parser.parse_args(argv)

    notebooks = [path.resolve() for path in args.notebooks] or toc_notebooks()
    missing = [str(path) for path in notebooks if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        if any(args.work.iterdir()):
            parser.error(f"--work {args.work} is not empty")
        return 0 if simulate(notebooks, args.work.resolve(), args.jobs, args.timeout) else 1
    with tempfile.TemporaryDirectory(prefix="capsnet-colab-sim-") as work:
        return 0 if simulate(notebooks, Path(work), args.jobs, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
