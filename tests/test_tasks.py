"""Task loading from local JSON Lines in the hub layout, and its error messages."""

import json

import pytest

from suite.errors import DataError
from suite.tasks import TASKS, get_task, load_examples


def test_the_builtin_tasks_are_registered():
    assert TASKS.names() == ["big_patent", "cnn_dailymail", "iwslt2017_de_en", "multi_news",
                             "samsum", "squad", "wmt15_en_fr", "xsum"]


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# one record per task in its hub dataset's column layout
ORIGINALS_TASKS = {
    "iwslt2017_de_en": ({"translation": {"de": "Vielen Dank für diesen wunderbaren Vortrag.",
                                         "en": "Thank you very much for this wonderful talk."}},
                        "translate German to English: Vielen Dank für diesen wunderbaren Vortrag.",
                        "Thank you very much for this wonderful talk.", None),
    "samsum": ({"id": "13818513", "dialogue": "Amanda: I baked cookies.\nJerry: Sure!",
                "summary": "Amanda baked cookies."},
               "summarize: Amanda: I baked cookies.\nJerry: Sure!", "Amanda baked cookies.",
               "13818513"),
    "multi_news": ({"document": "Article one. ||||| Article two.",
                    "summary": "– Two articles, one summary."},
                   "summarize: Article one. ||||| Article two.", "– Two articles, one summary.",
                   None),
    "xsum": ({"id": "38264402", "document": "The full cost of damage ...",
              "summary": "Clean-up operations are continuing."},
             "summarize: The full cost of damage ...", "Clean-up operations are continuing.",
             "38264402"),
}


@pytest.mark.parametrize("name", sorted(ORIGINALS_TASKS))
def test_originals_tasks_load_from_local_files_in_the_hub_layout(tmp_path, name):
    from suite.metrics import get_metric

    record, source, target, example_id = ORIGINALS_TASKS[name]
    _write_jsonl(tmp_path / name / "validation.jsonl", [record, record])
    task = get_task(name)
    examples = load_examples(task, "validation[:1]", tmp_path)
    assert len(examples) == 1
    assert examples[0].source == source and examples[0].target == target
    assert examples[0].references == (target,)
    assert examples[0].id == (example_id if example_id is not None else examples[0].id)
    # the reference scores perfectly with the task's metric
    result = get_metric(task.metric)([target], [list(examples[0].references)])
    assert result.scores[result.primary] == pytest.approx(100.0)


def test_originals_tasks_use_the_originals_limits():
    assert get_task("iwslt2017_de_en").limits.max_source_tokens == 1024
    assert get_task("multi_news").limits.max_new_tokens == 512
    assert get_task("samsum").limits.max_source_tokens == 512
    assert get_task("iwslt2017_de_en").hub_config == "iwslt2017-de-en"


def test_squad_sample_formats_like_the_studies(samples_dir):
    examples = load_examples(get_task("squad"), "validation", samples_dir)
    assert len(examples) == 964
    first = examples[0]
    assert first.id == "56be4db0acb8001400a502ec"
    assert first.source.startswith("question: Which NFL team represented the AFC at Super Bowl 50? "
                                   "context: Super Bowl 50 was")
    assert first.target == "Denver Broncos"
    assert first.references == ("Denver Broncos",) * 3
    limits = get_task("squad").limits
    assert (limits.max_new_tokens, limits.max_source_tokens) == (30, 512)


def test_wmt_and_cnn_samples(samples_dir):
    wmt = load_examples(get_task("wmt15_en_fr"), "validation", samples_dir, limit=5)
    assert wmt[0].source == "translate English to French: Spectacular Wingsuit Jump Over Bogota"
    assert wmt[0].references == ('Spectaculaire saut en "wingsuit" au-dessus de Bogota',)
    cnn = load_examples(get_task("cnn_dailymail"), "validation", samples_dir)
    assert len(cnn) == 400
    assert cnn[0].source.startswith("summarize: (CNN)Share, and your gift")
    assert "\n" in cnn[0].target and cnn[0].references == (cnn[0].target,)
    assert get_task("cnn_dailymail").limits.max_new_tokens == 128


def test_split_slices_keep_train_and_evaluation_apart(samples_dir):
    task = get_task("squad")
    head = load_examples(task, "validation[:200]", samples_dir)
    tail = load_examples(task, "validation[200:]", samples_dir)
    assert len(head) == 200 and len(tail) == 764
    assert not {e.id for e in head} & {e.id for e in tail}


def test_big_patent_layout(tmp_path):
    folder = tmp_path / "big_patent"
    folder.mkdir()
    rows = [{"description": "A widget comprising a lever.", "abstract": "A widget."},
            {"description": "A method of folding paper.", "abstract": "Folding paper."}]
    (folder / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = load_examples(get_task("big_patent"), "validation", tmp_path)
    assert [e.id for e in examples] == ["0", "1"]  # BigPatent has no id field: row index
    assert examples[0].source == "summarize: A widget comprising a lever."
    assert examples[1].references == ("Folding paper.",)


def test_missing_file_names_task_and_paths(tmp_path):
    with pytest.raises(DataError) as err:
        load_examples(get_task("cnn_dailymail"), "validation", tmp_path)
    message = str(err.value)
    assert "cnn_dailymail" in message and str(tmp_path) in message
    assert "cnn_dailymail_sample.jsonl" in message and "validation.jsonl" in message


def test_missing_field_names_task_path_and_field(tmp_path):
    (tmp_path / "squad").mkdir()
    path = tmp_path / "squad" / "validation.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "Why?", "answers": {"text": ["x"]}}) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(get_task("squad"), "validation", tmp_path)
    message = str(err.value)
    assert "squad" in message and str(path) in message and "context" in message


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "validation.jsonl").write_text("")
    with pytest.raises(DataError, match="squad"):
        load_examples(get_task("squad"), "validation", tmp_path)


def test_record_without_gold_answer_is_named(tmp_path):
    (tmp_path / "squad").mkdir()
    row = {"id": "q9", "question": "Q", "context": "C", "answers": {"text": []}}
    (tmp_path / "squad" / "validation.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"validation.jsonl line 1: field .answers\[text\]\[0\]. is missing"):
        load_examples(get_task("squad"), "validation", tmp_path)


def test_data_dir_from_environment(samples_dir, monkeypatch):
    monkeypatch.setenv("EXITBENCH_DATA_DIR", str(samples_dir))
    assert len(load_examples(get_task("wmt15_en_fr"), "validation[:3]")) == 3


def test_limits_are_overridable():
    task = get_task("squad").with_limits(max_new_tokens=12, max_source_tokens=None)
    assert task.limits.max_new_tokens == 12 and task.limits.max_source_tokens == 512
