"""Content keys and file names of stored work (shards, result parts, online parts).

A stored piece of work is reused when its key -- a hash of everything it depends on --
matches. Every file or folder name made from a user-chosen label (a task, model, measure or
profile name, a submission's name) goes through :func:`file_stem`, the one safe-name function:
no label can reach outside the folder it is meant for, and two labels never share a name."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

STEM_MAX_CHARS = 80
"""Longest stem :func:`file_stem` returns (a hashed suffix keeps long labels distinct)."""
_PLAIN_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED = frozenset({"con", "prn", "aux", "nul"})


def content_key(payload: Any) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys; other values by ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_stem(label: str) -> str:
    """A file-name-safe stem for ``label``, one path segment long.

    A plain label (ASCII letters, digits, ``-``, ``_`` and ``.``, starting with a letter or
    digit, at most :data:`STEM_MAX_CHARS` long, not ending in ``.``) is its own stem, so the
    usual names stay readable (``softmax_margin``, ``tiny-calm``). Anything else -- ``..``,
    ``/``, NUL, control or non-ASCII characters, a leading dot, an empty or very long label --
    becomes its plain characters (others as ``_``, cut short) followed by ``-`` and 10 hex
    digits of the label's SHA-256: never a path separator, never ``.`` or ``..``, never hidden,
    and distinct for distinct labels."""
    label = str(label)
    if (_PLAIN_STEM.match(label) and len(label) <= STEM_MAX_CHARS and not label.endswith(".")
            and label.split(".")[0].lower() not in _RESERVED):
        return label
    plain = "".join(c if (c.isascii() and (c.isalnum() or c in "-_")) else "_" for c in label)
    plain = plain.strip("_")[:STEM_MAX_CHARS - 11] or "x"
    return f"{plain}-{hashlib.sha256(label.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
