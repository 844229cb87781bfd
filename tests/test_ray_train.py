"""Training on Ray Train (``TorchTrainer``, DDP over gloo on CPU, every node on 127.0.0.1):
two workers give one process's weights for the same global batch, and a worker killed
mid-training is restarted from the last Ray Train checkpoint with nothing lost."""

from __future__ import annotations

import json

import pytest
import ray
from transformers import T5ForConditionalGeneration

from suite.runner import init_ray
from suite.training import MODEL_METADATA_FILE, Launch, TrainSettings, train

SETTINGS = TrainSettings(objective="calm", preset="micro", tasks=("squad",),
                         split="validation[200:264]", max_source_tokens=48,
                         max_target_tokens=8, steps=4, batch_size=8, learning_rate=3e-3,
                         warmup_steps=2, dropout_rate=0.0, seed=0)
"""Dropout off: each worker draws its own masks, so only dropout-free runs are equal."""


@pytest.fixture(scope="module")
def ray_here():
    started = init_ray(num_cpus=4)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer_dir(random_backbone):
    return random_backbone.parent / "tokenizer"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer_dir, samples_dir):
    out = tmp_path_factory.mktemp("one") / "model"
    result = train(SETTINGS, tokenizer_dir, out, data_dir=samples_dir, progress=False,
                   log_every=1, threads=1)
    return result, T5ForConditionalGeneration.from_pretrained(out).state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-5, worst


def test_two_workers_give_one_process_weights(ray_here, one_process, tmp_path, tokenizer_dir,
                                              samples_dir):
    reference, weights = one_process
    out = tmp_path / "two"
    result = train(SETTINGS, tokenizer_dir, out, data_dir=samples_dir, progress=False,
                   log_every=1, launch=Launch(workers=2), checkpoint_every=2)
    _assert_same_weights(weights, T5ForConditionalGeneration.from_pretrained(out).state_dict())
    assert [loss for _, loss in result.loss_curve] == pytest.approx(
        [loss for _, loss in reference.loss_curve], rel=1e-5)
    meta = json.loads((out / MODEL_METADATA_FILE).read_text())
    assert meta["training"]["launcher"] == "ray_train" and meta["training"]["workers"] == 2
    assert not (tmp_path / "two.checkpoints").exists()


def _kill_rank_once(marker, at_step):
    def hook(step, loss):
        import os

        import ray.train

        if step == at_step and ray.train.get_context().get_world_rank() == 1 \
                and not marker.exists():
            marker.write_text("killed")
            # Ray Train registers reported checkpoints asynchronously; wait for the step-2
            # one to be committed, then die.
            ray.train.get_all_reported_checkpoints()
            os._exit(1)  # the worker process dies, as on a lost node
    return hook


def test_killed_worker_resumes_from_the_checkpoint(ray_here, one_process, tmp_path,
                                                   tokenizer_dir, samples_dir):
    reference, weights = one_process
    marker = tmp_path / "killed"
    out = tmp_path / "resumed"
    result = train(SETTINGS, tokenizer_dir, out, data_dir=samples_dir, progress=False,
                   log_every=1, launch=Launch(workers=2, max_failures=1), checkpoint_every=2,
                   on_step=_kill_rank_once(marker, at_step=3))
    assert marker.read_text() == "killed"
    assert result.resumed_from == 2  # the group restarted from the step-2 checkpoint
    _assert_same_weights(weights, T5ForConditionalGeneration.from_pretrained(out).state_dict())
    assert [loss for _, loss in result.loss_curve] == pytest.approx(
        [loss for _, loss in reference.loss_curve], rel=1e-5)
