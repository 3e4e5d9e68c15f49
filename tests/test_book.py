"""The book's frame: the chapters listed in _toc.yml exist and carry their stored outputs, the front
and back matter agree with the package, and the HTML book builds without a single warning.

nbval (configured in pyproject.toml) reruns the notebooks; these tests check what the notebooks
store, which is what online readers see, and what `jupyter-book build` makes of it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
REPOSITORY_URL = "https://github.com/capsnet-book/capsnet-book"
BRANCH = "main"

# Terms the chapters link to with {term}`...`; the glossary must define each of them.
GLOSSARY_TERMS = [
    "capsule",
    "activity vector",
    "pose",
    "instantiation parameters",
    "squash",
    "primary capsule",
    "prediction vector",
    "coupling coefficient",
    "routing by agreement",
    "agreement",
    "margin loss",
    "reconstruction loss",
    "equivariance",
    "invariance",
    "inverse graphics",
    "max pooling",
    "DigitCaps",
    "transformation matrix",
    "affNIST-style",
    "MultiMNIST",
]

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


# ---------------------------------------------------------------------------------------------
# Reading the table of contents and the notebooks


def toc_entries() -> list[str]:
    """Every file of _toc.yml (without suffix, relative to the repository root), root first."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    entries = [toc["root"]]
    for part in toc.get("parts", []):
        entries += [chapter["file"] for chapter in part["chapters"]]
    return entries


def chapter_entries() -> list[str]:
    """The entries of _toc.yml that are (or must become) notebooks: all but the Markdown pages."""
    return [entry for entry in toc_entries() if not (REPO / f"{entry}.md").exists()]


CHAPTERS = chapter_entries()


def read_chapter(entry: str) -> nbformat.NotebookNode:
    path = REPO / f"{entry}.ipynb"
    assert path.exists(), f"{path.relative_to(REPO)} is listed in _toc.yml but does not exist"
    return nbformat.read(path, as_version=4)


def tags(cell: nbformat.NotebookNode) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def executed_code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """Code cells a top-to-bottom run executes (non-empty, not tagged skip-execution)."""
    return [
        cell
        for cell in nb.cells
        if cell.cell_type == "code" and cell.source.strip() and "skip-execution" not in tags(cell)
    ]


def headings(nb: nbformat.NotebookNode) -> list[str]:
    """The text of every Markdown heading, in order."""
    found = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            found += re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", cell.source, flags=re.MULTILINE)
    return found


EXERCISE = re.compile(r"^(`{3,}|:{3,})\{exercise\}\n:label: (\S+)\n", re.MULTILINE)
SOLUTION = re.compile(r"^(`{3,}|:{3,})\{solution\} (\S+)\n((?::\w+:.*\n)*)", re.MULTILINE)


# ---------------------------------------------------------------------------------------------
# The table of contents


def test_toc_has_numbered_parts_of_chapter_notebooks():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    assert toc["format"] == "jb-book"
    parts = [part for part in toc["parts"] if part.get("numbered")]
    numbered = [chapter["file"] for part in parts for chapter in part["chapters"]]
    assert numbered == CHAPTERS, "every notebook is a numbered chapter and every numbered chapter a notebook"
    assert len(CHAPTERS) >= 6, CHAPTERS


@pytest.mark.parametrize("entry", toc_entries())
def test_toc_entry_exists(entry):
    candidates = [REPO / f"{entry}{suffix}" for suffix in (".md", ".ipynb")]
    assert any(path.exists() for path in candidates), f"_toc.yml lists {entry}, but no .md or .ipynb exists"


# ---------------------------------------------------------------------------------------------
# Stored outputs of every chapter: one clean top-to-bottom run


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_was_run_top_to_bottom_in_one_kernel(entry):
    nb = read_chapter(entry)
    cells = executed_code_cells(nb)
    assert cells, "the notebook has no code cells"
    counts = [cell.get("execution_count") for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        "execution counts must run 1, 2, 3, ... down the notebook (one fresh kernel, top to bottom, "
        f"every cell once); found {counts}. Re-execute it with tools/execute_notebooks.py."
    )


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_stores_no_errors(entry):
    nb = read_chapter(entry)
    failing = [
        (index, output.get("ename"), output.get("evalue"))
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and "raises-exception" not in tags(cell)
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert not failing, f"cells with stored errors (cell index, exception, message): {failing}"


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_stores_a_figure(entry):
    nb = read_chapter(entry)
    images = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, "no stored PNG figure: run the notebook so its matplotlib figures are saved"


def source_showing_cells(nb: nbformat.NotebookNode) -> list[int]:
    """Indices of the code cells that display package source: cells that call
    ``capsnet.source_listing`` or ``inspect.getsource`` themselves, or call a helper the notebook
    defines with it (``def show_source(obj): ... getsource ...``), the definition itself excepted."""
    helpers = set()
    for cell in nb.cells:
        if cell.cell_type == "code" and "getsource(" in cell.source:
            helpers |= set(re.findall(r"^def (\w+)\(", cell.source, flags=re.MULTILINE))
    showing = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        top_level = "\n".join(
            line for line in cell.source.splitlines() if not re.match(r"^(\s|def |\)|$)", line)
        )
        calls_helper = any(re.search(rf"(?<![\w.]){name}\(", top_level) for name in helpers)
        listing = "source_listing(" in cell.source or "getsource(" in top_level
        if calls_helper or listing or re.search(r"^\s+Code\(", cell.source, re.M):
            showing.append(index)
    return showing


@pytest.mark.parametrize("entry", CHAPTERS)
def test_cells_that_show_package_source_are_compared_by_nbval(entry):
    """A chapter that displays the package's source must be re-executed when that source changes:
    nbval compares the output of cells tagged ``nbval-check-output``, so CI fails until it is."""
    nb = read_chapter(entry)
    untagged = [i for i in source_showing_cells(nb) if "nbval-check-output" not in tags(nb.cells[i])]
    assert not untagged, (
        f"cells {untagged} show package source without the nbval-check-output tag: tag them (and "
        "keep anything machine-dependent out of those cells)"
    )


@pytest.mark.parametrize("entry", CHAPTERS)
def test_widgets_live_only_in_cells_the_book_removes(entry):
    """Online readers have no kernel: a live ipywidget shows them an empty box. Widgets are for
    Colab and Jupyter only, in cells tagged ``remove-cell``; the book's sliders are precomputed
    frames (``capsnet.plotting.frames_player``), and no widget state is stored to weigh pages down."""
    nb = read_chapter(entry)
    shown = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        and "remove-cell" not in tags(cell)
        and any(WIDGET_VIEW in output.get("data", {}) for output in cell.get("outputs", []))
    ]
    assert not shown, f"cells {shown} show a live widget in the book: tag them remove-cell"
    assert WIDGET_STATE not in nb.metadata.get("widgets", {}), (
        "widget state is stored; execute with tools/execute_notebooks.py, which does not store it"
    )


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_starts_with_a_title_and_the_colab_setup_cell(entry):
    nb = read_chapter(entry)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), (
        "the first cell must be a Markdown cell with the chapter's title as a level-1 heading"
    )
    setup = next(cell for cell in nb.cells if cell.cell_type == "code")
    # (tests/test_tools.py checks that every chapter's install cell is the same and names this release)
    assert 'if "google.colab" in sys.modules' in setup.source and "CAPSNET_RELEASE = " in setup.source, (
        "the first code cell must be the Colab install cell"
    )


@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_ends_with_summary_and_exercises_with_hidden_solutions(entry):
    """One mechanism for the whole book: sphinx-exercise's numbered ``{exercise}`` with a label and
    one ``{solution}`` per exercise that names it and starts closed (``:class: dropdown``)."""
    nb = read_chapter(entry)
    found = headings(nb)
    assert "Summary" in found, f"no 'Summary' heading; headings are {found}"
    assert "Exercises" in found, f"no 'Exercises' heading; headings are {found}"
    markdown = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "markdown")
    exercises = [m.group(2) for m in EXERCISE.finditer(markdown)]
    solutions = {m.group(2): m.group(3) for m in SOLUTION.finditer(markdown)}
    assert exercises, "the Exercises section needs ```{exercise} directives with a :label:"
    assert len(set(exercises)) == len(exercises), f"an exercise label is used twice: {exercises}"
    assert sorted(solutions) == sorted(exercises), (
        f"every exercise needs exactly one {{solution}} that names it: exercises {exercises}, "
        f"solutions {sorted(solutions)}"
    )
    closed = [label for label, options in solutions.items() if ":class: dropdown" not in options]
    assert not closed, f"solutions that would show their answer in plain view: {closed}"
    assert "{admonition} Solution" not in markdown, "use {solution}, not an admonition"


def unclosed_directives(markdown: str) -> list[str]:
    """Directives (``{admonition}``, ``{dropdown}``...) that an inner code fence closes early: a
    backtick fence ends at the first line of at least as many backticks, so a solution fenced
    with three backticks around a three-backtick code block ends at the code block's first fence
    and shows the answer outside the dropdown."""
    problems = []
    lines = markdown.splitlines()
    for start, line in enumerate(lines):
        opening = re.match(r"^\s*(`{3,})\{(\w+)\}", line)
        if not opening:
            continue
        fence = opening.group(1)
        for inner in lines[start + 1 :]:
            if re.match(r"^\s*`{3,}\s*$", inner):  # a closing fence, the directive's own
                break
            if re.match(
                rf"^\s*`{{{len(fence)},}}\w", inner
            ):  # a code block the directive's fence cannot hold
                problems.append(f"{line.strip()} holds {inner.strip()}: fence it with more backticks")
                break
    return problems


@pytest.mark.parametrize("entry", CHAPTERS)
def test_solutions_and_admonitions_hold_their_code_blocks(entry):
    nb = read_chapter(entry)
    problems = [
        p for cell in nb.cells if cell.cell_type == "markdown" for p in unclosed_directives(cell.source)
    ]
    assert not problems, problems


# ---------------------------------------------------------------------------------------------
# Front and back matter agree with the package and with each other


def test_intro_profile_table_matches_capsnet_profiles():
    from capsnet.profiles import PROFILES

    text = (REPO / "book" / "intro.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+|all) \| ([\d,]+|all) \| (\d+) \| (\d+) \|", text, re.MULTILINE)

    def size(cell: str) -> int | None:
        return None if cell == "all" else int(cell.replace(",", ""))

    table = {name: (size(tr), size(te), int(epochs), int(batch)) for name, tr, te, epochs, batch in rows}
    package = {
        name: (profile.train_size, profile.test_size, profile.epochs, profile.batch_size)
        for name, profile in PROFILES.items()
    }
    assert table == package


def test_intro_names_only_modules_that_exist():
    text = (REPO / "book" / "intro.md").read_text(encoding="utf-8")
    section = text.split("## Chapters and code", 1)[1]
    modules = sorted(set(re.findall(r"`(capsnet(?:\.\w+)+)`", section)))
    assert modules, "the intro's chapter table names no capsnet modules"
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    assert not missing, f"book/intro.md maps chapters to modules that do not exist: {missing}"


def glossary_terms() -> list[str]:
    text = (REPO / "book" / "glossary.md").read_text(encoding="utf-8")
    body = re.search(r"```\{glossary\}\n(.*?)\n```", text, flags=re.DOTALL)
    assert body, "book/glossary.md has no ```{glossary} block"
    return [line.strip() for line in body.group(1).splitlines() if line.strip() and not line.startswith(" ")]


def test_glossary_defines_the_terms_chapters_use():
    defined = {term.lower() for term in glossary_terms()}
    missing = [term for term in GLOSSARY_TERMS if term.lower() not in defined]
    assert not missing, f"glossary terms missing: {missing}"


def bib_entries() -> dict[str, str]:
    """Key -> the entry's text, for every entry of references.bib."""
    text = (REPO / "references.bib").read_text(encoding="utf-8")
    parts = re.split(r"^@\w+\{", text, flags=re.MULTILINE)[1:]
    return {part.split(",", 1)[0].strip(): part for part in parts}


def test_references_have_author_title_year_and_venue():
    entries = bib_entries()
    assert len(entries) >= 10
    for key, entry in entries.items():
        fields = set(re.findall(r"^\s*(\w+)\s*=", entry, flags=re.MULTILINE))
        assert {"author", "title", "year"} <= fields, f"{key} lacks author, title or year"
        assert fields & {"journal", "booktitle", "howpublished"}, (
            f"{key} names no journal, proceedings or (for a blog or report) where it was published"
        )


def test_every_cited_key_is_in_references():
    keys = set(bib_entries())
    pages = [REPO / f"{entry}.md" for entry in toc_entries()]
    sources = pages + [REPO / f"{entry}.ipynb" for entry in CHAPTERS]
    unknown = {}
    for path in sources:
        if path.exists():
            for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", path.read_text(encoding="utf-8")):
                for key in group.split(","):
                    if key.strip() not in keys:
                        unknown.setdefault(path.name, []).append(key.strip())
    assert not unknown, f"citations of keys that references.bib lacks: {unknown}"


# ---------------------------------------------------------------------------------------------
# The HTML book


def read_page(html: Path, entry: str) -> str:
    page = html / f"{entry}.html"
    assert page.exists(), f"the build made no {page.relative_to(html)}"
    return page.read_text(encoding="utf-8")


@pytest.mark.book_build
def test_book_builds_without_warnings(built_book):
    result, _ = built_book
    log = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"jupyter-book build -W -n --keep-going failed:\n{log}"


@pytest.mark.book_build
@pytest.mark.parametrize("entry", CHAPTERS)
def test_chapter_page_has_figures_math_and_colab_button(built_book, entry):
    _, html = built_book
    page = read_page(html, entry)
    figure = re.search(r'<img [^>]*src="\.\./_images/[^"]+\.png"', page)
    assert figure, "no figure from the notebook on the page"
    assert 'class="math' in page and "mathjax" in page.lower(), "no MathJax-rendered math on the page"
    colab = f"https://colab.research.google.com/github/capsnet-book/capsnet-book/blob/{BRANCH}/{entry}.ipynb"
    assert colab in page, f"no Colab launch link {colab}"


@pytest.mark.book_build
def test_glossary_page_defines_every_term(built_book):
    _, html = built_book
    page = read_page(html, "book/glossary").lower()
    for term in GLOSSARY_TERMS:
        anchor = "term-" + re.sub(r"[^a-z0-9]+", "-", term.lower())
        assert f'id="{anchor}"' in page, f"glossary page has no anchor for {term!r}"


@pytest.mark.book_build
def test_bibliography_page_lists_every_reference(built_book):
    _, html = built_book
    page = read_page(html, "book/bibliography")
    for key, entry in bib_entries().items():
        title = re.search(r"title\s*=\s*\{(.*)\},?\s*$", entry, flags=re.MULTILINE).group(1)
        words = re.sub(r"[{}]", "", title).split()[:3]
        assert " ".join(words).lower() in page.lower(), f"bibliography page does not list {key} ({title})"
    # Labels read like the author-year citations in the text, not alpha labels such as "[GT20]".
    assert "Gu and Tresp, 2020" in page and "Sabour et al., 2017" in page
    alpha_label = re.search(r">\[?[A-Z][A-Za-z+]{1,3}\d{2}\]?<", page)
    assert not alpha_label, f"alpha-style label on the bibliography page: {alpha_label.group(0)}"
