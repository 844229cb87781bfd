"""The command line, run in-process through suite.cli.main."""

import json
import re

from suite.cli import main


def test_ls_tasks_lists_the_four_tasks(capsys):
    assert main(["ls", "tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("squad", "wmt15_en_fr", "cnn_dailymail", "big_patent"):
        assert name in out


def test_score_gold_answers_gives_100(samples_dir, tmp_path, capsys):
    predictions = tmp_path / "gold.jsonl"
    with open(samples_dir / "squad_v1.1_dev_sample.jsonl", encoding="utf-8") as src, \
            open(predictions, "w", encoding="utf-8") as out:
        for line in src:
            record = json.loads(line)
            out.write(json.dumps({"id": record["id"],
                                  "prediction": record["answers"]["text"][0]}) + "\n")
    code = main(["score", "--task", "squad", "--predictions", str(predictions),
                 "--data-dir", str(samples_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"exact_match\s+100\.00", out) and re.search(r"f1\s+100\.00", out)


def test_score_reports_missing_ids_as_empty_answers(samples_dir, tmp_path, capsys):
    predictions = tmp_path / "partial.jsonl"
    predictions.write_text(json.dumps({"id": "56be4db0acb8001400a502ec",
                                       "prediction": "Denver Broncos"}) + "\n")
    code = main(["score", "--task", "squad", "--split", "validation[:4]",
                 "--predictions", str(predictions), "--data-dir", str(samples_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"exact_match\s+25\.00", out)
    assert "3 example(s) had no prediction" in out


def test_unknown_task_is_a_clean_error(capsys, tmp_path):
    code = main(["score", "--task", "sqad", "--predictions", str(tmp_path / "x.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown task 'sqad'" in err and "'squad'" in err
    assert "Traceback" not in err
