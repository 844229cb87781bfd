"""Shared test fixtures: the repository's data samples and a quiet, offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES_DIR = REPO_ROOT / "data" / "samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported: see suite/cli.py
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    assert SAMPLES_DIR.is_dir(), f"data samples missing at {SAMPLES_DIR}"
    return SAMPLES_DIR


@pytest.fixture(autouse=True)
def _no_ambient_data_dir(monkeypatch):
    # Tests say where their data comes from; an EXITBENCH_DATA_DIR from the shell must not leak in.
    monkeypatch.delenv("EXITBENCH_DATA_DIR", raising=False)


@pytest.fixture(scope="session")
def random_backbone(tmp_path_factory, samples_dir) -> Path:
    """A folder like the backbones the suite trains: a SentencePiece tokenizer trained on
    the SQuAD sample and a randomly initialised 3+3-layer T5 (random weights: tests only)."""
    from suite.backbones.t5 import random_t5
    from suite.tokenizer import (
        TokenizerSettings,
        copy_tokenizer_files,
        load_tokenizer,
        task_texts,
        train_tokenizer,
    )

    root = tmp_path_factory.mktemp("backbone")
    texts, _ = task_texts(["squad"], "validation[:150]", samples_dir)
    heldout, _ = task_texts(["squad"], "validation[150:170]", samples_dir)
    train_tokenizer(texts, heldout, root / "tokenizer",
                    TokenizerSettings(vocab_size=600, max_unk_rate=0.05, extra_ids=0))
    vocab_size = len(load_tokenizer(root / "tokenizer"))
    model = random_t5(seed=0, vocab_size=vocab_size, d_model=32, d_ff=64, num_layers=3,
                      num_decoder_layers=3, num_heads=2, d_kv=16)
    model.save_pretrained(root / "model")
    copy_tokenizer_files(root / "tokenizer", root / "model")
    return root / "model"



@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny models: a second OpenMP thread only adds
    synchronisation on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
