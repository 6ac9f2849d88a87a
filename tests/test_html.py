"""plop.ranking.html_report: the page is parsed with html.parser and checked against the report, then opened in a
real headless Chromium (skipped where none is installed)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser

import matplotlib.image
import pytest
from conftest import make_batches, make_llama

from plop import FileError, Report, diagnose
from plop.ranking.html_report import default_exports, render_html, write_html

INJECTED = "<script>alert(1)</script>"
VOID = {"meta", "img", "br", "link", "input", "hr"}  # elements without an end tag


class Page(HTMLParser):
    """What a test needs of a page: table rows (with their class), every attribute, script bodies,
    the text of each ``<code id=...>`` and the count of each tag."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[tuple[str | None, list[str]]]] = []
        self.attributes: list[tuple[str, str, str | None]] = []
        self.tags: dict[str, int] = {}
        self.scripts: list[str] = []
        self.codes: dict[str, str] = {}
        self._open: list[str] = []  # where the parser is: a cell, a script or a code block
        self._code = ""  # the id of the code block being read
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        self.attributes += [(tag, name, value) for name, value in attrs]
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self._in("tbody"):
            self.tables[-1].append((attrs.get("class"), []))
        elif tag == "td":
            self.tables[-1][-1][1].append("")
        elif tag == "script":
            self.scripts.append("")
        elif tag == "code" and "id" in attrs:
            self.codes[attrs["id"]] = ""
            self._code = attrs["id"]
        if tag not in VOID:
            self._open.append(tag)

    def handle_endtag(self, tag):
        while self._open and self._open.pop() != tag:
            pass

    def handle_data(self, data):
        if self._in("td"):
            row = self.tables[-1][-1][1]
            row[-1] += data
        elif self._in("script"):
            self.scripts[-1] += data
        elif self._in("code") and self._code:  # a code block without id (inline repr) is not collected
            self.codes[self._code] += data

    def _in(self, tag: str) -> bool:
        return tag in self._open


@pytest.fixture(scope="module")
def report():
    return diagnose(make_llama(), make_batches(16, 16), top_k=3, rank=8, n_bootstrap=50)


@pytest.fixture(scope="module")
def injected(report):
    """The report with its best type renamed to a script tag and hostile model id and data source."""
    raw = report.to_dict()
    old = raw["types"][0]["type"]

    def rename(names):
        return [INJECTED if n == old else n for n in names]

    for m in raw["modules"]:
        m["type"] = INJECTED if m["type"] == old else m["type"]
    raw["types"][0]["type"] = INJECTED
    rec = raw["recommendation"]
    rec["types"], rec["target_modules"] = rename(rec["types"]), rename(rec["target_modules"])
    for cost in raw["costs"].values():
        cost["types"] = rename(cost["types"])
    raw["model"]["id"] = '"><img src=x onerror=alert(2)>'
    raw["data"]["source"] = "</dd><script>alert(3)</script>"
    return Report.from_dict(raw)


def _ranking_rows(report: Report) -> list[tuple[str | None, list[str]]]:
    """The ranking table as the page must show it, written from the report's fields."""
    chosen = set(report.recommendation.types)
    return [("rec" if t.type in chosen else None,
             [str(t.position), t.type, f"{t.nfn_mean:.3f} ± {t.nfn_std:.3f}", f"{t.nfn_min:.2f}–{t.nfn_max:.2f}",
              str(t.n_modules), f"{t.selection_probability:.0%}", f"{t.lora_params_per_rank * 8:,}"])
            for t in report.types]


def test_tables_hold_the_report(report):
    page = Page(render_html(report))
    ranking, costs = page.tables
    assert ranking == _ranking_rows(report)
    assert [(cls, row[0], row[1]) for cls, row in costs] == [
        ("rec" if name == "recommended" else None, name, ", ".join(cost["types"])) for name, cost in report.costs.items()
    ]


def test_page_loads_nothing_from_the_network(report):
    text = render_html(report)
    page = Page(text)
    links = [(tag, name, value) for tag, name, value in page.attributes if name in ("src", "href")]
    assert links and all(value.startswith("data:image/png;base64,") for _, _, value in links)
    assert "http://" not in text and "https://" not in text  # no report string here holds a URL
    assert "link" not in page.tags and page.tags["script"] == 1
    csp = next(value for tag, name, value in page.attributes if name == "content" and "default-src" in value)
    assert "default-src 'none'" in csp


def test_the_figure_is_an_inline_png(report):
    page = Page(render_html(report))
    src = next(value for tag, name, value in page.attributes if tag == "img" and name == "src")
    png = base64.b64decode(src.split(",", 1)[1])
    height, width, _ = matplotlib.image.imread(io.BytesIO(png), format="png").shape
    assert width > 1000 and height > 400  # plot_report's 12-inch figure


def test_report_strings_are_escaped(injected):
    text = render_html(injected)
    page = Page(text)
    assert INJECTED not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert page.tags["script"] == 1 and page.tags["img"] == 1  # only plop's own
    assert "onerror" not in {name for _, name, _ in page.attributes}
    assert page.tables[0][0][1][1] == INJECTED  # shown as text, exactly
    assert page.codes["export-1"] == f"target_modules={injected.recommendation.target_modules!r}"


def test_default_exports_are_a_working_peft_config(report):
    from peft import LoraConfig

    page = Page(render_html(report))
    assert list(page.codes.values()) == list(default_exports(report).values())
    config = eval(page.codes["export-0"], {"LoraConfig": LoraConfig})  # the line a user pastes
    assert (config.r, config.lora_alpha) == (8, 16)
    assert config.target_modules == set(report.recommendation.target_modules)
    buttons = [value for tag, name, value in page.attributes if tag == "button" and name == "data-copy"]
    assert buttons == list(page.codes)


def test_given_exports_get_one_copy_button_each(report):
    exports = {"axolotl": "lora_target_modules:\n  - <q_proj>", "unsloth": "target_modules = ['q_proj']"}
    page = Page(render_html(report, exports))
    assert list(page.codes.values()) == list(exports.values())
    assert sum(1 for tag, name, _ in page.attributes if tag == "button" and name == "data-copy") == 2


def test_write_is_atomic_and_never_through_a_link(report, tmp_path):
    path = write_html(report, tmp_path / "out" / "report.html")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    outside = tmp_path / "outside.html"
    outside.write_text("mine")
    link = tmp_path / "out" / "link.html"
    link.symlink_to(outside)
    with pytest.raises(FileError, match="symbolic link"):
        write_html(report, link, {"other": "text"})
    assert outside.read_text() == "mine"
    assert sorted(os.listdir(path.parent)) == ["link.html", "report.html"]  # no temp file left behind


# -- a real browser ---------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium binary (apt-get install chromium)")


@pytest.mark.spawns
def test_headless_chromium_renders_the_page(report, tmp_path):
    """Chromium's own --dump-dom and --screenshot; with --enable-logging=stderr it logs every console
    message (errors, CSP violations) as a CONSOLE line, and the page must cause none."""
    page_path = write_html(report, tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    base = [_chromium(), "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr", "--v=0", "--window-size=1200,2000"]
    dom = subprocess.run([*base, "--dump-dom", page_path.as_uri()], capture_output=True, text=True, timeout=120)
    subprocess.run([*base, f"--screenshot={shot}", page_path.as_uri()], capture_output=True, timeout=120, check=True)
    assert [line for line in dom.stderr.splitlines() if "CONSOLE" in line] == []
    rendered = Page(dom.stdout)
    assert rendered.tables[0] == _ranking_rows(report)
    srcs = [value for tag, name, value in rendered.attributes if tag == "img" and name == "src"]
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2000, 1200) and pixels.std() > 0.05  # not a blank page


@pytest.mark.spawns
def test_copy_buttons_in_a_real_browser(injected, tmp_path):
    """Through playwright on the system Chromium (its own browser download is not needed): the
    hostile report loads nothing, runs no script but plop's, logs no error, and each button copies."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exports = default_exports(injected)
    url = write_html(injected, tmp_path / "report.html").as_uri()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context()
            context.grant_permissions(["clipboard-read", "clipboard-write"])
            page = context.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            copied = []
            for i in range(len(exports)):
                page.click(f"button[data-copy=export-{i}]")
                copied.append(page.evaluate("navigator.clipboard.readText()"))
            labels = page.locator("button[data-copy]").all_inner_texts()
        finally:
            browser.close()
    assert problems == [] and requests == [url]
    assert copied == list(exports.values()) and labels == ["Copied"] * len(exports)


# -- inline in a notebook (Report._repr_html_) -------------------------------------------------
def test_repr_html_is_the_pages_tables_and_figure(report):
    fragment = report._repr_html_()
    page, whole = Page(fragment), Page(render_html(report))
    assert page.tables == whole.tables and page.tables[0] == _ranking_rows(report)
    srcs = [value for tag, name, value in page.attributes if tag == "img" and name == "src"]
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert "script" not in page.tags and "button" not in page.tags  # a notebook runs no page script
    assert fragment.startswith('<div class="plop-report">') and "<html" not in fragment
    assert escape(f"target_modules={report.recommendation.target_modules!r}") in fragment


def test_repr_html_escapes_every_report_string(injected):
    fragment = injected._repr_html_()
    page = Page(fragment)
    assert INJECTED not in fragment and "&lt;script&gt;alert(1)&lt;/script&gt;" in fragment
    assert "script" not in page.tags and page.tags["img"] == 1
    assert "onerror" not in {name for _, name, _ in page.attributes}
    assert page.tables[0][0][1][1] == INJECTED
