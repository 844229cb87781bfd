"""Training objectives against hand computations, and the training loop's resume contract."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from suite.cli import main
from suite.errors import ExitbenchError
from suite.tasks import get_task, load_examples
from suite.tokenizer import TokenizerSettings, load_tokenizer, task_texts, train_tokenizer
from suite.training import (
    MODEL_METADATA_FILE,
    PRESETS,
    BatchPlan,
    Objective,
    TrainSettings,
    build_model,
    calm_layer_weights,
    collate,
    default_shallow_layer,
    dyna_alignment,
    encode_examples,
    objective_loss,
    teacher_layers,
    train,
    uniform_layer_map,
)

MICRO = PRESETS["micro"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The micro model's ops are tiny: a second OpenMP thread only adds synchronisation, and
    # on a busy 2-core machine its spin-waiting made each step ~100x slower (measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, samples_dir):
    train_texts, _ = task_texts(["squad"], "validation[200:]", samples_dir)
    heldout, _ = task_texts(["squad"], "validation[:100]", samples_dir)
    out = tmp_path_factory.mktemp("tok") / "squad"
    train_tokenizer(train_texts, heldout, out, TokenizerSettings(vocab_size=1000))
    return out


@pytest.fixture(scope="module")
def batch(tokenizer_dir, samples_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    examples = load_examples(get_task("squad"), "validation[200:206]", samples_dir)
    data = encode_examples(tokenizer, examples, max_source_tokens=48, max_target_tokens=8)
    result = collate(data, range(len(data)))
    assert (result["labels"] == -100).any()  # targets of different lengths: padding is masked
    return result


@pytest.fixture()
def model(tokenizer_dir):
    return build_model(MICRO, len(load_tokenizer(tokenizer_dir)), seed=0)


def _head(model, hidden, normed):
    """The exit head written out by hand: final RMS norm, d_model ** -0.5, tied embeddings."""
    if not normed:
        norm = model.decoder.final_layer_norm
        variance = hidden.pow(2).mean(-1, keepdim=True)
        hidden = norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))
    return (hidden * model.config.d_model ** -0.5) @ model.shared.weight.T


def test_hf_last_decoder_hidden_state_is_normed_and_others_are_not(model, batch):
    raw = {}
    hook = model.decoder.block[-1].register_forward_hook(lambda m, i, o: raw.update(out=o[0]))
    out = model(**batch, output_hidden_states=True)
    hook.remove()
    states = out.decoder_hidden_states
    assert len(states) == MICRO.num_layers + 1  # [0] is the embedding output
    assert torch.allclose(states[-1], model.decoder.final_layer_norm(raw["out"]), atol=1e-6)
    assert not torch.allclose(states[-1], raw["out"], atol=1e-3)
    assert torch.allclose(_head(model, states[-1], normed=True), out.logits, atol=1e-5)
    assert torch.allclose(_head(model, raw["out"], normed=False), out.logits, atol=1e-5)


def test_vanilla_equals_hf_loss(model, batch):
    ours = objective_loss(model, batch, Objective("vanilla"))
    assert torch.allclose(ours.total, model(**batch).loss, atol=1e-6)
    assert ours.parts["ce_last"] == pytest.approx(float(ours.total.detach()))


def test_calm_equals_hand_computation(model, batch):
    out = model(**batch, output_hidden_states=True)
    states = out.decoder_hidden_states
    num_layers = MICRO.num_layers
    total, weight_sum = 0.0, sum(range(1, num_layers + 1))
    for i in range(1, num_layers + 1):
        logits = _head(model, states[i], normed=(i == num_layers))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                             ignore_index=-100)
        total = total + (i / weight_sum) * ce
    ours = objective_loss(model, batch, Objective("calm"))
    assert torch.allclose(ours.total, total, atol=1e-5)
    assert ours.parts["ce_layer_3"] == pytest.approx(float(model(**batch).loss.detach()), abs=1e-5)
    assert calm_layer_weights(4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    # gradients reach the first decoder layer through its own exit
    ours.total.backward()
    assert model.decoder.block[0].layer[-1].DenseReluDense.wo.weight.grad.abs().sum() > 0


def test_uniform_layer_map_matches_free():
    # FREE's released TEACHER_LAYERS (0-based): 12 layers -> 3: [3, 7, 11]; 24 -> 6: [3, 7, ..., 23]
    assert uniform_layer_map(3, 12) == [4, 8, 12]
    assert uniform_layer_map(6, 24) == [4, 8, 12, 16, 20, 24]
    assert uniform_layer_map(2, 6) == [3, 6]
    assert Objective("free").resolved(6).shallow_layer == 2
    with pytest.raises(ExitbenchError, match="shallow layer"):
        Objective("free", shallow_layer=6).resolved(6)


@pytest.mark.parametrize("num_layers,expected", [(3, 1), (6, 2), (8, 2), (12, 3), (24, 6)])
def test_default_shallow_layer_is_free_quarter(num_layers, expected):
    # FREE's scripts: --shallow_exit_layer 6 for T5-large's 24 decoder layers
    assert default_shallow_layer(num_layers) == expected
    assert Objective("free").resolved(num_layers).shallow_layer == expected


def test_teacher_layers_follow_free_table():
    # util/losses.py TEACHER_LAYERS[24][10] = [2, 5, 7, 10, 12, 15, 17, 19, 21, 23] (0-based):
    # not the uniform rule, which gives 2 (round(2.4)) for the first
    assert teacher_layers(10, 24) == [3, 6, 8, 11, 13, 16, 18, 20, 22, 24]
    assert uniform_layer_map(10, 24)[0] == 2
    assert teacher_layers(6, 24) == [4, 8, 12, 16, 20, 24]
    assert teacher_layers(3, 12) == [4, 8, 12]
    assert teacher_layers(2, 6) == [3, 6]  # not in the table: uniform
    with pytest.raises(ExitbenchError, match="layer map"):
        Objective("free", layer_map="diagonal")


def test_dyna_alignment_walks_down_from_the_last_teacher():
    # rows: teachers, columns: students. The last teacher takes its best student (2); the
    # middle one the best below 2 (0, though 2 is lower); the first has none below 0: 0 again
    losses = torch.tensor([[0.5, 0.9, 0.1],
                           [0.3, 0.8, 0.2],
                           [0.9, 0.7, 0.1]])
    assert dyna_alignment(losses) == [0, 0, 2]
    assert dyna_alignment(torch.tensor([[0.1, 0.9], [0.9, 0.1]])) == [0, 1]


@pytest.mark.parametrize("layer_map", ["dyna", "uniform", "last"])
def test_free_distillation_by_layer_map(model, batch, layer_map):
    k, num_layers = 2, MICRO.num_layers
    out = model(**batch, output_hidden_states=True)
    states, mask = out.decoder_hidden_states, batch["labels"] != -100

    def normed(i):
        return states[i] if i == num_layers else model.decoder.final_layer_norm(states[i])

    teachers = teacher_layers(k, num_layers)  # [2, 3] (uniform: round(1.5), 3)
    mse = [[float(F.mse_loss(normed(s)[mask], normed(t)[mask]).detach()) for s in (1, 2)]
           for t in teachers]
    if layer_map == "uniform":
        expected = (mse[0][0] + mse[1][1]) / 2
    elif layer_map == "last":
        expected = float(F.mse_loss(normed(2)[mask], normed(num_layers)[mask]).detach())
    else:
        align = dyna_alignment(torch.tensor(mse))
        expected = (mse[0][align[0]] + mse[1][align[1]]) / 2
    ours = objective_loss(model, batch, Objective("free", shallow_layer=k, layer_map=layer_map))
    assert ours.parts["kd"] == pytest.approx(expected, rel=1e-5)


def test_free_parts_are_computed_as_documented(model, batch):
    k, num_layers, alpha = 1, MICRO.num_layers, 0.5
    out = model(**batch, output_hidden_states=True)
    states, labels = out.decoder_hidden_states, batch["labels"]
    mask = labels != -100

    def ce(logits):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)

    def normed(i):
        return states[i] if i == num_layers else model.decoder.final_layer_norm(states[i])

    ce_shallow = ce(_head(model, states[k], normed=False))
    ce_deep = out.loss
    kd = F.mse_loss(normed(1)[mask], normed(3)[mask])  # shallow layer 1 -> deep layer 3
    ours = objective_loss(model, batch, Objective("free", shallow_layer=k, kd_weight=alpha))
    assert ours.parts["ce_shallow"] == pytest.approx(float(ce_shallow.detach()), abs=1e-5)
    assert ours.parts["ce_deep"] == pytest.approx(float(ce_deep.detach()), abs=1e-5)
    assert ours.parts["kd"] == pytest.approx(float(kd.detach()), rel=1e-5)
    expected = (k * ce_shallow + num_layers * ce_deep) / (k + num_layers) + alpha * kd
    assert torch.allclose(ours.total, expected, atol=1e-5)

    # The deep (teacher) side is detached: the distillation term alone trains no layer above k.
    with_kd = objective_loss(model, batch, Objective("free", shallow_layer=k, kd_weight=1.0))
    without = objective_loss(model, batch, Objective("free", shallow_layer=k, kd_weight=0.0))
    (with_kd.total - without.total).backward()
    grad = [block.layer[-1].DenseReluDense.wo.weight.grad for block in model.decoder.block]
    assert grad[0].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in grad[1:])


def test_batch_plan_is_deterministic_and_covers_each_epoch():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10, 11]
    plan, again = BatchPlan(lengths, 4, seed=1), BatchPlan(lengths, 4, seed=1)
    first_epoch = [plan.batch(s) for s in range(1, plan.batches_per_epoch + 1)]
    assert sorted(int(i) for b in first_epoch for i in b) == list(range(len(lengths)))
    assert all((again.batch(s) == plan.batch(s)).all() for s in (5, 2, 9, 1))
    assert any((BatchPlan(lengths, 4, seed=2).batch(s) != plan.batch(s)).any()
               for s in range(1, 4) if len(plan.batch(s)) == len(BatchPlan(lengths, 4, 2).batch(s)))


def _settings(**overrides):
    base = dict(objective="calm", preset="micro", tasks=("squad",), split="validation[200:264]",
                max_source_tokens=48, max_target_tokens=8, steps=6, batch_size=8,
                learning_rate=3e-3, warmup_steps=2, seed=0)
    return TrainSettings(**{**base, **overrides})


def test_training_reduces_loss_and_writes_a_loadable_model(tmp_path, tokenizer_dir, samples_dir):
    from transformers import T5ForConditionalGeneration

    out = tmp_path / "model"
    result = train(_settings(objective="free", steps=40, learning_rate=5e-3), tokenizer_dir, out,
                   data_dir=samples_dir, eval_split="validation[:16]", progress=False,
                   log_every=5)
    first, last = result.loss_curve[0][1], result.loss_curve[-1][1]
    assert last < first - 0.5, result.loss_curve
    meta = json.loads((out / MODEL_METADATA_FILE).read_text())
    assert meta["objective"] == "free" and meta["shallow_layer"] == 1 and meta["steps"] == 40
    assert "not a published checkpoint" in meta["label"] and "SQuAD" in meta["label"]
    assert meta["final_loss"] == pytest.approx(last)
    assert len(meta["eval"]["layer_ce"]) == MICRO.num_layers
    assert not (tmp_path / "model.checkpoints").exists()
    model = T5ForConditionalGeneration.from_pretrained(str(out))
    tokenizer = load_tokenizer(out)  # the tokenizer travels with the model
    assert model.config.num_layers == model.config.num_decoder_layers == MICRO.num_layers
    generated = model.generate(**tokenizer(["question: who? context: nobody"], return_tensors="pt"),
                               max_new_tokens=4, do_sample=False)
    assert generated[0, 0] == 0  # decoding starts from pad

    again = train(_settings(objective="free", steps=40, learning_rate=5e-3), tokenizer_dir, out,
                  data_dir=samples_dir, progress=False, log_every=5)
    assert again.already_done and again.final_loss == pytest.approx(last)
    # what the folder records reaches the FREE measure (and so the online FREE decoder):
    # the trained shallow exit is its default, naming another layer is an error
    from suite.config import MeasureConfig
    from suite.sweep import instantiate
    from suite.training import read_backbone

    backbone = read_backbone(str(out))
    assert (backbone.objective, backbone.shallow_layer) == ("free", 1)
    assert meta["layer_map"] == "dyna"
    measure = instantiate(MeasureConfig(name="free_shallow_deep"), str(out))
    assert measure.exit_layer(MICRO.num_layers) == 0
    with pytest.raises(ExitbenchError, match="trained with FREE's objective to exit at layer 0"):
        instantiate(MeasureConfig(name="free_shallow_deep", options={"shallow_layer": 1}),
                    str(out))
    with pytest.raises(ExitbenchError, match="steps: 40 then, 41 now"):
        train(_settings(objective="free", steps=41, learning_rate=5e-3), tokenizer_dir, out,
              data_dir=samples_dir, progress=False)


class _Killed(Exception):
    pass


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, tokenizer_dir, samples_dir):
    from transformers import T5ForConditionalGeneration

    settings = _settings(dropout_rate=0.1)  # dropout draws random numbers: RNG state must resume
    whole = train(settings, tokenizer_dir, tmp_path / "whole", data_dir=samples_dir,
                  checkpoint_every=2, progress=False)
    assert whole.resumed_from is None

    def kill_at_step_5(step, loss):
        if step == 5:
            raise _Killed

    with pytest.raises(_Killed):
        train(settings, tokenizer_dir, tmp_path / "resumed", data_dir=samples_dir,
              checkpoint_every=2, progress=False, on_step=kill_at_step_5)
    assert not (tmp_path / "resumed").exists()
    assert (tmp_path / "resumed.checkpoints" / "step-0000004").is_dir()
    with pytest.raises(ExitbenchError, match="learning_rate"):
        train(_settings(dropout_rate=0.1, learning_rate=1e-3), tokenizer_dir,
              tmp_path / "resumed", data_dir=samples_dir, progress=False)

    resumed = train(settings, tokenizer_dir, tmp_path / "resumed", data_dir=samples_dir,
                    checkpoint_every=2, progress=False)
    assert resumed.resumed_from == 4
    assert [loss for _, loss in resumed.loss_curve] == [loss for _, loss in whole.loss_curve]
    a = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "whole")).state_dict()
    b = T5ForConditionalGeneration.from_pretrained(str(tmp_path / "resumed")).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_cli_train_writes_model_and_reports_loss(tmp_path, tokenizer_dir, samples_dir, capsys):
    out = tmp_path / "cli-model"
    code = main(["train", "--objective", "vanilla", "--preset", "micro", "--tokenizer",
                 str(tokenizer_dir), "--task", "squad", "--split", "validation[200:232]",
                 "--data-dir", str(samples_dir), "--out", str(out), "--steps", "3",
                 "--batch-size", "8", "--max-source-tokens", "32", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "loss" in printed and "not a published checkpoint" in printed
    assert json.loads((out / MODEL_METADATA_FILE).read_text())["objective"] == "vanilla"
    code = main(["train", "--tokenizer", str(tmp_path / "nope"), "--task", "squad",
                 "--out", str(tmp_path / "x"), "--data-dir", str(samples_dir)])
    assert code == 2 and "train-tokenizer" in capsys.readouterr().err
