"""The static leaderboard built from a run directory constructed here: pages, escaping of a
hostile measure name, relative links, fronts as suite.pareto computes them, missing inputs.

``make_run`` is shared with the browser test (tests/test_leaderboard_browser.py)."""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

from leaderboard import build_site, build_site_report
from leaderboard.describe import describe_profile
from leaderboard.inputs import LeaderboardError
from leaderboard.plot import nice_step
from leaderboard.site import SITE_MARKER, linkify, script_json, unique_slugs
from suite.atomic import atomic_write_json
from suite.cli import main
from suite.pareto import area_over_baseline, best_speedup_within, pareto_mask
from suite.profiles import PROFILES as PROFILE_REGISTRY
from suite.profiles import example_measured_profile
from suite.results import ResultRow, write_results
from suite.traces import ShardInfo, TraceManifest

HOSTILE = "<script>alert(1)</script>"
HOSTILE_MESSAGE = "<img src=x onerror=\"window.__xss=2\">"
MODEL = "tiny-calm"
MODEL_LABEL = "tiny T5 trained by exitbench on the SQuAD sample (CALM loss & 6 layers)"
TASKS = {"squad": "f1", "wmt15_en_fr": "bleu"}
PROFILES = {"a100_sxm_80gb": "simulated", "toy_measured": "measured"}
BATCH_SIZES = (1, 8)
NUM_LAYERS = 6


def measured_profile() -> dict:
    """A measured profile (the schema's own example), snapshotted in the run manifest."""
    return example_measured_profile()


def _points(measure: str, task_index: int, profile_index: int, batch_size: int,
            rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """(threshold, speedup, quality, mean layers) per point; some points dominated."""
    if measure == "static_layer":
        thresholds = [(k + 1) / NUM_LAYERS for k in range(NUM_LAYERS)]
        layers = [float(k + 1) for k in range(NUM_LAYERS)]
    elif measure == "softmax_margin":
        thresholds = [0.5, 0.7, 0.9, 0.95, 0.99]
        layers = [1.6, 2.2, 3.1, 3.9, 4.8]
    else:
        thresholds = [0.2, 0.4, 0.6, 0.8]
        layers = [2.0, 2.5, 3.5, 4.4]
    out = []
    for threshold, mean_layers in zip(thresholds, layers):
        speedup = NUM_LAYERS / (mean_layers + 0.4 * (NUM_LAYERS - mean_layers)) \
            * (1.0 + 0.05 * profile_index + 0.02 * (batch_size > 1))
        loss = (NUM_LAYERS - mean_layers) ** 2 * (3.0 if measure == "static_layer" else 1.2)
        quality = 60.0 - 20.0 * task_index - loss + float(rng.normal(0, 1.5))
        out.append((threshold, speedup, quality, mean_layers))
    return out


def make_rows(traces_hashes: dict[str, str]) -> list[ResultRow]:
    rng = np.random.default_rng(7)
    measure_hashes = {m: hashlib.sha256(m.encode()).hexdigest()
                      for m in ("static_layer", "softmax_margin", HOSTILE)}
    rows = []
    for task_index, (task, metric) in enumerate(TASKS.items()):
        full_quality = 60.0 - 20.0 * task_index
        for profile_index, (profile, kind) in enumerate(PROFILES.items()):
            for batch_size in BATCH_SIZES:
                full_tokens_per_s = 100.0 * batch_size * (1 + profile_index)
                for measure in ("static_layer", "softmax_margin", HOSTILE):
                    modes = ["replay"]
                    if measure == "softmax_margin" and task == "squad" and batch_size == 1 \
                            and profile == "a100_sxm_80gb":
                        modes.append("online")
                    for mode in modes:
                        points = _points(measure, task_index, profile_index, batch_size, rng)
                        if mode == "online":
                            points = points[:2]
                        for threshold, speedup, quality, mean_layers in points:
                            rows.append(ResultRow(
                                task=task, model=MODEL, model_label=MODEL_LABEL,
                                measure=measure, measure_options="{}",
                                deployable=measure != HOSTILE, threshold=threshold, min_layer=0,
                                profile=profile, profile_kind=kind, batch_size=batch_size,
                                mode=mode, metric=metric, quality=quality,
                                quality_full_depth=full_quality,
                                scores={metric: quality}, mean_layers_used=mean_layers,
                                num_layers=NUM_LAYERS, token_agreement=0.9,
                                exit_histogram=[1.0 / NUM_LAYERS] * NUM_LAYERS,
                                tokens_per_s=full_tokens_per_s * speedup,
                                full_depth_tokens_per_s=full_tokens_per_s, speedup=speedup,
                                num_examples=20, num_tokens=200,
                                traces_hash=traces_hashes[task],
                                measure_code_hash=measure_hashes[measure], split="validation"))
    return rows


def make_run(root: Path, *, with_extras: bool = True) -> Path:
    """A run directory: results, and (``with_extras``) run manifest, trace manifests,
    validation reports and an analysis figure."""
    run = root / "run"
    traces_hashes = {}
    for task in TASKS:
        manifest = TraceManifest(
            kind="generated", task=task, split="validation[:20]", model_id=MODEL,
            model_hash="m" * 64, tokenizer_hash="t" * 64, num_layers=NUM_LAYERS,
            example_ids_hash="e" * 64, num_examples=20, generation={"max_new_tokens": 30},
            device="cpu", dtype="float32", seed=0, suite_version="0.1.0", git_commit="abc123",
            shards=[ShardInfo(file="shard-0-20.arrow", key="k" * 64, sha256="s" * 64,
                              num_examples=20, num_tokens=200, first_example=0)])
        path = run / "traces" / task / MODEL / "generated" / "manifest.json"
        if with_extras:
            atomic_write_json(path, manifest.to_dict())
            traces_hashes[task] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            traces_hashes[task] = "f" * 64
    rows = make_rows(traces_hashes)
    write_results(run / "results", rows, {"suite_version": "0.1.0"})
    if with_extras:
        atomic_write_json(run / "run_manifest.json", {
            "config": {"tasks": list(TASKS), "measures": ["static_layer", "softmax_margin",
                                                         HOSTILE]},
            "versions": {"exitbench": "0.1.0", "torch": "2.13.0"},
            "note": "</script><script>window.__xss=3</script>",
            "profiles": {"toy_measured": measured_profile()}})
        # the reports in the form the validator writes them (the runner adds key, measure)
        from suite.measures import MEASURES
        from suite.validate import FAIL, CheckResult, ValidationReport, validate_measure

        report = validate_measure(MEASURES.get("softmax_margin"), {}, source="builtin",
                                  expected_name="softmax_margin").to_dict()
        atomic_write_json(run / "validation" / "softmax_margin.json",
                          {**report, "measure": "softmax_margin"})
        hostile = ValidationReport(measure=HOSTILE, source="hostile.py", options={},
                                   deployable=True,
                                   checks=[CheckResult("causality", FAIL, HOSTILE_MESSAGE)])
        atomic_write_json(run / "validation" / "hostile.json", hostile.to_dict())
        (run / "analysis").mkdir(parents=True)
        (run / "analysis" / "monotonicity.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
            '<script>window.__xss=4</script><rect width="40" height="20" fill="#888"/></svg>')
    return run


# -- reading the built pages -----------------------------------------------------------------
class PageParser(HTMLParser):
    """Collects links, scripts, ids, markers and table rows of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []
        self.scripts: list[dict[str, str | None]] = []
        self.ids: set[str] = set()
        self.markers: list[dict[str, str | None]] = []
        self.event_handlers: list[tuple[str, str]] = []
        self._batch: str | None = None
        self._hidden = False
        self._panel: str | None = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name, _ in attrs:
            if name.lower().startswith("on"):
                self.event_handlers.append((tag, name))
        if "id" in attributes:
            self.ids.add(attributes["id"] or "")
        if tag == "section" and (attributes.get("class") or "") == "panel":
            self._panel = attributes.get("id")
        for name in ("href", "src"):
            if attributes.get(name) is not None:
                self.links.append((tag, attributes[name]))
        if tag == "script":
            self.scripts.append(attributes)
        if tag == "div" and "data-batch-size" in attributes:
            self._batch = attributes["data-batch-size"]
            self._hidden = "hidden" in attributes
        if tag in ("circle", "path") and "point" in (attributes.get("class") or "").split():
            self.markers.append({**attributes, "batch": self._batch, "panel": self._panel,
                                 "hidden": self._hidden})


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text("utf-8"))
    return parser


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaderboard")
    run = make_run(root)
    site = build_site_report(run, root / "site")
    return run, site


def test_build_site_returns_the_index_and_writes_every_page(built):
    run, site = built
    out = site.index.parent
    assert site.index == out / "index.html" and site.index.is_file()
    measure_pages = sorted(p.name for p in (out / "measures").glob("*.html"))
    assert len(measure_pages) == 4  # three measures and the list
    assert "static_layer.html" in measure_pages and "softmax_margin.html" in measure_pages
    assert sorted(p.name for p in (out / "profiles").glob("*.html")) == [
        "a100_sxm_80gb.html", "index.html", "toy_measured.html"]
    for name in ("provenance.html", "analysis.html", "static/style.css", "static/site.js",
                 "data/results.json", SITE_MARKER):
        assert (out / name).is_file(), name
    # the results file travels with the site, byte for byte
    assert (out / "data/results.json").read_bytes() == (run / "results/results.json").read_bytes()
    assert site.num_panels == len(TASKS) * len(PROFILES) * len(BATCH_SIZES)


def test_hostile_strings_are_escaped_on_every_page(built):
    _, site = built
    out = site.index.parent
    escaped = html.escape(HOSTILE, quote=False)
    pages = sorted(out.rglob("*.html"))
    seen_escaped = set()
    for page in pages:
        text = page.read_text("utf-8")
        assert HOSTILE not in text, page
        assert "<script>window.__xss" not in text and "<img src=x" not in text, page
        parsed = parse(page)
        assert not parsed.event_handlers, (page, parsed.event_handlers)
        # the only scripts are the site's own: its JS file and its JSON data block
        for script in parsed.scripts:
            assert script.get("type") == "application/json" or \
                (script.get("src") or "").endswith("static/site.js"), (page, script)
        if escaped in text:
            seen_escaped.add(page.relative_to(out).as_posix())
    assert {"index.html", "measures/index.html", "provenance.html"} <= seen_escaped
    hostile_page = [p for p in seen_escaped if p.startswith("measures/") and
                    p not in ("measures/index.html", "measures/static_layer.html",
                              "measures/softmax_margin.html")]
    assert hostile_page and re.fullmatch(r"measures/[A-Za-z0-9_-]+\.html", hostile_page[0])
    # the JSON data block cannot close its script element
    index = (out / "index.html").read_text("utf-8")
    data = re.search(r'<script type="application/json" id="site-data">(.*?)</script>', index,
                     re.S).group(1)
    assert "<" not in data and json.loads(data)["measures"][0] == HOSTILE
    # the validation message is text on the hostile measure's page
    page_text = (out / hostile_page[0]).read_text("utf-8")
    assert "&lt;img src=x onerror=" in page_text


def test_links_are_relative_and_resolve(built):
    _, site = built
    out = site.index.parent
    checked = 0
    ids_by_page = {p: parse(p).ids for p in out.rglob("*.html")}
    for page in out.rglob("*.html"):
        for tag, link in parse(page).links:
            parts = urlsplit(link)
            if link.startswith("data:"):
                continue
            if parts.scheme in ("http", "https"):
                assert tag == "a" and page.parent.name == "profiles", (page, link)  # sources
                continue
            assert not parts.scheme and not parts.netloc and not link.startswith("/"), \
                (page, link)
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            assert target.is_file(), (page, link)
            assert out.resolve() in target.parents
            if parts.fragment:
                assert parts.fragment in ids_by_page[target], (page, link)
            checked += 1
    assert checked > 50


def test_fronts_and_scores_match_suite_pareto(built):
    run, site = built
    out = site.index.parent
    from suite.results import read_results
    rows = read_results(run / "results")
    markers = parse(out / "index.html").markers
    assert len(markers) == len(rows)
    by_key = defaultdict(list)
    for row in rows:
        by_key[(row.task, row.profile, row.batch_size, row.measure, row.mode)].append(row)
    index_text = (out / "index.html").read_text("utf-8")
    for (task, profile, batch_size, measure, mode), group in by_key.items():
        speed = np.array([r.tokens_per_s for r in group])
        quality = np.array([r.quality for r in group])
        expected = {(r.threshold, bool(on)) for r, on in zip(group, pareto_mask(speed, quality))}
        shown = {(float(m["data-threshold"]), m["data-front"] == "1") for m in markers
                 if m["data-measure"] == measure and m["data-mode"] == mode
                 and m["batch"] == str(batch_size)
                 and re.sub(r"[^a-z0-9]+", "-", f"{task}-{profile}") in m["panel"]}
        assert shown == expected, (task, profile, batch_size, measure, mode)
        # the ranking shows suite.pareto's best speedup for this series
        best = best_speedup_within(np.array([r.speedup for r in group]), quality,
                                   group[0].quality_full_depth)
        assert (f"{best:.2f}×" if np.isfinite(best) else "none") in index_text
    # hidden markers are exactly those of the batch sizes not selected by default
    assert {m["batch"] for m in markers if not m["hidden"]} == {"1"}
    # an area score as suite.pareto computes it appears in the ranking
    group = by_key[("squad", "a100_sxm_80gb", 1, "softmax_margin", "replay")]
    base = by_key[("squad", "a100_sxm_80gb", 1, "static_layer", "replay")]
    area = area_over_baseline(np.array([r.speedup for r in group]),
                              np.array([r.quality for r in group]),
                              np.array([r.speedup for r in base]),
                              np.array([r.quality for r in base]))
    assert f"{area:+.2f}" in index_text


def test_pages_show_model_labels_validation_profiles_and_provenance(built):
    run, site = built
    out = site.index.parent
    label = html.escape(MODEL_LABEL)
    for page in ("index.html", "measures/softmax_margin.html", "profiles/a100_sxm_80gb.html"):
        assert label in (out / page).read_text("utf-8"), page
    margin = (out / "measures/softmax_margin.html").read_text("utf-8")
    assert "causality" in margin and "Passed" in margin
    # every check of the validator's report reads as passed (or skipped), none as FAIL
    cells = re.findall(r'<td class="(passed|failed|skipped)">(pass|FAIL|skipped)</td>', margin)
    assert len(cells) >= 10 and all(c != "FAIL" for _, c in cells), cells
    assert ("passed", "pass") in cells and '<td>causality-tokens</td>' in margin
    assert hashlib.sha256(b"softmax_margin").hexdigest() in margin  # the rows' code hash
    assert "needs the lm head" in margin.lower() and "Declared cost" in margin
    static = (out / "measures/static_layer.html").read_text("utf-8")
    assert "not validated" in static
    a100 = (out / "profiles/a100_sxm_80gb.html").read_text("utf-8")
    assert "memory_bandwidth_bytes_per_s" in a100 and '<a href="https://' in a100
    measured = (out / "profiles/toy_measured.html").read_text("utf-8")
    assert "Toy CPU" in measured and "decoder_layer_seconds" in measured
    assert "<td class=\"num\">1 ms</td>" in measured and "batch \\ context_lens" in measured
    provenance = (out / "provenance.html").read_text("utf-8")
    manifest_hash = hashlib.sha256(
        (run / "traces/squad/tiny-calm/generated/manifest.json").read_bytes()).hexdigest()
    assert manifest_hash in provenance and "manifest traces/squad/tiny-calm/generated" in provenance
    assert "no manifest in this run" not in provenance
    assert hashlib.sha256((run / "run_manifest.json").read_bytes()).hexdigest() in provenance
    assert "&lt;/script&gt;&lt;script&gt;window.__xss=3" in provenance


def test_missing_inputs_are_named_and_a_results_dir_works(tmp_path):
    run = make_run(tmp_path, with_extras=False)
    site = build_site_report(run / "results", tmp_path / "site")
    text = " ".join(site.notes)
    for missing in ("run_manifest.json", "traces/", "validation/", "analysis/"):
        assert missing in text, missing
    index = site.index.read_text("utf-8")
    assert "run_manifest.json: not in this run" in index
    assert not (site.index.parent / "analysis.html").exists()
    assert "analysis.html" not in index


def test_rebuild_replaces_a_site_but_never_another_folder(tmp_path):
    run = make_run(tmp_path, with_extras=False)
    out = tmp_path / "site"
    build_site(run, out)
    (out / "stale.html").write_text("old")
    build_site(run, out)
    assert not (out / "stale.html").exists() and (out / "index.html").is_file()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    with pytest.raises(LeaderboardError, match="not a site built by exitbench"):
        build_site(run, precious)
    assert (precious / "thesis.tex").read_text() == "keep me"
    with pytest.raises(LeaderboardError, match="would replace the run"):
        build_site(run / "results", run)
    assert not list(tmp_path.glob(".*tmp-*"))  # no temporary folder left behind


def test_errors_name_the_input_and_the_fix(tmp_path, capsys):
    with pytest.raises(LeaderboardError, match="exitbench run"):
        build_site(tmp_path, tmp_path / "site")
    (tmp_path / "results.json").write_text(json.dumps({"schema_version": 99, "rows": []}))
    with pytest.raises(LeaderboardError, match="schema 99"):
        build_site(tmp_path, tmp_path / "site")
    assert main(["leaderboard", "build", "--results", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "site")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["leaderboard", "serve", "--site", str(tmp_path)]) == 2
    assert "build the site first" in capsys.readouterr().err


def test_cli_build_prints_the_index_and_what_is_missing(tmp_path, capsys):
    run = make_run(tmp_path, with_extras=False)
    assert main(["leaderboard", "build", "--results", str(run),
                 "--out", str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "site" / "index.html").resolve()) in out
    assert "run_manifest.json" in out and "file://" in out


def test_every_installed_profile_renders_with_a_source_per_figure():
    for name in PROFILE_REGISTRY.names():
        info = describe_profile(name, None)
        assert info.problem is None and info.kind in ("simulated", "measured"), name
        if info.kind == "simulated":
            assert info.specs and all(row.source != "no source given" for row in info.specs), name


def test_escaping_helpers():
    assert script_json({"a": "</script><!--"}) == '{"a": "\\u003c/script\\u003e\\u003c!--"}'
    link = linkify('see https://example.org/a?b=1&c=2. and javascript:alert(1) <b>')
    assert '<a href="https://example.org/a?b=1&amp;c=2"' in link
    assert "javascript:alert(1) &lt;b&gt;" in link and 'href="javascript' not in link
    slugs = unique_slugs(["a", "A", HOSTILE, "index"])
    assert slugs["a"].lower() != slugs["A"].lower() and "A" in (slugs["a"], slugs["A"])
    assert slugs["index"] != "index"
    assert re.fullmatch(r"script_alert_1___script-[0-9a-f]{10}", slugs[HOSTILE])
    assert [nice_step(s) for s in (1.0, 7.0, 120.0, 0.03)] == [0.2, 2.0, 25.0, 0.01]


# -- the site tells the truth --------------------------------------------------------------
RLO_LABEL = "rlo\u202eevil label"


def test_an_unclosed_right_to_left_override_is_isolated_on_every_page(tmp_path):
    """A label holding U+202E (and no closing PDF) is wrapped in <bdi> wherever it is text,
    so it cannot reorder the page's own text after it."""
    import dataclasses

    from suite.results import read_results, write_results

    run = make_run(tmp_path)
    rows = [dataclasses.replace(r, measure=RLO_LABEL) if r.measure == HOSTILE else r
            for r in read_results(run / "results")]
    write_results(run / "results", rows, {})
    site = build_site(run, tmp_path / "site")
    pages = list(site.parent.rglob("*.html"))
    seen = 0
    for page in pages:
        text = page.read_text("utf-8")
        seen += text.count("\u202e")
        outside = re.sub(r"<bdi>.*?</bdi>", "", text, flags=re.S)
        outside = re.sub(r"<script\b.*?</script>", "", outside, flags=re.S)  # JSON data
        outside = re.sub(r"<[^>]*>", "", outside)  # attribute values are not page text
        assert "\u202e" not in outside, page
    assert seen > 0
    css = (site.parent / "static" / "style.css").read_text()
    assert "unicode-bidi: isolate" in css


def test_quality_and_throughput_axes_never_go_below_zero():
    from leaderboard.plot import _domain

    low, high = _domain([0.3, 40.0, 12.0], floor=0.0)
    assert low == 0.0 and high > 40.0
    assert _domain([0.2, 0.2], floor=0.0)[0] == 0.0  # padding of a flat series stops at 0
    assert _domain([-2.0, 3.0], floor=0.0)[0] < -2.0  # a negative value is still shown
def test_calibrated_points_are_marked_with_their_epsilon_and_delta():
    import dataclasses

    from leaderboard.plot import panel_figure
    from suite.fronts import build_panels

    rows = [r for r in make_rows({t: "h" * 64 for t in TASKS})
            if r.task == "squad" and r.profile == "a100_sxm_80gb" and r.batch_size == 1
            and r.mode == "replay" and r.measure in ("static_layer", "softmax_margin")]
    chosen = next(r for r in rows if r.measure == "softmax_margin")
    label = "softmax_margin [calibrated consistency_01 eps=0.1 delta=0.1]"
    rows.append(dataclasses.replace(chosen, measure=label, extra={"calibration": {
        "risk": "consistency_01", "epsilon": 0.1, "delta": 0.1, "test_risk": 0.05}}))
    panel = build_panels(rows)[0].panels[1]
    figure = panel_figure(panel, {"softmax_margin": 0, label: 1})
    marked = [m for m in figure.markers if "calibrated" in m.css.split()]
    assert len(marked) == 1 and marked[0].measure == label
    assert "consistency_01 <= 0.1 with probability >= 1 - 0.1" in marked[0].title
    assert not any("calibrated" in m.css.split() for m in figure.markers if m is not marked[0])


def test_a_scheduled_series_is_described_by_its_registry_measure():
    import dataclasses

    from leaderboard.describe import describe_measure

    row = next(r for r in make_rows({t: "h" * 64 for t in TASKS}) if r.measure == "softmax_margin")
    decayed = dataclasses.replace(row, measure="softmax_margin (decay tau=4)",
                                  extra={"measure_name": "softmax_margin",
                                         "schedule": {"kind": "calm_decay", "tau": 4.0}})
    info = describe_measure(decayed.measure, [decayed], {}, None)
    assert info.registered and info.description.startswith("softmax top-1 minus top-2")
    assert describe_measure("no_such (decay tau=4)", [], {}, None).problem
