"""Content keys and file names of stored work (shards, result parts, online parts).

A stored piece of work is reused when its key -- a hash of everything it depends on --
matches; names of files derived from user-chosen labels are made safe here."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_key(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys; other values by ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_stem(label: str) -> str:
    """``label`` with every character but letters, digits, ``-``, ``_`` and ``.`` made ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
