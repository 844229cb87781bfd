"""Config validation: every error names the file, the key and what is wrong."""

from pathlib import Path

import pytest

from suite.config import load_config, parse_config
from suite.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_valid_config_loads_with_defaults(tmp_path):
    path = write(tmp_path, """
name: t
tasks:
  - {name: squad, split: "validation[:50]", limit: 10, max_new_tokens: 20}
models:
  - {name: tiny, path: runs/tiny}
""")
    config = load_config(path)
    assert config.tasks[0].limit == 10 and config.tasks[0].max_new_tokens == 20
    assert config.batch_sizes == [1, 8, 32] and config.ray.address is None


def test_unknown_task_names_file_key_and_closest_name(tmp_path):
    path = write(tmp_path, "tasks:\n  - {name: squat}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "tasks[0].name" in message and "'squad'" in message


def test_wrong_type_names_the_key(tmp_path):
    path = write(tmp_path, "tasks:\n  - {name: squad, limit: many}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: tasks[0] (squad).limit:" in str(err.value)
    assert "integer" in str(err.value)


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "tasks: [{name: squad}]\nbatch_size: [1]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "batch_size: unknown key (did you mean 'batch_sizes'?)" in str(err.value)


def test_negative_batch_size_and_bad_device(tmp_path):
    path = write(tmp_path, "tasks: [{name: squad}]\nbatch_sizes: [0, 8]\ndevice: tpu\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "batch_sizes" in message and "device" in message and "'tpu'" in message


def test_unknown_measure_and_profile_are_reported(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config({"tasks": [{"name": "squad"}], "measures": ["no_such_measure"],
                      "profiles": ["no_such_profile"]}, "x.yaml")
    message = str(err.value)
    assert "x.yaml: measures[0]" in message and "x.yaml: profiles[0]" in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "tasks: [\n"))
    with pytest.raises(ConfigError, match="tasks"):
        load_config(write(tmp_path, "name: no-tasks\n"))


REPO = Path(__file__).resolve().parent.parent
BUNDLED = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=[str(p.relative_to(REPO)) for p in BUNDLED])
def test_bundled_configs_load_and_point_inside_the_repository(path):
    """Every shipped config validates, and its relative paths (taken from its own folder)
    land in the repository's runs/, backbones/ and data/ whatever the current directory."""
    config = load_config(path)
    assert config.output_dir.startswith(str(REPO / "runs")), config.output_dir
    if config.data_dir is not None:
        assert Path(config.data_dir).is_dir(), config.data_dir
    for model in config.models:
        if model.path.startswith("/"):  # a local folder: trained under runs/, or shipped
            assert model.path.startswith((str(REPO / "runs"), str(REPO / "backbones"))), \
                model.path
            if model.path.startswith(str(REPO / "backbones")):  # shipped: must be there
                assert (Path(model.path) / "config.json").is_file(), model.path
