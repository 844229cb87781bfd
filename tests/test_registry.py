"""Registries: lookup by name, "did you mean", and plugins from entry points."""

from importlib import metadata

import pytest

from suite.errors import UnknownNameError
from suite.registry import Registry
from suite.tasks import TASKS, TaskSpec


def test_unknown_task_suggests_closest_names():
    with pytest.raises(UnknownNameError) as err:
        TASKS.get("cnn_daily")
    assert "'cnn_dailymail'" in str(err.value)
    assert "exitbench ls tasks" in str(err.value)


def test_lazy_module_attribute_entries():
    registry: Registry[object] = Registry("thing")
    registry.register("join", "os.path:join")
    import os.path
    assert registry.get("join") is os.path.join
    with pytest.raises(ValueError, match="already registered"):
        registry.register("join", "os.path:join")


def test_plugins_come_from_the_entry_point_group(monkeypatch, tmp_path):
    (tmp_path / "my_task_plugin.py").write_text(
        "import dataclasses\n"
        "from suite.tasks import get_task\n"
        "def make():\n"
        "    return dataclasses.replace(get_task('squad'), name='squad_plugin', source='plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = metadata.EntryPoint(name="squad_plugin", value="my_task_plugin:make",
                                group="exitbench.tasks")
    real = metadata.entry_points

    def fake_entry_points(**kwargs):
        if kwargs.get("group") == "exitbench.tasks":
            return [entry]
        return real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    registry = Registry("task", "exitbench.tasks", TASKS._discover, TASKS._check)
    assert "squad_plugin" in registry.names() and "squad" in registry.names()
    task = registry.get("squad_plugin")
    assert isinstance(task, TaskSpec) and task.name == "squad_plugin"
    assert registry.source("squad_plugin").startswith("plugin:")
    with pytest.raises(UnknownNameError, match="squad_plugin"):
        registry.get("squad_plugn")
