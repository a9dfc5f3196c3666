"""The HTML report without a browser: the confidence interval, what the page may reference, escaping,
provenance, the numbers in the page, and the commands that write it (report, compare, reproduce).
The same page in a real browser: tests/test_report_browser.py."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from scipy import stats

from qmargin.cli import main
from qmargin.report.html import report_html
from qmargin.report.provenance import cpu_model, machine_description, provenance
from qmargin.stats import mean_confidence_interval, student_t_cdf, student_t_quantile
from report_helpers import HOSTILE, RESULTS, campaign, check_values, collect_spans, write_inputs, write_json


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 1


def _error_line(capsys, argv: list[str]) -> str:
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qmargin: error: "), err
    assert "Traceback" not in err
    return lines[0]


# -- the confidence interval ----------------------------------------------------------------------


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 19, 29, 49, 99, 999, 100_000])
def test_student_t_quantile_equals_scipy(df):
    for p in (0.6, 0.75, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025, 0.3):
        assert math.isclose(student_t_quantile(p, df), stats.t.ppf(p, df), rel_tol=1e-10), (p, df)
    for t in (-30.0, -2.0, -0.1, 0.0, 0.5, 1.96, 12.0):
        assert math.isclose(student_t_cdf(t, df), stats.t.cdf(t, df), rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize("n", [2, 3, 10, 50, 1000])
def test_mean_confidence_interval_is_student_t_over_the_patterns(n):
    values = [0.9 - 0.01 * ((7 * r) % 11) for r in range(n)]
    mean, pop_std = float(sum(values) / n), float(__import__("numpy").std(values))
    lo, hi = mean_confidence_interval(mean, pop_std, n)
    want = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(values))
    assert math.isclose(lo, want[0], rel_tol=1e-12) and math.isclose(hi, want[1], rel_tol=1e-12)
    lo99, hi99 = mean_confidence_interval(mean, pop_std, n, level=0.99)
    assert lo99 < lo and hi99 > hi


def test_mean_confidence_interval_edge_cases():
    assert mean_confidence_interval(0.5, 0.0, 1) is None  # one pattern: no interval
    assert mean_confidence_interval(0.5, 0.0, 20) == (0.5, 0.5)
    with pytest.raises(ValueError):
        mean_confidence_interval(0.5, 0.1, 5, level=1.0)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


# -- provenance -------------------------------------------------------------------------------------


def test_machine_description_names_the_cpu_and_loads_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from qmargin.report.provenance import machine_description as m; d = m(); "
        "assert 'torch' not in sys.modules; print(d)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert cpu_model() in out and "CPUs" in out and "Python" in out
    assert machine_description().startswith(cpu_model())
    p = provenance(command="qmargin report x", inputs=[{"path": "x", "sha256": "0" * 64, "bytes": 1}])
    assert p["qmargin_version"] and p["date"].endswith("+00:00") and p["inputs"][0]["path"] == "x"


# -- the page ---------------------------------------------------------------------------------------


class _Refs(HTMLParser):
    """Every tag and every attribute that can make a browser load something."""

    LOADING = {"src", "href", "xlink:href", "srcset", "action", "poster", "data", "background", "formaction"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for k, v in attrs:
            if k in self.LOADING and v is not None:
                self.refs.append((tag, k, v))

    handle_startendtag = handle_starttag


def assert_loads_nothing(page: str) -> None:
    refs = _Refs()
    refs.feed(page)
    assert "script" not in refs.tags and "link" not in refs.tags and "iframe" not in refs.tags
    for tag, attr, value in refs.refs:  # only in-page anchors (#...) and data: URIs
        assert value.startswith("#") or value.startswith("data:"), (tag, attr, value)
    assert "@import" not in page
    for url in re.findall(r"url\(\s*['\"]?([^)'\"]*)", page):
        assert url.startswith("#") or url.startswith("data:"), url
    # no http(s) URL at all, apart from the XML namespaces of the inline SVG (names, never loaded)
    urls = set(re.findall(r"https?://[^\s\"'<>)]*", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


@pytest.fixture()
def inputs(tmp_path: Path):
    return write_inputs(tmp_path / "in")


def test_report_command_writes_one_self_contained_page(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [str(p) for p in inputs["paths"]]
    assert run_main(["report", *paths, RESULTS.as_posix() + "/mondeq_fast.json", "--out", "r.html"]) == 0
    assert "wrote r.html (4 sections from 6 input files)" in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert_loads_nothing(page)
    assert page.count("<svg") == 3  # two comparisons (top-1, cross-entropy) and the MonDEQ PTQ plot
    assert page.count("<table") >= 8 and page.count("<details>") >= 6
    assert check_values(collect_spans(page), inputs) > 100
    # plot ids are unique across the page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # provenance: version, command line, date, machine, the SHA-256 of every file read
    assert 'data-provenance="command"><code>qmargin report ' in page and "--out r.html" in page
    assert cpu_model() in page
    files = [inputs["paths"][0] / "ber.json", inputs["paths"][0] / "config.json", *inputs["paths"][1:]]
    for f in [*files, RESULTS / "mondeq_fast.json"]:
        assert f'data-sha256="{hashlib.sha256(f.read_bytes()).hexdigest()}"' in page, f
    # the configurations: the campaign's settings and the run's config.json, collapsible
    assert "ce4: run (" in page and "&quot;loss&quot;: &quot;mcel&quot;" in page
    # lower is better: the cross-entropy table marks the minimum
    assert "lower is better" in page


def test_best_of_each_row_is_marked_by_the_metrics_direction(inputs, tmp_path):
    out = tmp_path / "r.html"
    assert run_main(["report", *map(str, inputs["paths"][:2]), "--out", str(out)]) == 0
    page = out.read_text()
    ce, mcel = inputs["campaigns"]["ce4"], inputs["campaigns"]["mcel4"]
    best = re.findall(r'<td class="num best"><span class="v" ([^>]*)>', page)
    marked = {
        (re.search(r'data-model="([^"]*)"', b)[1], (re.search(r'data-ber="([^"]*)"', b) or [0, "clean"])[1])
        for b in best
    }
    want = {("ce4" if ce["clean_accuracy"] > mcel["clean_accuracy"] else "mcel4", "clean")}
    for a, b in zip(ce["results"][:3], mcel["results"][:3], strict=True):
        want.add(("ce4" if a["mean"] >= b["mean"] else "mcel4", json.dumps(a["ber"])))
        if a["mean"] == b["mean"]:
            want.add(("mcel4", json.dumps(a["ber"])))
    assert marked == want  # BER 0.05: only ce4 has values, nothing to compare


def test_text_from_result_files_is_escaped(inputs, tmp_path):
    out = tmp_path / "r.html"
    labels = ",".join([HOSTILE.replace(",", ";"), "b</td><b>", "c", "d"])
    assert (
        run_main(
            ["report", *map(str, inputs["paths"]), "--labels", labels, "--title", HOSTILE, "--out", str(out)]
        )
        == 0
    )
    page = out.read_text()
    assert "<script" not in page and "</td><b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert_loads_nothing(page)


def test_a_dollar_in_a_label_is_no_mathtext():
    res = campaign(0.9, {0.01: [0.8, 0.85]})
    page = report_html({"comparisons": [{"title": "t", "results": [("cost $5 and $x^2", res)]}]})
    assert "cost $5 and $x^2" in page  # in the legend, as text


def test_reproduction_summaries_render_their_tables(tmp_path):
    out = tmp_path / "r.html"
    assert (
        run_main(
            ["report", str(RESULTS / "mcel_fast.json"), str(RESULTS / "mondeq_full.json"), "--out", str(out)]
        )
        == 0
    )
    page = out.read_text()
    assert_loads_nothing(page)
    mcel = json.loads((RESULTS / "mcel_fast.json").read_text())
    spans = [s["attrs"] for s in collect_spans(page)]
    for row in mcel["rows"]:  # every method, bit width and BER: mean and std as stored
        group = str(sorted({r["bits"] for r in mcel["rows"]}).index(row["bits"]) + 1)
        for e in row["results"]:
            got = {
                a["stat"]: json.loads(a["value"])
                for a in spans
                if a.get("group") == group
                and a.get("model") == row["method"]
                and a.get("ber") == json.dumps(e["ber"])
            }
            for k in ("mean", "std", "min", "max"):
                assert got[k] == e[k]
            assert got["patterns"] == mcel["repeats"]
    mondeq = json.loads((RESULTS / "mondeq_full.json").read_text())
    ptq = [a for a in spans if a.get("table") == "ptq"]
    assert len({a["row"] for a in ptq}) == len(mondeq["ptq"])
    for a in ptq + [a for a in spans if a.get("table") in ("qat", "float", "displacement")]:
        assert json.loads(a["value"]) == mondeq[a["table"]][int(a["row"])][a["stat"]]


def test_a_run_directory_with_no_results_and_bad_files_are_one_line(inputs, tmp_path, capsys):
    out = tmp_path / "r.html"
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": [1, 2')
    assert "invalid JSON" in _error_line(capsys, ["report", str(bad), "--out", str(out)])
    other = write_json(tmp_path / "other.json", {"hello": 1})
    assert "not a campaign result, a certificate" in _error_line(
        capsys, ["report", str(other), "--out", str(out)]
    )
    edited = json.loads((inputs["paths"][0] / "ber.json").read_text())
    edited["results"][1]["mean"] = 0.5
    write_json(tmp_path / "edited.json", edited)
    assert "mean" in _error_line(capsys, ["report", str(tmp_path / "edited.json"), "--out", str(out)])
    cert = json.loads(inputs["paths"][3].read_text())
    cert["results"][0]["certified"] = "maybe"
    write_json(tmp_path / "cert.json", cert)
    assert "certified" in _error_line(capsys, ["report", str(tmp_path / "cert.json"), "--out", str(out)])
    empty = tmp_path / "emptyrun"
    empty.mkdir()
    assert "qmargin evaluate" in _error_line(capsys, ["report", str(empty), "--out", str(out)])
    assert "no such file" in _error_line(capsys, ["report", str(tmp_path / "nope.json"), "--out", str(out)])
    assert "--labels has 1 names for 2" in _error_line(
        capsys,
        ["report", str(inputs["paths"][0]), str(inputs["paths"][1]), "--labels", "x", "--out", str(out)],
    )
    assert not out.exists()


def test_the_report_never_replaces_an_input_or_a_directory(inputs, tmp_path, capsys):
    run = inputs["paths"][0]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert "is also an input" in _error_line(capsys, ["report", str(run), "--out", str(run / "ber.json")])
    assert "is also an input" in _error_line(capsys, ["report", str(run), "--out", str(run / "config.json")])
    assert "is a directory" in _error_line(capsys, ["report", str(run), "--out", str(run)])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["ber.json", "config.json"]


def test_compare_writes_an_html_report_beside_its_plot(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, mcel = inputs["paths"][0], inputs["paths"][1].parent
    assert run_main(["compare", str(run), str(mcel)]) == 0
    printed = capsys.readouterr().out
    assert "wrote compare.png, compare.html" in printed
    assert "paired differences against ce4" in printed and "mcel4 - ce4" in printed
    page = (tmp_path / "compare.html").read_text()
    assert_loads_nothing(page)
    check_values(collect_spans(page), {**inputs, "groups": [["ce4", "mcel4"]], "certificate": None})
    diffs = [s["attrs"] for s in collect_spans(page) if s["attrs"].get("stat") == "diff_mean"]
    assert diffs and {a["model"] for a in diffs} == {"mcel4"}  # the paired table is there, not vacuous
    assert run_main(["compare", str(run), str(mcel), "--out", "p.png", "--html", "sub/c.html"]) == 0
    assert (tmp_path / "sub" / "c.html").is_file() and not (tmp_path / "p.html").exists()
    assert "would be the same file" in _error_line(
        capsys, ["compare", str(run), "--out", "x.png", "--html", "x.png"]
    )
    assert "is also an input" in _error_line(capsys, ["compare", str(run), "--html", str(run / "ber.json")])


@pytest.mark.parametrize("which, summary", [("mcel", "mcel_fast.json"), ("mondeq", "mondeq_fast.json")])
def test_reproduce_writes_an_html_report(which, summary, tmp_path, capsys, monkeypatch):
    """The command's wiring (the experiment itself is tested in test_experiments.py): the experiment
    writes OUT/summary.json, the command renders OUT/report.html (or --html) from it."""
    import qmargin.experiments.mcel as mcel_mod
    import qmargin.experiments.mondeq as mondeq_mod

    def fake(*, out_dir, **kwargs):
        shutil.copy(RESULTS / summary, Path(out_dir) / "summary.json")
        return {"summary": {}, "markdown": "| table |"}

    def prepared(out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        return out

    module, name = (
        (mcel_mod, "run_mcel_reproduction") if which == "mcel" else (mondeq_mod, "run_mondeq_reproduction")
    )
    monkeypatch.setattr(module, name, lambda **kw: fake(**{**kw, "out_dir": prepared(Path(kw["out_dir"]))}))
    out = tmp_path / "repro"
    assert run_main(["reproduce", which, "--out", str(out)]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out.replace("\n", "")
    page = (out / "report.html").read_text()
    assert_loads_nothing(page)
    assert f"qmargin reproduce {which} --preset fast" in page
    assert (
        (("mcel_fast" not in page) and ("repro: 2-bit weights" in page)) if which == "mcel" else "ptq" in page
    )
    assert run_main(["reproduce", which, "--out", str(out), "--html", str(tmp_path / "elsewhere.html")]) == 0
    assert (tmp_path / "elsewhere.html").is_file()
    assert "is a directory" in _error_line(
        capsys, ["reproduce", which, "--out", str(tmp_path / "o2"), "--html", str(out)]
    )
    assert not (tmp_path / "o2").exists()  # refused before the experiment ran


def test_a_full_mcel_reproduction_directory_reports_each_preset(tmp_path, capsys):
    """``reproduce mcel --preset full`` writes OUT/fashion and OUT/cifar10, each with its summary."""
    out = tmp_path / "full"
    for preset in ("cifar10", "fashion"):
        (out / preset).mkdir(parents=True)
        shutil.copy(RESULTS / "mcel_fast.json", out / preset / "summary.json")
    assert run_main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert "wrote" in capsys.readouterr().out
    page = (tmp_path / "r.html").read_text()
    assert "full/cifar10: 2-bit weights" in page and "full/fashion: 8-bit weights" in page
    assert page.count("<svg") == 6
