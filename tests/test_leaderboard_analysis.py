"""The leaderboard's analyses page: figures written by `exitbench analyze` shown with their
captions (PNG in an <img>, a link to the SVG), tables rendered from their JSON with every
string escaped, and summaries that point outside their folder ignored."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
from test_analysis import make_traces
from test_leaderboard import make_run

from leaderboard import build_site_report
from suite.analysis import FIGURE_CAPTIONS, AnalysisSettings, analyse_traces, write_analysis

HOSTILE_ID = "<script>window.__xss=5</script>"
HOSTILE_LABEL = "<img src=x onerror=\"window.__xss=6\"> tiny T5 trained here"


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.links: list[str] = []
        self.cells: list[str] = []
        self.scripts = 0
        self._cell = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes.get("src") or "")
        if tag == "a":
            self.links.append(attributes.get("href") or "")
        if tag == "script":
            self.scripts += 1
        self._cell = tag == "td"

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = False

    def handle_data(self, data):
        if self._cell:
            self.cells.append(data)


def write_hostile_analysis(run) -> None:
    """Analyses written by suite.analysis for constructed traces whose example id and model
    label are markup (they must show as text)."""
    rng = np.random.default_rng(1)
    analyses = []
    for model in ("tiny-vanilla", "tiny-calm"):
        for kind in ("generated", "forced"):
            ids = np.repeat([HOSTILE_ID, "ex1", "ex2", "ex3"], 3)
            cos = np.sort(rng.uniform(0.3, 1.0, (12, 6)), axis=1)
            cos[:, -1] = 1.0
            traces = make_traces(ids, cos_last=cos, top1_id=rng.integers(0, 2, (12, 6)),
                                 final_prob=rng.uniform(0, 1, (12, 6)))
            analyses.append(analyse_traces(traces, AnalysisSettings(top_k=1), model=model,
                                           kind=kind, task="cnn_dailymail",
                                           model_label=HOSTILE_LABEL))
    write_analysis(analyses, run / "analysis" / "cnn_dailymail", header=HOSTILE_LABEL)
    # a summary whose figure points outside its folder: skipped, with a note
    evil = run / "analysis" / "evil"
    evil.mkdir()
    (evil / "summary.json").write_text(json.dumps({
        "task": "evil", "figures": [{"name": "x", "png": "../../run_manifest.json",
                                     "caption": "x"}], "tables": []}))


def test_analysis_page_shows_figures_and_escaped_tables(tmp_path):
    run = make_run(tmp_path)
    write_hostile_analysis(run)
    site = build_site_report(run, tmp_path / "site")
    out = site.index.parent
    page_path = out / "analysis.html"
    text = page_path.read_text("utf-8")
    page = Page()
    page.feed(text)

    # every figure: the PNG in an <img>, a link to its SVG, both copied into the site
    for name in FIGURE_CAPTIONS:
        png = f"analysis/cnn_dailymail/{name}.png"
        assert png in page.images, name
        assert f"analysis/cnn_dailymail/{name}.svg" in page.links, name
        assert (out / png).is_file() and (out / png.replace(".png", ".svg")).is_file()
    assert FIGURE_CAPTIONS["stable_predictions"] in text
    for src in page.images + [link for link in page.links if link.startswith("analysis/")]:
        assert (out / unquote(src)).is_file(), src
    # the existing loose figure is still listed, in an <img> (an SVG's script never runs)
    assert "analysis/monotonicity.svg" in page.images

    # the tables are rendered, values formatted, strings escaped
    assert 'data-table="layers"' in text and 'data-table="groups"' in text
    assert "stable_fraction" in text and "tiny-calm" in page.cells
    assert HOSTILE_ID in page.cells  # shown as text ...
    assert HOSTILE_ID not in text and "<img src=x" not in text  # ... never as markup
    assert "&lt;script&gt;window.__xss=5" in text
    assert page.scripts == 2  # the site's own JSON block and site.js only
    assert "tiny models trained here" in text and "not published checkpoints" in text

    # the summary pointing outside its folder shows nothing and is noted
    assert "run_manifest.json" not in " ".join(page.images)
    assert any("evil/summary.json" in note and "skipped" in note for note in site.notes)
    index = site.index.read_text("utf-8")
    assert 'href="analysis.html"' in index
