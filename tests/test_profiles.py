"""Hardware profiles: the built-ins load with a source for every figure; bad files are
reported by file and key; measured profiles validate their tables."""

from __future__ import annotations

import copy

import pytest
import yaml

from suite.commands.ls import describe
from suite.errors import ConfigError, UnknownNameError
from suite.profiles import (
    PROFILES,
    SIMULATED_FIGURES,
    MeasuredProfile,
    ProfileError,
    SimulatedProfile,
    example_measured_profile,
    get_profile,
    load_profile,
    parse_profile,
)

BUILTINS = ["a100_sxm_80gb", "h100_sxm", "h200", "l4", "t4", "generic_cpu"]


def write_yaml(tmp_path, name: str, data: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def simulated_data() -> dict:
    data = get_profile("a100_sxm_80gb").model_dump(exclude={"path"})
    data["name"] = "custom"
    return data


def test_builtin_profiles_load_with_a_source_for_every_figure():
    assert set(BUILTINS) <= set(PROFILES.names())
    for name in BUILTINS:
        profile = get_profile(name)
        assert isinstance(profile, SimulatedProfile) and profile.name == name
        assert set(SIMULATED_FIGURES) <= set(profile.sources), name
        assert isinstance(profile.memory_bytes, int) and profile.memory_bytes > 2**33, name
        # every listed dtype has a figure; GPUs' tensor-core figures exceed their FP32 one
        if name != "generic_cpu":
            low_precision = [profile.peak_flops_per_s[d] for d in ("bfloat16", "float16")
                             if d in profile.peak_flops_per_s]
            assert min(low_precision) > profile.peak_flops_per_s["float32"], name


def test_dense_figures_not_sparsity_ones():
    # datasheets print sparsity peaks: A100 624 and H100 1,979 TFLOPS bf16; dense is half
    assert get_profile("a100_sxm_80gb").peak_flops_per_s["bfloat16"] == 312e12
    assert get_profile("h100_sxm").peak_flops_per_s["bfloat16"] == 989.5e12
    assert get_profile("h200").memory_bandwidth_bytes_per_s == 4.8e12


def test_t4_has_no_bfloat16_and_says_so():
    t4 = get_profile("t4")
    assert "bfloat16" not in t4.peak_flops_per_s
    with pytest.raises(ProfileError) as err:
        t4.peak_for("bfloat16")
    message = str(err.value)
    assert "'t4'" in message and "bfloat16" in message and "float16" in message
    assert "t4.yaml" in message


def test_ls_profiles_lists_kinds():
    rows = {name: text for name, _, text in describe("profiles")}
    assert rows["h200"].startswith("[simulated]")


def test_missing_source_names_file_and_key(tmp_path):
    data = simulated_data()
    del data["sources"]["memory_bytes"]
    data["sources"]["kernel_launch_seconds"] = "I think so"
    path = write_yaml(tmp_path, "custom", data)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert f"{path}: sources.memory_bytes: missing" in message
    assert f"{path}: sources.kernel_launch_seconds:" in message and "assumption:" in message


def test_gb_instead_of_bytes_and_typo_keys_are_reported(tmp_path):
    data = simulated_data()
    data["memory_bytes"] = "80GB"
    data["memory_bandwith_bytes_per_s"] = data.pop("memory_bandwidth_bytes_per_s")
    data["peak_flops_per_s"]["fp16"] = 1e12
    path = write_yaml(tmp_path, "custom", data)
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    message = str(err.value)
    assert f"{path}: memory_bytes:" in message and "store bytes" in message
    assert f"{path}: memory_bandwith_bytes_per_s: unknown key" in message
    assert "did you mean 'memory_bandwidth_bytes_per_s'" in message
    assert f"{path}: peak_flops_per_s.fp16" in message


def test_bad_kind_name_mismatch_and_bad_efficiency(tmp_path):
    with pytest.raises(ProfileError, match="kind: 'simulation' is not a profile kind"):
        parse_profile({"kind": "simulation"}, "x.yaml")
    with pytest.raises(ProfileError, match="differs from the file name"):
        load_profile(write_yaml(tmp_path, "other_name", simulated_data()))
    data = simulated_data()
    data["compute_efficiency"] = 1.5
    with pytest.raises(ProfileError, match="custom.yaml: compute_efficiency: Input should be"):
        load_profile(write_yaml(tmp_path, "custom", data))


def test_measured_profile_loads_and_validates_tables(tmp_path):
    data = example_measured_profile()
    profile = load_profile(write_yaml(tmp_path, "toy_measured", data))
    assert isinstance(profile, MeasuredProfile)
    assert profile.method.statistic == "median"
    assert profile.tables.decoder_layer_seconds.source_len == 128

    bad = copy.deepcopy(data)
    bad["tables"]["decoder_layer_seconds"]["seconds"] = [[1e-3, 2e-3], [3e-3]]
    bad["tables"]["lm_head_seconds"]["batch_sizes"] = [1, 32, 8]
    bad["environment"]["dtype"] = "fp8"
    path = write_yaml(tmp_path, "toy_measured", bad)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    message = str(err.value)
    assert f"{path}: tables.decoder_layer_seconds: seconds[1] has 1 values" in message
    assert f"{path}: tables.lm_head_seconds: batch_sizes must be strictly increasing" in message
    assert f"{path}: environment.dtype" in message


def test_unknown_profile_suggests_names():
    with pytest.raises(UnknownNameError, match="'h100_sxm'"):
        get_profile("h100")
