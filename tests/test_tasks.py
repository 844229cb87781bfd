"""Task loading from local JSON Lines in the hub layout, and its error messages."""

import json

import pytest

from suite.errors import DataError
from suite.tasks import TASKS, get_task, load_examples


def test_the_four_tasks_are_registered():
    assert TASKS.names() == ["big_patent", "cnn_dailymail", "squad", "wmt15_en_fr"]


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
