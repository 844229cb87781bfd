"""The researcher's path end to end, through the CLI over a real run (the real runner,
recorder and validator on a random-weight backbone): `exitbench submit` works on a simulated
and on a measured profile (a measure the profile has no timings for is priced from its
declared cost and marked as estimated), submissions persist and never evict each other,
failures on the real traces are named and confined to their measure, labels never make
file names outside the run, and the site tells the truth about all of it.

The tests of this module share one run directory and build on each other, in file order,
as a researcher's session would."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import submitted_measures as sm
from run_fixtures import results, rows_by_measure, write_config

from suite.cli import main
from suite.sandbox import SandboxSettings, sandbox_problem

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sandbox_problem(SandboxSettings()) is not None,
                                 reason="bubblewrap is missing: scripts/setup.sh installs it")]


@pytest.fixture(scope="module")
def ray_once():
    import ray

    from suite.runner import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def session(tmp_path_factory, random_backbone, samples_dir, ray_once):
    """(root, config path, run directory) after `exitbench profile` measured the backbone
    and `exitbench run` recorded and replayed the config's two built-in measures."""
    root = tmp_path_factory.mktemp("researcher")
    profile = root / "hw" / "tiny_measured.yaml"
    assert main(["profile", "--model", str(random_backbone), "--measures", "softmax_margin",
                 "--out", str(profile), "--repeats", "2", "--warmup", "1", "--batch-sizes",
                 "1,4", "--contexts", "2,8", "--source-len", "64"]) == 0
    config = write_config(root, random_backbone, samples_dir,
                          profiles=["a100_sxm_80gb", "../hw/tiny_measured.yaml"])
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    return root, config, root / "run"


def submit(root: Path, config: Path, source: str, file_name: str, capsys, *extra: str
           ) -> tuple[int, str]:
    path = root / "researcher" / file_name
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    code = main(["submit", str(path), "--config", str(config), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_submit_adds_rows_on_simulated_and_measured_profiles(session, capsys):
    root, config, run = session
    code, out = submit(root, config, sm.GOOD, "squared_top1.py", capsys)
    assert code == 0, out
    assert re.search(r"'squared_top1': \d+ result rows", out)
    rows = rows_by_measure(run)
    assert {"squared_top1", "softmax_margin", "static_layer"} <= set(rows)
    profiles = {r["profile"] for r in rows["squared_top1"]}
    assert profiles == {"a100_sxm_80gb", "tiny_measured"}
    estimated = {r["profile"] for r in rows["squared_top1"] if r["extra"].get("cost_estimated")}
    assert estimated == {"tiny_measured"}  # no timings there: priced from its declared cost
    assert not any(r["extra"].get("cost_estimated") for r in rows["softmax_margin"])
    stored = run / "submissions" / "squared_top1"
    record = json.loads((stored / "submission.json").read_text())
    assert record["name"] == "squared_top1" and (stored / "measure.py").read_text() == sm.GOOD
    page = (run / "site" / "measures" / "squared_top1.html").read_text()
    assert "top-1 probability squared" in page and "Submitted" in page
    assert "Check cost estimated on tiny_measured" in page


def test_the_site_shows_the_validators_checks_as_passed(session):
    _, _, run = session
    page = (run / "site" / "measures" / "squared_top1.html").read_text()
    cells = re.findall(r'<td class="(passed|failed|skipped)">(pass|FAIL|skipped)</td>', page)
    assert len(cells) == 11 and ("failed", "FAIL") not in cells, cells
    assert "Passed (validation/squared_top1.json)" in page


def test_a_second_submission_keeps_the_first_and_a_plain_run_keeps_both(session, capsys):
    root, config, run = session
    code, out = submit(root, config, sm.SECOND, "cubed_top1.py", capsys)
    assert code == 0, out
    assert {"squared_top1", "cubed_top1"} <= set(rows_by_measure(run))
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"replay\s+done\s+0\s+skipped\s+4", out), out  # 2 built-in + 2 stored
    assert {"squared_top1", "cubed_top1"} <= set(rows_by_measure(run))
    # a leaderboard built from the results alone describes both (never imports their code)
    assert main(["leaderboard", "build", "--results", str(run), "--out",
                 str(root / "site2")]) == 0
    capsys.readouterr()
    for name, text in (("squared_top1", "squared"), ("cubed_top1", "cubed")):
        page = (root / "site2" / "measures" / f"{name}.html").read_text()
        assert f"top-1 probability {text}" in page and "not installed here" not in page


def test_resubmitting_other_code_under_a_stored_name_needs_replace(session, capsys):
    root, config, run = session
    changed = sm.GOOD.replace("scores ** 2", "scores ** 2 * 0.5")
    code, out = submit(root, config, changed, "squared_top1.py", capsys)
    assert code == 2 and "already holds a submission named 'squared_top1'" in out, out
    assert (run / "submissions" / "squared_top1" / "measure.py").read_text() == sm.GOOD
    code, out = submit(root, config, changed, "squared_top1.py", capsys, "--replace")
    assert code == 0 and "replaced" in out, out


@pytest.mark.parametrize("source, name, reason", [
    (sm.RAISES_ON_REAL, "raises_on_real", r"scores\(\) raised ValueError: boom on real traces"),
    (sm.NAN_ON_REAL, "nan_on_real", r"1 of \d+ scores on the real traces are NaN or \+inf "
                                    r"\(first: example '[^']+', position 0, layer 0\)"),
    (sm.SHAPE_ON_REAL, "shape_on_real", r"scores\(\) returned shape \[\d+, 2\] on the real "
                                        r"traces; expected \[tokens, layers\] = \[\d+, 3\]"),
])
def test_a_measure_failing_only_on_real_traces_is_named_and_confined(session, capsys, source,
                                                                     name, reason):
    root, config, run = session
    before = {m: len(r) for m, r in rows_by_measure(run).items()}
    code, out = submit(root, config, source, f"{name}.py", capsys)
    assert code == 1, out
    assert "PASSED" in out  # it passed validation on the synthetic traces ...
    assert re.search(rf"submission '{name}' produced no result rows: squad/tiny-random: "
                     rf"measure '{name}': {reason}", out), out  # ... and failed on the real ones
    assert "Traceback" not in out
    after = rows_by_measure(run)
    assert name not in after
    assert {m: len(r) for m, r in after.items()} == before  # the others are all still there
    recorded = results(run)["metadata"]["measures"][name]
    assert recorded["status"] == "failed" and re.search(reason, recorded["failures"][0]["reason"])
    index = (run / "site" / "index.html").read_text()
    assert f">{name}</a></td><td class=\"failed\">failed</td>" in index


def test_a_rerun_does_not_retry_stored_failures(session, capsys):
    _, config, _ = session
    assert main(["replay", "--config", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"replay\s+done\s+0\s+skipped\s+\d+\s+failed\s+3", out), out
    assert out.count("failed before (not retried until its inputs change)") == 3


def test_a_hostile_display_name_stays_inside_the_run(session, capsys):
    root, config, run = session
    code, out = submit(root, config, sm.HOSTILE_NAME, "pwned.py", capsys)
    assert code == 0, out
    assert not (root / "pwned.json").exists() and not (run.parent / "pwned.json").exists()
    stems = [p.name for p in (run / "validation").iterdir()]
    assert any(re.fullmatch(r"pwned-[0-9a-f]{10}\.json", s) for s in stems), stems
    assert all(p.resolve().is_relative_to(run.resolve())
               for p in run.rglob("*") if "pwned" in p.name)
    assert "../../pwned" in rows_by_measure(run)
    pages = [p.name for p in (run / "site" / "measures").iterdir()]
    assert any(re.fullmatch(r"pwned-[0-9a-f]{10}\.html", p) for p in pages), pages


def test_the_overview_answers_which_measure_is_best(session):
    _, _, run = session
    page = (run / "site" / "overview.html").read_text()
    assert "Which measure is best?" in page
    for profile in ("a100_sxm_80gb", "tiny_measured"):
        assert f'<button type="button">{profile}</button>' in page
    assert page.count("Best deployable") == 2  # one table per batch size (1 and 4)
    assert "★" in (run / "site" / "static" / "style.css").read_text()
    assert re.search(r'class="num best"', page)
