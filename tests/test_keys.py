"""Every file name made from a label goes through suite.keys.file_stem: hostile task, model,
measure and profile labels (``..``, ``/``, NUL, very long) never name a path outside the
folder meant for them, and distinct labels never share a name."""

from __future__ import annotations

from pathlib import Path

import pytest

from suite.keys import STEM_MAX_CHARS, file_stem

HOSTILE_LABELS = ["..", ".", "../../pwned", "a/b", "/etc/passwd", "nul\0byte", "x" * 300,
                  ".hidden", "", "trailing.", "tab\there", "\u202eevil", "CON", "é" * 90]


@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_a_hostile_label_is_one_safe_path_segment(label):
    stem = file_stem(label)
    assert stem and stem not in (".", "..") and not stem.startswith(".")
    assert "/" not in stem and "\\" not in stem and "\0" not in stem
    assert len(stem) <= STEM_MAX_CHARS and stem.isascii() and stem.isprintable()


def test_plain_labels_keep_their_names_and_distinct_labels_stay_distinct():
    for plain in ("softmax_margin", "tiny-calm", "squad", "a100_sxm_80gb", "v1.2"):
        assert file_stem(plain) == plain
    labels = HOSTILE_LABELS + ["a_b", "pwned", "x" * 299, "_hidden", "hidden"]
    stems = [file_stem(label) for label in labels]
    assert len(set(stems)) == len(labels)


@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_every_path_made_from_labels_stays_inside_its_folder(tmp_path, label):
    from suite.config import MeasureConfig
    from suite.fidelity import online_part_path, online_traces_path
    from suite.runner import _part_path, samples_part_path, trace_dir, validation_path
    from suite.submissions import SubmissionStore

    root = tmp_path / "run"
    paths = [
        trace_dir(root, label, "model"), trace_dir(root, "task", label),       # task, model
        trace_dir(root, label, label, role="fit"),
        _part_path(root, label, label, label),                                  # measure
        samples_part_path(_part_path(root, "t", "m", label), label),
        validation_path(root, MeasureConfig(name="softmax_margin", label=label or None)),
        online_part_path(root, label, label, label),
        online_traces_path(root, label, label, label, 0.5, 8),
        SubmissionStore(root).folder(label),
    ]
    for path in paths:
        resolved = Path(path).resolve()
        assert resolved.is_relative_to(root.resolve()), (label, path)
        inside = resolved.relative_to(root.resolve()).parts
        assert all(part not in ("", ".", "..") and "\0" not in part for part in inside)


@pytest.mark.parametrize("label", HOSTILE_LABELS)
def test_site_slugs_of_hostile_profile_and_measure_names_are_safe(label):
    from leaderboard.site import unique_slugs

    slugs = unique_slugs([label, "index", "static_layer"])
    assert slugs["index"] != "index"
    slug = slugs[label]
    assert slug == file_stem(label) or slug.startswith(file_stem(label))
    assert "/" not in slug and slug not in (".", "..") and not slug.startswith(".")
