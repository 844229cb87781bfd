"""Decoder-only models through the user's path, beside T5: prompts and stop conditions
(suite/prompts.py), recording, and a run that mixes both families through record, replay,
online decoding, fidelity and the leaderboard (random weights: tests only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from suite.errors import ExitbenchError
from suite.prompts import (
    encode_prompts,
    encode_sources,
    encode_targets,
    prompt_format,
    stop_string_tokens,
)
from suite.tasks import Example, get_task


@pytest.fixture(scope="module")
def llama_backbone(random_backbone, tmp_path_factory) -> Path:
    """A random-weight Llama (3 layers) beside conftest's random T5, with the same
    SentencePiece tokenizer (pad 0, EOS 1, no BOS)."""
    from suite.backbones.decoder_only import random_causal_lm
    from suite.models import load_tokenizer
    from suite.tokenizer import copy_tokenizer_files

    tokenizer_dir = random_backbone.parent / "tokenizer"
    vocab = len(load_tokenizer(str(random_backbone)))
    model = random_causal_lm("llama", seed=2, initializer_range=0.1, vocab_size=vocab,
                             hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, eos_token_id=1,
                             pad_token_id=0, bos_token_id=None)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = 1, 0
    model.generation_config.bos_token_id = None
    folder = tmp_path_factory.mktemp("llama") / "model"
    model.save_pretrained(folder)
    copy_tokenizer_files(tokenizer_dir, folder)
    return folder


def _tokenizer(folder):
    from suite.models import load_tokenizer

    return load_tokenizer(str(folder))


def test_prompts_keep_the_end_and_targets_continue_them(llama_backbone):
    tokenizer = _tokenizer(llama_backbone)
    task = get_task("squad")
    fmt = prompt_format(tokenizer, task, decoder_only=True, eos_token_ids=[1])
    example = Example(id="x", source="question: q context: c", target="Denver Broncos",
                      references=("Denver Broncos",),
                      prompt="Context: a long story about football\nQuestion: who won?\nAnswer:")
    whole = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    [prompt] = encode_sources(tokenizer, [example], fmt, 6)
    assert prompt == whole[-6:]  # the end (the question and "Answer:") survives, no EOS
    [target] = encode_targets(tokenizer, [example], fmt, 32)
    assert target[-1] == 1
    assert tokenizer.decode(target[:-1], skip_special_tokens=True).strip() == "Denver Broncos"
    # T5 reads the input template, ended with EOS, as before
    t5 = prompt_format(tokenizer, task, decoder_only=False, eos_token_ids=[1])
    [source] = encode_sources(tokenizer, [example], t5, 64)
    assert source == tokenizer(example.source, add_special_tokens=False)["input_ids"] + [1]
    with pytest.raises(ExitbenchError, match="decoder-only"):
        prompt_format(tokenizer, task, decoder_only=False, eos_token_ids=[1], chat_template=True)


def test_chat_template_by_option_and_a_clear_error_without_one(llama_backbone):
    tokenizer = _tokenizer(llama_backbone)
    task = get_task("squad")
    with pytest.raises(ExitbenchError, match="has none"):
        prompt_format(tokenizer, task, decoder_only=True, eos_token_ids=[1], chat_template=True)
    tokenizer.chat_template = ("{% for m in messages %}user: {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    fmt = prompt_format(tokenizer, task, decoder_only=True, eos_token_ids=[1],
                        chat_template=True)
    example = Example(id="x", source="s", target="t", references=("t",), prompt="hello there")
    [ids] = encode_sources(tokenizer, [example], fmt, 64)
    assert ids == tokenizer("user: hello there assistant:", add_special_tokens=False)["input_ids"]


def test_stop_strings_become_the_tokens_that_contain_them():
    class Vocabulary:  # a test double: tokens as text
        tokens = ["<pad>", "</s>", "Paris", ".\n", "\n\n", "Lyon"]
        all_special_ids = [0, 1]

        def __len__(self):
            return len(self.tokens)

        def batch_decode(self, ids, **_):
            return [self.tokens[i[0]] for i in ids]

    assert stop_string_tokens(Vocabulary(), ["\n"]) == [3, 4]
    fmt = prompt_format(Vocabulary(), get_task("squad"), decoder_only=True, eos_token_ids=[1])
    assert fmt.stop_token_ids == (1, 3, 4)
    assert prompt_format(Vocabulary(), get_task("cnn_dailymail"), decoder_only=True,
                         eos_token_ids=[1]).stop_token_ids == (1,)


def test_every_task_has_a_decoder_only_prompt(samples_dir):
    from suite.tasks import load_examples

    for name in ("squad", "cnn_dailymail", "wmt15_en_fr"):
        task = get_task(name)
        [example] = load_examples(task, "validation", samples_dir, 1)
        assert example.prompt and example.prompt.endswith(":"), name
    assert get_task("squad").stop_strings == ("\n",)


def test_recorded_decoder_only_traces_equal_hf_generate(llama_backbone, samples_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from suite.backbones.decoder_only import left_align
    from suite.config import ModelConfig, TaskConfig
    from suite.decoding import pad_batch
    from suite.record import record_task
    from suite.tasks import load_examples, task_spec
    from suite.traces import TraceStore

    task_config = TaskConfig(name="squad", split="validation[:5]", max_source_tokens=80,
                             max_new_tokens=6)
    model = ModelConfig(name="llama", path=str(llama_backbone))
    summary = record_task(task_config, model, "generated", tmp_path / "traces",
                          data_dir=str(samples_dir), batch_size=3, shard_size=5,
                          progress=False)
    assert summary.examples_written == 5
    store = TraceStore(tmp_path / "traces")
    manifest = store.read_manifest()
    assert manifest.generation["family"] == "decoder-only"
    assert manifest.generation["stop_strings"] == ["\n"] and manifest.num_layers == 3
    traces = store.load()
    # HF's own generate over the same prompts, left-padded as it wants them
    task = task_spec(task_config)
    examples = load_examples(task, task_config.split, samples_dir, None)
    tokenizer = _tokenizer(llama_backbone)
    fmt = prompt_format(tokenizer, task, decoder_only=True, eos_token_ids=[1])
    prompts = encode_sources(tokenizer, examples, fmt, 80)
    ids, mask = left_align(*pad_batch(prompts, 0), 0)
    hf = AutoModelForCausalLM.from_pretrained(llama_backbone).eval()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                          do_sample=False, pad_token_id=0, eos_token_id=list(fmt.stop_token_ids))
    for row, example in zip(out[:, ids.shape[1]:].tolist(), examples):
        ours = traces.final_id[traces.example_id == example.id].tolist()
        cut = next((i + 1 for i, t in enumerate(row) if t in fmt.stop_token_ids), len(row))
        assert ours == row[:cut]


def test_t5_prompt_encoding_is_unchanged(random_backbone):
    """The T5 path keeps its encoding byte for byte (the suite's earlier rule)."""
    from suite.record import encode_texts

    tokenizer = _tokenizer(random_backbone)
    examples = [Example(id=str(i), source=f"question: q{i} context: some text", target="a",
                        references=("a",)) for i in range(3)]
    fmt = prompt_format(tokenizer, get_task("squad"), decoder_only=False, eos_token_ids=[1])
    assert encode_sources(tokenizer, examples, fmt, 7) == encode_texts(
        tokenizer, [e.source for e in examples], 7, 1)
    assert encode_prompts(tokenizer, ["a b c"], 64) == [tokenizer("a b c",
                                                                  add_special_tokens=False)
                                                        ["input_ids"]]


@pytest.mark.slow
def test_a_run_mixing_both_families_replays_decodes_online_and_ranks_them(
        random_backbone, llama_backbone, samples_dir, tmp_path, capsys):
    from suite.cli import main
    from suite.results import read_results

    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "mixed-test", "output_dir": str(out), "data_dir": str(samples_dir),
        "models": [{"name": "t5-random", "path": str(random_backbone),
                    "label": "random-weight T5 (tests only)"},
                   {"name": "llama-random", "path": str(llama_backbone),
                    "label": "random-weight Llama (tests only)"}],
        "tasks": [{"name": "squad", "split": "validation[:6]", "max_new_tokens": 6,
                   "max_source_tokens": 80}],
        "measures": ["softmax_margin", "static_layer"], "profiles": ["generic_cpu"],
        "batch_sizes": [1, 4], "record_batch_size": 3,
        "online": {"batch_sizes": [1, 3], "num_thresholds": 2, "threads": 1},
        "ray": {"num_cpus": 1}, "leaderboard": True}))
    assert main(["fidelity", "--config", str(config), "--no-progress"]) == 0
    rows = read_results(out / "results")
    for model in ("t5-random", "llama-random"):
        mine = [r for r in rows if r.model == model]
        assert {r.mode for r in mine} == {"replay", "online"}, model
        assert {r.measure for r in mine} == {"softmax_margin", "static_layer"}
    report = json.loads((out / "fidelity" / "fidelity.json").read_text())
    full = [p for p in report["points"] if p["measure"] == "softmax_margin"
            and p["threshold"] == 1.0]
    assert {p["model"] for p in full} == {"t5-random", "llama-random"}
    for point in full:  # a threshold that never exits: online decoding is the recorded run
        assert point["online_quality"] == point["replay_quality"]
        assert point["divergence"]["token_rate"] == 0.0
    manifests = {m: json.loads((out / "traces" / "squad" / m / "generated" / "manifest.json")
                               .read_text()) for m in ("t5-random", "llama-random")}
    assert "family" not in manifests["t5-random"]["generation"]  # T5 manifests as before
    assert manifests["llama-random"]["generation"]["family"] == "decoder-only"
    site = (out / "site").rglob("*.html")
    text = " ".join(p.read_text() for p in site)
    assert "llama-random" in text and "t5-random" in text
    assert np.isfinite([r.tokens_per_s for r in rows if r.model == "llama-random"]).all()


def test_bundled_decoder_only_configs_load():
    from suite.config import load_config
    from suite.training import get_preset

    root = Path(__file__).resolve().parent.parent / "configs"
    mixed = load_config(root / "mixed_families.yaml")
    presets = {m.name: m.train.preset for m in mixed.models}
    assert get_preset(presets["tiny-llama-layerskip"]).family == "llama"
    assert get_preset(presets["tiny-calm"]).family == "t5"
    fidelity = load_config(root / "fidelity_mixed.yaml")  # the same two backbones online
    assert [m.path for m in fidelity.models] == [m.path for m in mixed.models]
    assert fidelity.online.batch_sizes == [1, 8]
    for name, hub_id in (("layerskip_llama3_2_1b", "facebook/layerskip-llama3.2-1B"),
                         ("qwen2_5_1_5b", "Qwen/Qwen2.5-1.5B")):
        config = load_config(root / f"{name}.yaml")
        assert [m.path for m in config.models] == [hub_id]
        assert {t.name for t in config.tasks} == {"cnn_dailymail", "squad"}
        assert config.output_dir.endswith(f"runs/{name}")
