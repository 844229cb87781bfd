"""CALM's calibration by Learn-then-Test: p-values by hand, the threshold fixed-sequence
testing must pick on constructed risk curves, validity over random splits, per-example losses,
and `exitbench calibrate` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from measure_fixtures import make_traces
from scipy import stats

from suite.calibration import (
    binomial_p_values,
    example_losses,
    fixed_sequence,
    hoeffding_bentkus_p_values,
    learn_then_test,
    split_validity,
)
from suite.errors import ExitbenchError


def test_binomial_p_value_is_the_lower_tail():
    # 3 losses in 100 examples against epsilon 0.1: P(Bin(100, 0.1) <= 3)
    expected = sum(math.comb(100, i) * 0.1 ** i * 0.9 ** (100 - i) for i in range(4))
    assert binomial_p_values(np.array([3]), 100, 0.1)[0] == pytest.approx(expected, rel=1e-9)


def test_hoeffding_bentkus_by_hand():
    n, eps = 100, 0.1
    # zero empirical risk: Hoeffding exp(-n log(1/(1-eps))) = 0.9^100 < e * P(Bin <= 0)
    assert hoeffding_bentkus_p_values(np.array([0.0]), n, eps)[0] == pytest.approx(0.9 ** n)
    # risk 0.05: h(0.05, 0.1) by hand; Bentkus e * P(Bin(100, 0.1) <= 5)
    a = 0.05
    h = a * math.log(a / eps) + (1 - a) * math.log((1 - a) / (1 - eps))
    expected = min(math.exp(-n * h), math.e * stats.binom.cdf(5, n, eps))
    assert hoeffding_bentkus_p_values(np.array([a]), n, eps)[0] == pytest.approx(expected)
    # at or above epsilon nothing is rejected
    assert hoeffding_bentkus_p_values(np.array([0.1, 0.3]), n, eps).min() >= 0.99 or \
        (hoeffding_bentkus_p_values(np.array([0.1, 0.3]), n, eps) > 0.1).all()


def constructed_losses(risks, n=200, seed=0):
    """0/1 losses whose empirical risk at each threshold is exactly ``risks``."""
    rng = np.random.default_rng(seed)
    losses = np.zeros((len(risks), n))
    for k, risk in enumerate(risks):
        losses[k, rng.choice(n, int(round(risk * n)), replace=False)] = 1
    return losses


def test_fixed_sequence_picks_the_last_threshold_before_the_first_failure():
    thresholds = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # risk curve: rises, fails at 0.6 (risk 0.12 > eps), a later threshold is low again
    risks = [0.0, 0.02, 0.04, 0.06, 0.12, 0.01, 0.2]
    losses = constructed_losses(risks)
    eps, delta = 0.1, 0.1
    by_hand = [stats.binom.cdf(round(r * 200), 200, eps) for r in risks]
    must = next(i for i, p in enumerate(by_hand) if p > delta)  # first not rejected
    result = learn_then_test(losses, thresholds, eps, delta, binary=True)
    assert result.num_rejected == must and result.chosen == thresholds[must - 1]
    np.testing.assert_allclose(result.p_values, by_hand)
    # 0.5 (risk 0.01) is not chosen: fixed-sequence testing stops at the first failure
    assert result.chosen != 0.5
    # the order of the candidates given does not matter: tested from the highest down
    shuffled = [4, 0, 6, 2, 1, 5, 3]
    again = learn_then_test(losses[shuffled], [thresholds[i] for i in shuffled], eps, delta,
                            binary=True)
    assert again.chosen == result.chosen and again.p_values == result.p_values


def test_nothing_certified_when_the_safest_threshold_fails():
    losses = constructed_losses([0.3, 0.4])
    result = learn_then_test(losses, [1.0, 0.5], 0.1, 0.1, binary=True)
    assert not result.certified and result.chosen is None
    with pytest.raises(ExitbenchError, match="epsilon"):
        learn_then_test(losses, [1.0, 0.5], 0.0, 0.1, binary=True)
    assert fixed_sequence(np.array([[0.01, 0.02], [0.5, 0.01]]), 0.05).tolist() == [2, 0]


def test_bounded_losses_use_hoeffding_bentkus():
    losses = np.array([[0.0] * 50, [0.02] * 50, [0.5] * 50])
    result = learn_then_test(losses, [0.9, 0.5, 0.1], 0.1, 0.1, binary=False)
    np.testing.assert_allclose(result.p_values,
                               hoeffding_bentkus_p_values(np.array([0.0, 0.02, 0.5]), 50, 0.1))
    assert result.chosen == 0.5


def test_guarantee_holds_for_calibration_sets_drawn_from_a_population():
    """i.i.d. calibration sets from a known population whose risk rises with
    aggressiveness: the population risk at the chosen threshold exceeds epsilon in at most
    delta of 1000 draws."""
    rng = np.random.default_rng(3)
    eps, delta, n = 0.1, 0.1, 200
    true_risk = np.linspace(0.0, 0.3, 31)  # threshold k has risk true_risk[k]
    thresholds = np.linspace(1.0, 0.0, 31)
    violations = 0
    for _ in range(1000):
        u = rng.random(n)  # nested: inconsistent at one threshold, so at every lower one
        result = learn_then_test((u[None, :] < true_risk[:, None]).astype(float), thresholds,
                                 eps, delta, binary=True)
        violations += result.certified and true_risk[result.num_rejected - 1] > eps
    assert violations / 1000 <= delta


def test_validity_over_random_splits_of_a_pool():
    rng = np.random.default_rng(4)
    eps, delta = 0.1, 0.1
    true_risk = np.linspace(0.0, 0.3, 31)
    u = rng.random(400)
    losses = (u[None, :] < true_risk[:, None]).astype(float)
    validity = split_validity(losses, np.linspace(1.0, 0.0, 31), eps, delta, binary=True,
                              num_splits=2000, seed=0)
    assert validity.certified_share > 0.9 and validity.mean_test_risk <= eps
    assert validity.pool_exceed_share <= delta  # the guarantee's quantity
    assert validity.exceed_share <= 2 * delta  # complementary halves: a little above delta


def test_example_losses_compare_with_the_full_output():
    # two examples; example 0 has tokens [5, 6, 1(EOS)], example 1 [7, 1]
    traces = make_traces(np.zeros((5, 2)), top1_id=np.zeros((5, 2)), final_id=[5, 6, 1, 7, 1],
                         example_id=["a", "a", "a", "b", "b"], position=[0, 1, 2, 0, 1])
    replayed = np.array([[5, 6, 1, 7, 1],  # same as full depth
                         [5, 9, 1, 7, 1],  # example a differs
                         [5, 6, 1, 1, 9]])  # example b ends early (EOS first)
    words = {5: "black", 6: "cat", 7: "dog", 9: "hat"}

    def detokenize(sequences):
        return [" ".join(words[i] for i in ids) for ids in sequences]

    refs = [["black cat"], ["dog"]]
    zero_one = example_losses("consistency_01", traces, replayed, detokenize, refs, "squad", 1)
    np.testing.assert_array_equal(zero_one, [[0, 0], [1, 0], [0, 1]])
    rouge = example_losses("consistency_rougeL", traces, replayed, detokenize, refs, "squad", 1)
    assert rouge[1, 0] == pytest.approx(0.5)  # "black hat" vs "black cat": LCS 1 of 2
    assert rouge[2, 1] == pytest.approx(1.0) and rouge[0].sum() == 0
    task = example_losses("task_loss", traces, replayed, detokenize, refs, "squad", 1)
    assert task[1, 0] == pytest.approx(0.5)  # F1 1 -> 0.5 against "black cat"
    assert task[2, 1] == pytest.approx(1.0)
    with pytest.raises(ExitbenchError, match="unknown risk"):
        example_losses("bleu", traces, replayed, detokenize, refs, "squad", 1)


@pytest.fixture(scope="module")
def ray_once():
    """Ray started once for this module (the commands reuse a running instance)."""
    import ray

    from suite.runner import init_ray

    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def test_calibrate_command_end_to_end(ray_once, random_backbone, samples_dir, tmp_path, capsys):
    import yaml

    from suite.cli import main
    from suite.results import read_results

    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    measures = ["softmax_margin", {"name": "softmax_margin",
                                   "schedule": {"kind": "calm_decay", "tau": 4}}]
    config.write_text(yaml.safe_dump({
        "name": "calibration-test", "output_dir": str(out), "data_dir": str(samples_dir),
        "models": [{"name": "random", "path": str(random_backbone), "label": "random weights"}],
        "tasks": [{"name": "squad", "split": "validation[:12]", "max_new_tokens": 6,
                   "calibration_split": "validation[12:40]"}],
        "measures": measures, "profiles": ["generic_cpu"], "batch_sizes": [1],
        "calibration": {"targets": [
            {"measure": "softmax_margin", "risk": "consistency_01", "epsilon": 0.5,
             "delta": 0.2},
            {"measure": "softmax_margin (decay tau=4)", "risk": "consistency_rougeL",
             "epsilon": 0.4, "delta": 0.2}], "validity_splits": 50, "num_thresholds": 11},
        "leaderboard": False}))
    assert main(["calibrate", "--config", str(config), "--no-progress",
                 "--no-leaderboard"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: 2 calibrated, 0 reused, 0 failed" in printed
    report = json.loads((out / "calibration" / "calibration.json").read_text())
    assert len(report["outcomes"]) == 2
    for outcome in report["outcomes"]:
        assert outcome["calibration_split"] == "validation[12:40]"
        assert outcome["validity"]["num_splits"] == 50
        if outcome["certified"]:
            assert outcome["calibration_risk"] <= outcome["epsilon"]
    assert (out / "traces" / "squad" / "random" / "calibration" / "generated" /
            "manifest.json").is_file()
    rows = read_results(out / "results")
    calibrated = [r for r in rows if "calibration" in r.extra]
    certified = [o for o in report["outcomes"] if o["certified"]]
    assert len(calibrated) == len(certified)
    for row in calibrated:
        assert "[calibrated" in row.measure and row.extra["calibration"]["epsilon"] in (0.5, 0.4)
    assert "| squad | random | softmax_margin" in (out / "calibration" /
                                                   "calibration.md").read_text()
    # a rerun reuses both parts
    assert main(["calibrate", "--config", str(config), "--no-progress",
                 "--no-leaderboard"]) == 0
    assert "0 calibrated, 2 reused" in capsys.readouterr().out


def test_calibration_config_errors_name_the_measure(tmp_path):
    from suite.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="calibration.targets\\[0\\].measure"):
        parse_config({"tasks": [{"name": "squad", "calibration_split": "validation[:5]"}],
                      "measures": ["softmax_margin"],
                      "calibration": {"targets": [{"measure": "softmax_marg",
                                                   "epsilon": 0.1}]}})
    with pytest.raises(ConfigError, match="calibration_split"):
        parse_config({"tasks": [{"name": "squad"}], "measures": ["softmax_margin"],
                      "calibration": {"targets": [{"measure": "softmax_margin",
                                                   "epsilon": 0.1}]}})
