"""Fronts with samples: intervals of the ranking scores and the paired comparison with the
measure ranked above (constructed rows and per-example scores)."""

import numpy as np

from suite.fronts import build_panels, ranked
from suite.results import ResultRow


def make_rows(measure, speedups, qualities):
    return [ResultRow(task="squad", model="m", model_label="test", measure=measure,
                      measure_options="{}", deployable=True, threshold=float(k), min_layer=0,
                      profile="p", profile_kind="simulated", batch_size=1, mode="replay",
                      metric="f1", quality=float(q), quality_full_depth=50.0,
                      scores={"f1": float(q)}, mean_layers_used=1.0, num_layers=4,
                      token_agreement=1.0, exit_histogram=[0, 0, 0, 1], tokens_per_s=100 * s,
                      full_depth_tokens_per_s=100.0, speedup=float(s), num_examples=200,
                      num_tokens=1000, traces_hash="t", measure_code_hash="c",
                      bootstrap_resamples=300, bootstrap_seed=0, confidence_level=0.95)
            for k, (s, q) in enumerate(zip(speedups, qualities))]


def point(measure, threshold, scores, mode="replay"):
    return (("squad", "m", measure, mode, threshold),
            {"example_ids": [str(i) for i in range(len(scores))], "metric": "squad",
             "stats": np.c_[scores, scores]})


def test_ranking_marks_a_tie_and_keeps_a_clear_difference():
    rng = np.random.default_rng(0)
    full = rng.uniform(0, 100, 200)
    samples = dict([point("", None, full, mode="full_depth")])
    rows = []
    # a and b: full-depth quality up to 1.5x / 1.45x (noisy copies of the same outputs),
    # c: loses quality beyond 1.1x; static_layer: a weak baseline
    for name, best in (("a", 1.5), ("b", 1.45), ("c", 1.1), ("static_layer", 1.0)):
        speedups = np.array([1.0, 1.1, 1.3, 1.45, 1.5, 2.0])
        scores = [full if s <= best else np.clip(full - 30 + rng.normal(0, 5, 200), 0, 100)
                  for s in speedups]
        rows += make_rows(name, speedups, [np.mean(x) for x in scores])
        samples.update(point(name, float(k), x) for k, x in enumerate(scores))
    (group,) = build_panels(rows, samples)
    panel = group.panels[1]
    order = ranked(panel)
    assert [s.measure for s, _ in order] == ["a", "b", "c", "static_layer"]
    a, b, c = (s for s, _ in order[:3])
    assert a.best_speedup_interval.low <= a.best_speedup <= a.best_speedup_interval.high
    assert a.area_interval is not None and np.isfinite(a.area_interval.stderr)
    # a vs b: both keep full quality to their best point; the difference of best speedups is
    # fixed by the grid, never flips under resampling: significant
    assert order[1][1].statistic == "best_speedup_within_1pct"
    # b vs c: b is clearly better
    assert order[2][1].significant
    # identical series tie: p = 1
    twin_rows = make_rows("a2", [r.speedup for r in a.rows], [r.quality for r in a.rows])
    twin_samples = dict(samples)
    twin_samples.update({("squad", "m", "a2", "replay", k[4]): v for k, v in samples.items()
                         if k[2] == "a"})
    (group,) = build_panels(rows + twin_rows, twin_samples)
    order = ranked(group.panels[1])
    names = [s.measure for s, _ in order]
    second = order[names.index("a2")][1]
    assert second.p_value == 1.0 and not second.significant
