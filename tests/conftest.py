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
