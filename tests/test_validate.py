"""Measure validation: built-ins and the template pass; faulty measures are rejected with the
reason, and the report never crashes."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from measure_fixtures import BUILTIN_MEASURES

from suite.cli import main
from suite.errors import ExitbenchError
from suite.measures import CheckCost, Measure
from suite.validate import (
    FAIL,
    PASS,
    SKIP,
    load_measure,
    synthetic_traces,
    validate_measure,
    validate_spec,
)

TEMPLATE = Path(__file__).resolve().parent.parent / "docs" / "template_measure.py"
FREE = CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)
PAID = CheckCost(flops=10.0, bytes=40.0, needs_lm_head=True)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # the networks here are tiny: thread start-up and spinning cost more than they save,
    # most of all on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Top1(Measure):
    """A correct measure; the faulty ones below each break one rule."""

    name = "top1_for_tests"
    description = "top-1 probability"
    reads = frozenset({"top1_prob"})

    def scores(self, traces):
        return traces.top1_prob.astype(np.float64)

    def check_cost(self, dims):
        return PAID


class ReadsNextLayer(Top1):
    def scores(self, traces):
        top1 = traces.top1_prob.astype(np.float64)
        return np.concatenate([top1[:, 1:], top1[:, -1:]], axis=1)


class ReadsFinalToken(Top1):
    reads = frozenset({"top1_id", "final_id"})

    def scores(self, traces):
        return (traces.top1_id == traces.final_id[:, None]).astype(np.float64)


class ReadsFinalProb(Top1):
    reads = frozenset({"final_prob"})

    def scores(self, traces):
        return traces.final_prob.astype(np.float64)


class ReadsCosLast(Top1):
    reads = frozenset({"cos_last"})

    def scores(self, traces):
        return traces.cos_last.astype(np.float64)


class ReadsNextToken(Top1):
    def scores(self, traces):
        top1 = traces.top1_prob.astype(np.float64)
        return np.concatenate([top1[1:], top1[-1:]], axis=0)


class Raises(Top1):
    def scores(self, traces):
        raise RuntimeError("boom")


class ReturnsNan(Top1):
    def scores(self, traces):
        scores = traces.top1_prob.astype(np.float64)
        scores[0, 2] = np.nan
        return scores


class ReturnsPlusInf(Top1):
    def scores(self, traces):
        return np.full(traces.top1_prob.shape, np.inf)


class WrongShape(Top1):
    def scores(self, traces):
        return traces.top1_prob.T.astype(np.float64)


class ReturnsList(Top1):
    def scores(self, traces):
        return traces.top1_prob.tolist()


class UndeclaredRead(Top1):
    def scores(self, traces):
        return traces.top1_prob.astype(np.float64) * traces.cos_prev


class UndeclaredHidden(Top1):
    def scores(self, traces):
        return np.linalg.norm(traces.hidden, axis=-1)


class UnknownField(Top1):
    reads = frozenset({"top1_probs"})


class Random(Top1):
    def scores(self, traces):
        return np.random.default_rng().random(traces.top1_prob.shape)


class Mutates(Top1):
    def scores(self, traces):
        traces.top1_prob[:, 0] = 0.0
        return traces.top1_prob.astype(np.float64)


class NegativeCost(Top1):
    def check_cost(self, dims):
        return CheckCost(flops=-1.0, bytes=0.0, needs_lm_head=False)


class CostAsDict(Top1):
    def check_cost(self, dims):
        return {"flops": 1.0}


class UnpricedExits(Top1):
    def checked_layers(self, num_layers):
        return np.zeros(num_layers, dtype=bool)


class FreeUncheckedExits(UnpricedExits):
    def check_cost(self, dims):
        return FREE


class FitRaises(Top1):
    needs_fit = True

    def fit(self, traces, epochs=1):
        raise ValueError("cannot learn")


class UnseededFit(Top1):
    needs_fit = True

    def fit(self, traces, **options):
        self.weight = np.random.default_rng().random()

    def scores(self, traces):
        return traces.top1_prob.astype(np.float64) * self.weight


class NotAMeasure:
    name = "plain"


def statuses(report):
    return {result.check: result.status for result in report.checks}


def message(report, check):
    return next(r.message for r in report.checks if r.check == check)


@pytest.mark.parametrize("name", BUILTIN_MEASURES)
def test_builtin_measures_pass(name):
    report = validate_spec(name)
    assert report.passed, report.format()
    assert report.source == "builtin"
    expected_skips = ({"causality", "causality-tokens"} if name == "oracle" else set()) \
        | ({"fit"} if not name.startswith("classifier") else set())
    assert {c for c, s in statuses(report).items() if s == SKIP} == expected_skips


def test_a_correct_measure_passes_every_check():
    report = validate_measure(Top1)
    assert report.passed and set(statuses(report).values()) == {PASS, SKIP}


@pytest.mark.parametrize("cls,check,reason", [
    (ReadsNextLayer, "causality", "peeks ahead"),
    (ReadsFinalToken, "causality", "final_id"),
    (ReadsFinalProb, "causality", "final_prob"),
    (ReadsCosLast, "causality", "cos_last"),
    (ReadsNextToken, "causality-tokens", "later tokens"),
    (Raises, "shape", "RuntimeError: boom"),
    (ReturnsNan, "finite", "NaN (first at token 0, layer 2)"),
    (ReturnsPlusInf, "finite", "+inf"),
    (WrongShape, "shape", "expected [tokens, layers] = (48, 6)"),
    (ReturnsList, "shape", "returned list"),
    (UndeclaredRead, "declared-reads", "scores change with cos_prev"),
    (UndeclaredHidden, "declared-reads", "hidden absent"),
    (UnknownField, "api", "did you mean 'top1_prob'"),
    (Random, "determinism", "two scores() calls"),
    (Mutates, "read-only", "top1_prob"),
    (NegativeCost, "cost", "flops=-1.0"),
    (CostAsDict, "cost", "returned dict"),
    (UnpricedExits, "cost", "unpriced"),
    (FitRaises, "fit", "ValueError: cannot learn"),
    (UnseededFit, "determinism", "seed every random choice"),
    (NotAMeasure, "api", "not a subclass"),
])
def test_faulty_measure_is_rejected_with_the_reason(cls, check, reason):
    report = validate_measure(cls)
    assert not report.passed
    assert statuses(report)[check] == FAIL, report.format()
    assert reason in message(report, check)
    assert "FAIL" in report.format()
    json.dumps(report.to_dict())


def test_blocked_checks_are_skipped_with_the_cause():
    report = validate_measure(WrongShape)
    assert statuses(report)["finite"] == SKIP
    assert "wrong shape" in message(report, "finite") or "see shape" in message(report, "finite")
    fit_failed = validate_measure(FitRaises)
    assert statuses(fit_failed)["causality"] == SKIP
    assert "fit failed" in message(fit_failed, "causality")


def test_free_checks_may_exit_unchecked():
    assert validate_measure(FreeUncheckedExits).passed


def test_bad_options_fail_the_api_check():
    report = validate_spec("classifier_single", {"head": "conv"})
    assert statuses(report)["api"] == FAIL and "head='conv'" in message(report, "api")
    assert report.options == {"head": "conv"}


def test_report_is_json_serialisable_and_marks_the_oracle():
    data = json.loads(json.dumps(validate_spec("oracle").to_dict()))
    assert data["passed"] is True and data["deployable"] is False
    assert {c["check"]: c["status"] for c in data["checks"]}["causality"] == SKIP


def test_synthetic_traces_are_valid_and_seeded():
    traces = synthetic_traces(seed=3)
    traces.validate()
    assert traces.hidden.shape == (48, 6, 16)
    assert np.all(traces.top2_prob <= traces.top1_prob)
    assert np.array_equal(traces.top1_id[:, -1], traces.final_id)
    assert np.array_equal(synthetic_traces(seed=3).hidden, traces.hidden)


def test_template_measure_validates_by_path():
    report = validate_spec(str(TEMPLATE), {"window": 3})
    assert report.passed, report.format()
    assert report.measure == "smoothed_top1"


def write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_load_measure_from_files(tmp_path):
    header = "from suite.measures import Measure, CheckCost\nimport numpy as np\n"
    one = write(tmp_path, "one.py", header + textwrap.dedent("""
        class Mine(Measure):
            name = "mine"
            description = "d"
            reads = frozenset({"top1_prob"})
            def scores(self, traces):
                return traces.top1_prob.astype(float)
            def check_cost(self, dims):
                return CheckCost(0.0, 0.0, False)
        """))
    assert load_measure(str(one)).measure_cls.name == "mine"
    with pytest.raises(ExitbenchError, match="does not exist"):
        load_measure(str(tmp_path / "missing.py"))
    with pytest.raises(ExitbenchError, match="defines no Measure subclass"):
        load_measure(str(write(tmp_path, "none.py", "x = 1\n")))
    with pytest.raises(ExitbenchError, match="ZeroDivisionError"):
        load_measure(str(write(tmp_path, "broken.py", "1 / 0\n")))
    two = one.read_text() + "\nclass Other(Mine):\n    name = 'other'\n"
    with pytest.raises(ExitbenchError, match="several Measure subclasses"):
        load_measure(str(write(tmp_path, "two.py", two)))
    with pytest.raises(ExitbenchError, match="did you mean|Valid measures"):
        load_measure("softmax_marign")


def test_cli_exit_codes_and_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["validate-measure", "softmax_margin", str(TEMPLATE), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["passed"] and [r["measure"] for r in data["reports"]] == \
        ["softmax_margin", "smoothed_top1"]
    peeking = write(tmp_path, "peek.py", """
        import numpy as np
        from suite.measures import Measure, CheckCost

        class Peek(Measure):
            name = "peek"
            description = "reads the next layer"
            reads = frozenset({"top1_prob"})
            def scores(self, traces):
                top1 = traces.top1_prob.astype(float)
                return np.concatenate([top1[:, 1:], top1[:, -1:]], axis=1)
            def check_cost(self, dims):
                return CheckCost(1.0, 4.0, True)
        """)
    assert main(["validate-measure", str(peeking)]) == 1
    printed = capsys.readouterr().out
    assert "FAIL  causality" in printed and "peeks ahead" in printed
    assert main(["validate-measure", "no_such_measure"]) == 2
    assert main(["validate-measure", "free_shallow_deep", "-o", "shallow_layer=2"]) == 0
    assert main(["validate-measure", "free_shallow_deep", "-o", "shallow_layer"]) == 2


def test_docs_show_the_template_verbatim():
    doc = (TEMPLATE.parent / "measures.md").read_text()
    assert "```python\n" + TEMPLATE.read_text() + "```" in doc
