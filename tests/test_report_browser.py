"""The HTML report in a real headless browser (Debian's ``chromium``, driven over the DevTools
protocol by tests/browser_helpers.py): no console errors, no exceptions, no request beyond the file
itself, plots visible on a screenshot, every number in the page equal to the result files.

Skipped only when chromium is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_helpers import Browser, find_chromium
from qmargin.cli import main
from qmargin.report.html import CSP
from report_helpers import HOSTILE, SPANS_JS, check_values, write_inputs

pytestmark = pytest.mark.skipif(
    find_chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def browser():
    with Browser(width=1280, height=900) as b:
        yield b


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("report")
    inputs = write_inputs(tmp / "in")
    out = tmp / "report.html"
    labels = ",".join(["ce4", "mcel4", "xent", HOSTILE.replace(",", ";")])
    code = main(
        ["report", *map(str, inputs["paths"]), "--labels", labels, "--title", HOSTILE, "--out", str(out)]
    )
    assert code == 0
    return out, inputs


@pytest.fixture(scope="module")
def opened(browser, report):
    out, inputs = report
    browser.open(out)
    return browser, inputs


def test_the_page_renders_without_console_errors_or_network(opened, report):
    b, _ = opened
    assert b.problems() == []
    assert b.requests() == [report[0].resolve().as_uri()]  # the file itself, nothing else
    assert b.evaluate("document.title") == HOSTILE  # escaped in the source, text in the page
    assert b.evaluate("document.querySelectorAll('script').length") == 0
    assert (
        b.evaluate("document.querySelectorAll('section').length") == 5
    )  # 2 plots, 1 certificate, config, provenance


def test_the_numbers_in_the_page_equal_the_json(opened):
    b, inputs = opened
    spans = b.evaluate(SPANS_JS)
    assert check_values(spans, inputs) > 120  # every model, BER and statistic (mean, std, min, max, CI, n)


def test_the_plots_are_visible(opened):
    b, _ = opened
    rects = b.evaluate(
        "Array.from(document.querySelectorAll('figure.plot svg')).map(s => {"
        " const r = s.getBoundingClientRect();"
        " return {x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height}; })"
    )
    assert len(rects) == 2
    for rect in rects:
        assert rect["width"] > 400 and rect["height"] > 200, rect
        rgb = np.asarray(Image.open(io.BytesIO(b.screenshot(rect))).convert("RGB")).reshape(-1, 3).astype(int)
        ink = float((rgb.min(axis=1) < 235).mean())  # share of pixels that are not white
        saturated = rgb[rgb.max(axis=1) - rgb.min(axis=1) > 60]
        colours = {tuple(c) for c in (saturated // 32).tolist()}
        assert ink > 0.03, ink
        assert len(colours) >= 3, colours  # the curves' colours, not only black axes


def test_a_certificate_table_of_a_certified_run_is_in_the_page(opened):
    b, inputs = opened
    rows = b.evaluate(
        "Array.from(document.querySelectorAll('table[data-table=certificate] tbody tr'))"
        ".map(tr => Array.from(tr.querySelectorAll('td')).map(td => td.textContent))"
    )
    assert len(rows) == len(inputs["certificate"]["results"])
    assert [r[0] for r in rows] == [str(r["bits"]) for r in inputs["certificate"]["results"]]
    assert {r[4] for r in rows} == {"yes", "no"}
    assert json.loads(
        b.evaluate("JSON.stringify(document.querySelector('[data-provenance=command]').textContent)")
    ).startswith("qmargin report ")


def test_the_harness_sees_console_errors_and_blocked_loads(browser, tmp_path):
    """The checks above are real: a page with a console error, an exception, or a network load under
    the report's own policy is caught. (Last: it navigates away from the report.)"""
    page = tmp_path / "bad.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head>'
        '<body><img src="https://example.invalid/x.png"><p>x</p></body></html>'
    )
    browser.open(page)
    assert any("Content Security Policy" in p or "example.invalid" in p for p in browser.problems())
    page.write_text("<html><body><script>console.error('boom'); undefinedFunction();</script></body></html>")
    browser.open(page)
    problems = browser.problems()
    assert any("console.error" in p and "boom" in p for p in problems), problems
    assert any(p.startswith("exception") for p in problems), problems
