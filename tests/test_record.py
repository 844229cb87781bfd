"""The record stage: shards through the trace store, resume, integrity, the CLI, and
hidden states on demand, on a micro T5 trained by ``suite.training`` (a few steps: it
learns little, but it is a real checkpoint folder with its tokenizer)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch

from suite.backbones.t5 import T5Adapter
from suite.cli import main
from suite.config import ModelConfig, TaskConfig
from suite.decoding import pad_batch, traced_greedy_decode
from suite.errors import ExitbenchError
from suite.models import load_tokenizer, tokenizer_sha256, weights_sha256
from suite.record import (
    ShardRequest,
    encode_texts,
    load_hidden_states,
    record_shard,
    record_task,
    trace_dir_for,
)
from suite.tasks import get_task, load_examples
from suite.traces import TraceIntegrityError, TraceStore

NUM_EXAMPLES = 5
TASK = TaskConfig(name="squad", split="validation[100:]", limit=NUM_EXAMPLES,
                  max_source_tokens=48, max_target_tokens=8, max_new_tokens=5)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, samples_dir) -> ModelConfig:
    from suite.tokenizer import TokenizerSettings, task_texts, train_tokenizer
    from suite.training import TrainSettings, train

    root = tmp_path_factory.mktemp("trained")
    texts, _ = task_texts(["squad"], "validation[:60]", samples_dir)
    heldout, _ = task_texts(["squad"], "validation[60:70]", samples_dir)
    train_tokenizer(texts, heldout, root / "tokenizer",
                    TokenizerSettings(vocab_size=400, extra_ids=0, max_unk_rate=1.0))
    train(TrainSettings(objective="calm", preset="micro", split="validation[:60]",
                        max_source_tokens=48, max_target_tokens=8, steps=8, batch_size=8),
          root / "tokenizer", root / "model", data_dir=samples_dir, progress=False)
    return ModelConfig(name="micro", path=str(root / "model"), label="micro T5 trained here")


def _record(model: ModelConfig, trace_dir, samples_dir, kind="generated", **overrides):
    settings = {"data_dir": str(samples_dir), "batch_size": 2, "shard_size": 2,
                "progress": False, **overrides}
    task = settings.pop("task", TASK)
    return record_task(task, model, kind, trace_dir, **settings)


def test_record_round_trip_and_resume(trained_model, samples_dir, tmp_path):
    trace_dir = tmp_path / "generated"
    summary = _record(trained_model, trace_dir, samples_dir)
    assert (summary.shards_written, summary.shards_skipped) == (3, 0)
    assert summary.examples_written == NUM_EXAMPLES
    store = TraceStore(trace_dir)
    traces = store.load()
    assert traces.num_tokens == summary.tokens_written > 0 and traces.num_layers == 3

    # The stored traces are what traced decoding gives for the task's examples.
    examples = load_examples(get_task("squad"), TASK.split, samples_dir, NUM_EXAMPLES)
    assert traces.example_ids() == [e.id for e in examples]
    adapter = T5Adapter.load(trained_model.path)
    tokenizer = load_tokenizer(trained_model.path)
    sources = encode_texts(tokenizer, [e.source for e in examples], 48, adapter.eos_token_id)
    assert max(map(len, sources)) == 48 and all(s[-1] == adapter.eos_token_id for s in sources)
    ids, mask = pad_batch(sources[:2], adapter.pad_token_id)
    direct = traced_greedy_decode(adapter, ids, mask, [e.id for e in examples[:2]], 5)
    first_two = np.isin(traces.example_id, [e.id for e in examples[:2]])
    assert np.array_equal(direct.final_id, traces.final_id[first_two])
    np.testing.assert_array_equal(direct.top1_prob, traces.top1_prob[first_two])
    # the normed cosines are recorded too (trace format 3) and survive the round trip
    np.testing.assert_array_equal(direct.cos_last_normed, traces.cos_last_normed[first_two])
    np.testing.assert_array_equal(direct.cos_prev_normed, traces.cos_prev_normed[first_two])
    assert np.allclose(traces.cos_last_normed[:, -1], 1.0, atol=1e-5)
    # HF's own greedy search on the trained checkpoint gives the recorded tokens.
    with torch.inference_mode():
        hf = adapter.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                    do_sample=False, num_beams=1)
    for row, example in enumerate(examples[:2]):
        generated = hf[row, 1:].tolist()
        if adapter.eos_token_id in generated:
            generated = generated[: generated.index(adapter.eos_token_id) + 1]
        assert traces.final_id[traces.example_id == example.id].tolist() == generated

    manifest = store.read_manifest()
    assert manifest.kind == "generated" and manifest.task == "squad"
    assert manifest.model_hash == weights_sha256(trained_model.path)
    assert manifest.tokenizer_hash == tokenizer_sha256(trained_model.path)
    assert manifest.generation == {"decoding": "greedy", "max_source_tokens": 48,
                                   "max_target_tokens": 8, "max_new_tokens": 5}
    assert manifest.num_examples == NUM_EXAMPLES and manifest.num_layers == 3
    assert manifest.git_commit is None or len(manifest.git_commit) == 40
    assert [s.first_example for s in manifest.shards] == [0, 2, 4]

    # Resume: nothing to do (and nothing rewritten: the manifest's hash, which results are
    # keyed by, stays put); a missing shard is the only one recorded again.
    from suite.traces import sha256_file

    manifest_hash = sha256_file(store.manifest_path)
    again = _record(trained_model, trace_dir, samples_dir)
    assert (again.shards_written, again.shards_skipped) == (0, 3)
    assert sha256_file(store.manifest_path) == manifest_hash
    (trace_dir / manifest.shards[1].file).unlink()
    again = _record(trained_model, trace_dir, samples_dir)
    assert (again.shards_written, again.shards_skipped) == (1, 2)
    reloaded = store.load()
    assert np.array_equal(reloaded.final_id, traces.final_id)
    assert np.array_equal(reloaded.example_id, traces.example_id)

    # Other settings in the same folder are refused, naming what differs.
    other = TASK.model_copy(update={"max_new_tokens": 3})
    with pytest.raises(ExitbenchError, match="generation"):
        _record(trained_model, trace_dir, samples_dir, task=other)


def test_a_flipped_byte_is_detected_named_and_recorded_again(trained_model, samples_dir,
                                                              tmp_path):
    trace_dir = tmp_path / "generated"
    _record(trained_model, trace_dir, samples_dir)
    store = TraceStore(trace_dir)
    shard = store.read_manifest().shards[2]
    path = trace_dir / shard.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(TraceIntegrityError, match=shard.file):
        store.load()
    assert len(store.verify()) == 1 and shard.file in store.verify()[0]
    repaired = _record(trained_model, trace_dir, samples_dir)
    assert (repaired.shards_repaired, repaired.shards_written, repaired.shards_skipped) \
        == (1, 1, 2)
    assert store.verify() == [] and store.load().num_tokens > 0


def test_forced_traces_and_hidden_states_on_demand(trained_model, samples_dir, tmp_path):
    trace_dir = tmp_path / "forced"
    summary = _record(trained_model, trace_dir, samples_dir, kind="forced")
    traces = TraceStore(trace_dir).load()
    tokenizer = load_tokenizer(trained_model.path)
    examples = load_examples(get_task("squad"), TASK.split, samples_dir, NUM_EXAMPLES)
    targets = encode_texts(tokenizer, [e.target for e in examples], 8, 1)
    assert traces.gold_id.tolist() == [t for target in targets for t in target]
    assert summary.tokens_written == sum(map(len, targets))
    assert np.array_equal(traces.top1_id[:, -1], traces.final_id)

    hidden = load_hidden_states(trace_dir, batch_size=3)
    assert hidden.mismatch_rate == 0.0
    assert hidden.traces.hidden.shape == (traces.num_tokens, 3, 32)

    generated_dir = tmp_path / "generated"
    _record(trained_model, generated_dir, samples_dir)
    hidden = load_hidden_states(generated_dir)
    assert hidden.mismatched_tokens == 0
    assert np.isfinite(hidden.traces.hidden).all()


def test_record_shard_is_a_pure_function_of_plain_data(trained_model, samples_dir):
    request = ShardRequest(model_path=trained_model.path, task="squad", split=TASK.split,
                           data_dir=str(samples_dir), limit=NUM_EXAMPLES, first_example=1,
                           end_example=4, max_source_tokens=48, max_target_tokens=8,
                           max_new_tokens=5, kind="generated", batch_size=2)
    assert pickle.loads(pickle.dumps(request)) == request
    first, second = record_shard(request), record_shard(request)
    assert first.num_examples == 3 and first.first_example == 1
    for name in ("final_id", "top1_id", "top1_prob", "cos_prev", "example_id"):
        assert np.array_equal(getattr(first.traces, name), getattr(second.traces, name))
    assert pickle.loads(pickle.dumps(first)).num_tokens == first.num_tokens
    with pytest.raises(ExitbenchError, match="kind"):
        dataclasses.replace(request, kind="sampled")
    with pytest.raises(ExitbenchError, match="fewer than"):
        record_shard(dataclasses.replace(request, end_example=NUM_EXAMPLES + 2))


def test_cli_records_both_kinds_and_resumes(trained_model, samples_dir, tmp_path, capsys):
    config = {"name": "t", "output_dir": str(tmp_path / "out"), "data_dir": str(samples_dir),
              "record_batch_size": 4, "shard_size": 3,
              "tasks": [TASK.model_dump(exclude_none=True)],
              "models": [trained_model.model_dump(exclude_none=True)]}
    path = tmp_path / "suite.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    assert main(["record", "--config", str(path), "--kind", "both", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "squad/micro/generated: 2 shard(s) written" in out
    assert "record: 4 shard(s) written, 0 skipped" in out
    for kind in ("generated", "forced"):
        assert TraceStore(trace_dir_for(tmp_path / "out", "squad", "micro", kind)).exists()
    assert main(["record", "--config", str(path), "--kind", "both", "--no-progress"]) == 0
    assert "record: 0 shard(s) written, 4 skipped" in capsys.readouterr().out
    assert main(["record", "--config", str(path), "--model", "mikro", "--no-progress"]) == 2
    assert "did you mean 'micro'" in capsys.readouterr().err
