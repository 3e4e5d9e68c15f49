"""tools/execute_notebooks.py: the install cell names the release a notebook was executed with,
every chapter's install cell is the same, and ``--output-dir`` leaves the notebooks it reads alone.
tools/fourier_conv.py: the experiment's convolution is the convolution."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

import capsnet

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


execute_notebooks = load_tool("execute_notebooks")

INSTALL_CELL = """# On Colab: install the capsnet release this chapter was executed with.
import os

CAPSNET_RELEASE = "v0.0.1"
print(CAPSNET_RELEASE, os.sep)"""


def notebook(*sources: str) -> nbformat.NotebookNode:
    cells = [nbformat.v4.new_markdown_cell("# A title")]
    cells += [nbformat.v4.new_code_cell(source) for source in sources]
    return nbformat.v4.new_notebook(cells=cells)


def test_pin_release_rewrites_only_the_release_line():
    nb = notebook(INSTALL_CELL, 'CAPSNET_RELEASE = "v0.0.1"')
    assert execute_notebooks.pin_release(nb, "v9.8.7")
    expected = INSTALL_CELL.replace('"v0.0.1"', '"v9.8.7"')
    assert nb.cells[1].source == expected
    assert nb.cells[2].source == 'CAPSNET_RELEASE = "v0.0.1"', "only the first code cell is the install cell"


def test_pin_release_leaves_a_notebook_without_install_cell_alone():
    nb = notebook("import capsnet", INSTALL_CELL)
    assert not execute_notebooks.pin_release(nb, "v9.8.7")
    assert nb.cells[2].source == INSTALL_CELL


CHAPTERS = execute_notebooks.toc_notebooks()


def chapter_install_cell(path: Path) -> nbformat.NotebookNode | None:
    return execute_notebooks.install_cell(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", CHAPTERS, ids=[path.stem for path in CHAPTERS])
def test_chapter_install_cell_names_this_release(path):
    cell = chapter_install_cell(path)
    assert cell is not None, "the first code cell must be the Colab install cell (setting CAPSNET_RELEASE)"
    release = f'CAPSNET_RELEASE = "v{capsnet.__version__}"'
    assert release in cell.source.splitlines(), (
        f"the install cell must name this release ({release}): re-execute the chapter with "
        "tools/execute_notebooks.py, which sets it"
    )


def test_every_chapter_has_the_same_install_cell():
    cells = {path.name: chapter_install_cell(path) for path in CHAPTERS}
    missing = [name for name, cell in cells.items() if cell is None]
    assert not missing, f"chapters without an install cell: {missing}"
    sources = {name: cell.source for name, cell in cells.items()}
    assert len(set(sources.values())) == 1, f"the install cells differ between chapters: {sources}"


def test_output_dir_leaves_the_notebook_alone(tmp_path, monkeypatch):
    # The tool sets the kernels' environment in its own process: restore it afterwards.
    monkeypatch.setenv("CAPSNET_PROFILE", "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    source = tmp_path / "book" / "chapter.ipynb"
    source.parent.mkdir()
    nbformat.write(notebook(INSTALL_CELL, "import os\nprint(os.environ['CAPSNET_PROFILE'])"), source)
    before = source.read_bytes()

    out = tmp_path / "executed"
    assert execute_notebooks.main(["--profile", "smoke", "--output-dir", str(out), str(source)]) == 0

    assert source.read_bytes() == before
    executed = nbformat.read(out / "chapter.ipynb", as_version=4)
    assert execute_notebooks.install_cell(executed).source.splitlines()[3] == (
        f'CAPSNET_RELEASE = "v{capsnet.__version__}"'
    )
    assert executed.cells[1].outputs[0].text == f"v{capsnet.__version__} /\n"
    assert executed.cells[2].outputs[0].text == "smoke\n"
    assert executed.metadata.capsnet.release == f"v{capsnet.__version__}"
    assert executed.metadata.capsnet.profile == "smoke"


@pytest.mark.parametrize(
    ("size", "kernel", "stride"),
    [((20, 21), (9, 8), 2), ((28, 28), (9, 9), 1), ((11, 11), (4, 4), 3), ((13, 12), (3, 3), 2)],
)
def test_fourier_conv_matches_conv2d_in_float64(size, kernel, stride):
    fourier_conv = load_tool("fourier_conv")
    # the output and both gradients, against F.conv2d and autograd
    assert fourier_conv.largest_error(2, 3, 4, size, kernel, stride) < 1e-10
