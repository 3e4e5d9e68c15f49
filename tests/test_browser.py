"""The built book in a real browser: every page of _toc.yml opened in headless Chromium at a
desktop width (1280 px) and a phone width (390 px), served from 127.0.0.1 and fetching nothing
from anywhere else. Each page must

- fit the width of the window (code blocks and tables scroll inside themselves);
- keep every solution in a closed dropdown that holds the whole answer, and show no empty code box;
- have its math typeset by the MathJax the book carries (no raw ``\\(`` or ``$$`` left);
- show every image a code cell drew inside a numbered, captioned figure;
- log no errors to the console.

A full-page screenshot of every page at every width is saved under test-artifacts/screenshots/.

The browser is Debian's ``chromium`` (``apt-get install chromium``), driven by the ``playwright``
package; nothing is downloaded (never ``playwright install``). Without either, the tests are skipped
with the reason, except where the environment variable CI is set: there they fail.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"

# (width, height) of the window: a desktop and a phone (an iPhone 12-15's CSS pixels).
WINDOWS = {"1280px": (1280, 900), "390px": (390, 844)}

pytestmark = [pytest.mark.book_build, pytest.mark.browser]


def toc_pages() -> list[str]:
    """Every page of _toc.yml (without suffix, relative to the repository root), root first: the
    intro, the chapters, the glossary and the bibliography."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part["chapters"]]
    return pages


PAGES = toc_pages()


# ---------------------------------------------------------------------------------------------
# Fixtures: the built book, a local web server, one browser


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def browser_missing(reason: str) -> None:
    """Skip where a browser is optional; fail under CI, where the browser test must run."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so the browser test must run: .ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def book_html(built_book) -> Path:
    result, html = built_book
    if not (html / "index.html").exists():
        pytest.fail(f"the book did not build (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return html


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="session")
def book_server(book_html):
    """The built book served over HTTP on 127.0.0.1 (a free port), as a reader's browser sees a
    web server's pages: MathJax and the theme's scripts load as they do online."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(book_html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the whole session: Debian's ``chromium`` binary, started by
    Playwright (which downloads nothing this way)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_missing("the playwright package is not installed (pip install -r requirements.txt)")
    executable = shutil.which("chromium")
    if executable is None:
        browser_missing("no chromium on PATH (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


# ---------------------------------------------------------------------------------------------
# What the browser reports about one page at one width

# Runs in the page once it has loaded and MathJax has finished; returns what the checks need.
INSPECT_PAGE = (Path(__file__).parent / "browser_inspect.js").read_text(encoding="utf-8")

WAIT_FOR_MATHJAX = """
() => {
  if (!document.querySelector(".math")) return true;
  return !!(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise);
}
"""


@dataclass
class PageReport:
    url: str
    scroll_width: int = 0
    width: int = 0
    offenders: list[str] = field(default_factory=list)
    solution_problems: list[str] = field(default_factory=list)
    math_problems: list[str] = field(default_factory=list)
    figure_problems: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    screenshot: Path | None = None


def slug(page: str) -> str:
    return Path(page).name


def inspect(browser, base_url: str, page_entry: str, window: str) -> PageReport:
    """Open one page at one window size, wait for its scripts and MathJax, run INSPECT_PAGE, and
    save a full-page screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    width, height = WINDOWS[window]
    report = PageReport(url=f"{base_url}{page_entry}.html")
    context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)

    def refuse(route):  # the book must work offline: nothing from outside 127.0.0.1
        report.outside_requests.append(route.request.url)
        route.abort()

    context.route(re.compile(r"^(?!" + re.escape(base_url) + r"|data:|blob:|about:)"), refuse)
    page = context.new_page()
    page.on("console", lambda msg: msg.type == "error" and report.console_errors.append(msg.text))
    page.on("pageerror", lambda error: report.console_errors.append(f"uncaught: {error}"))
    try:
        page.goto(report.url, wait_until="load", timeout=60_000)
        try:
            page.wait_for_function(WAIT_FOR_MATHJAX, timeout=30_000)
            page.evaluate(
                "() => window.MathJax && MathJax.startup ? MathJax.startup.promise.then(() => 1) : 0"
            )
        except PlaywrightTimeout:
            report.math_problems.append("MathJax did not start within 30 s")
        page.evaluate("() => document.fonts.ready.then(() => 1)")
        found = page.evaluate(INSPECT_PAGE)
        report.scroll_width, report.width = found["scrollWidth"], found["width"]
        report.offenders = found["offenders"]
        report.solution_problems = found["solutionProblems"]
        report.math_problems += found["mathProblems"]
        report.figure_problems = found["figureProblems"]
        report.counts = {key: found[key] for key in ("mathCount", "solutionCount", "imageCount")}
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        report.screenshot = SCREENSHOTS / f"{slug(page_entry)}-{window}.png"
        page.screenshot(path=str(report.screenshot), full_page=True)
    finally:
        context.close()
    return report


@pytest.fixture(scope="session")
def page_report(chromium, book_server):
    """``page_report(page, window)``: the PageReport of one page at one window size, made once
    and shared by all the checks below."""
    reports: dict[tuple[str, str], PageReport] = {}

    def get(page_entry: str, window: str) -> PageReport:
        if (page_entry, window) not in reports:
            reports[page_entry, window] = inspect(chromium, book_server, page_entry, window)
        return reports[page_entry, window]

    return get


def listing(problems: list[str], limit: int = 12) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "".join(f"\n  {problem}" for problem in problems[:limit]) + more


def fail(message: str) -> None:
    """Fail with the message alone: it lists the problems, and the traceback would repeat them."""
    pytest.fail(message, pytrace=False)


parametrize_pages = pytest.mark.parametrize(
    ("page", "window"),
    [(page, window) for page in PAGES for window in WINDOWS],
    ids=[f"{slug(page)}-{window}" for page in PAGES for window in WINDOWS],
)


# ---------------------------------------------------------------------------------------------
# The checks


@parametrize_pages
def test_page_fits_the_window(page_report, page, window):
    report = page_report(page, window)
    if report.scroll_width > report.width:
        fail(
            f"{report.url} is {report.scroll_width} px wide in a {report.width} px window; the widest "
            f"elements (code blocks and tables should scroll inside themselves):{listing(report.offenders)}"
        )


@parametrize_pages
def test_solutions_are_closed_and_whole(page_report, page, window):
    report = page_report(page, window)
    if report.solution_problems:
        fail(f"{report.url}:{listing(report.solution_problems)}")


@parametrize_pages
def test_math_is_typeset(page_report, page, window):
    report = page_report(page, window)
    if report.math_problems:
        fail(f"{report.url}:{listing(report.math_problems)}")


@parametrize_pages
def test_cell_images_are_numbered_captioned_figures(page_report, page, window):
    report = page_report(page, window)
    if report.figure_problems:
        fail(
            f"{report.url}: {len(report.figure_problems)} of {report.counts['imageCount']} images need a "
            "figure with a caption (cell metadata mystnb.figure.caption, or glue:figure):"
            f"{listing(report.figure_problems)}"
        )


@parametrize_pages
def test_no_console_errors_and_nothing_fetched_from_outside(page_report, page, window):
    report = page_report(page, window)
    if report.outside_requests:
        fail(f"{report.url} asks for files from outside the book:{listing(report.outside_requests)}")
    if report.console_errors:
        fail(f"{report.url} logged errors:{listing(report.console_errors)}")


@parametrize_pages
def test_screenshot_saved(page_report, page, window):
    report = page_report(page, window)
    assert report.screenshot is not None and report.screenshot.stat().st_size > 0


def test_mathjax_is_served_from_the_book(book_html):
    """No page loads MathJax from a CDN: every MathJax script is a file of the built book."""
    scripts = 0
    for page in book_html.rglob("*.html"):
        if "_static" in page.relative_to(book_html).parts:
            continue
        for src in re.findall(
            r"<script[^>]*\ssrc=\"([^\"]*mathjax[^\"]*)\"", page.read_text(encoding="utf-8"), re.I
        ):
            scripts += 1
            where = page.relative_to(book_html)
            assert not re.match(r"^(https?:)?//", src), f"{where} loads MathJax from {src}"
            assert (page.parent / src).resolve().is_file(), f"{where} loads {src}, which the build lacks"
    assert scripts, "no page loads MathJax at all"
