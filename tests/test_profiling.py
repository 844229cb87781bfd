"""`exitbench profile`: measured tables from the suite's layer loop, written as a profile that
loads and prices; clear errors for devices it cannot use."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml

from suite.backbones.t5 import T5Adapter, random_t5
from suite.cli import main
from suite.cost import MeasuredCosts, full_depth_seconds, price_replay
from suite.measures import MEASURES, ModelDims
from suite.profiles import MeasuredProfile, get_profile, load_profile
from suite.profiling import (
    Entry,
    ProfileSettings,
    ProfilingError,
    Timer,
    measure_profile,
    parse_device,
)

MICRO = dict(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2,
             num_heads=2, d_kv=16)


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("micro") / "model"
    random_t5(seed=0, **MICRO).save_pretrained(folder)
    return folder


def test_profile_command_writes_a_profile_that_loads_and_prices(micro_folder, tmp_path, capsys):
    out = tmp_path / "micro_measured.yaml"
    code = main(["profile", "--device", "cpu", "--model", str(micro_folder),
                 "--batch-sizes", "1,64", "--contexts", "2,512", "--source-len", "32",
                 "--source-lens", "8,128", "--repeats", "2", "--warmup", "1",
                 "--measures", "softmax_margin,classifier_lstm,classifier_single",
                 "--out", str(out)])
    assert code == 0
    assert "profile 'micro_measured'" in capsys.readouterr().out
    profile = load_profile(out)
    assert isinstance(profile, MeasuredProfile) and profile.name == "micro_measured"
    assert profile.model.d_model == 32 and profile.model.num_layers == 2
    assert profile.model.vocab_size == 100 and profile.model.num_encoder_layers == 2
    assert profile.environment.dtype == "float32"
    assert profile.environment.torch_version == str(torch.__version__)
    assert profile.environment.threads == torch.get_num_threads()
    assert profile.method.repeats == 2 and profile.method.warmup == 1
    tables = profile.tables
    assert tables.decoder_layer_seconds.batch_sizes == [1, 64]
    assert tables.decoder_layer_seconds.context_lens == [2, 512]
    assert tables.encoder_prefill_seconds.source_lens == [8, 128]
    assert set(tables.measure_check_seconds) == {"softmax_margin", "classifier_lstm",
                                                 "classifier_single"}
    every_time = [t for row in tables.decoder_layer_seconds.seconds for t in row] \
        + [t for row in tables.encoder_prefill_seconds.seconds for t in row] \
        + tables.lm_head_seconds.seconds + tables.kv_fill_seconds.seconds \
        + [t for table in tables.measure_check_seconds.values() for t in table.seconds] \
        + [tables.fixed_step_seconds]
    assert all(t > 0 for t in every_time)
    decoder = np.array(tables.decoder_layer_seconds.seconds)
    # 64 rows attending to 512 cached keys cost more than one row attending to 2 (3-5x here)
    assert decoder[-1, -1] > decoder[0, 0]
    prefill = np.array(tables.encoder_prefill_seconds.seconds)
    assert prefill[-1, -1] > prefill[0, 0]  # 64 x 128 source tokens vs 1 x 8
    # no anchors/aliases: the file reads as plain YAML
    assert "&id" not in out.read_text(encoding="utf-8")
    assert yaml.safe_load(out.read_text(encoding="utf-8"))["kind"] == "measured"

    dims = ModelDims(num_layers=2, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=100)
    costs = MeasuredCosts(profile, dims, "float32")
    example_index = np.repeat(np.arange(4), 5)
    position = np.tile(np.arange(5), 4)
    source_len = np.full(4, 20)
    full = full_depth_seconds(costs, dims, example_index, position, source_len, 2)
    assert full > 0
    measure = MEASURES.get("softmax_margin")()
    exits = np.zeros((1, example_index.size), np.int64)  # every token exits at layer 0
    priced = price_replay(costs, dims, exits, example_index, position, source_len, 2,
                          measure.check_cost(dims), measure.checked_layers(2),
                          measure_name="softmax_margin")
    assert priced.seconds[0] > 0 and np.isfinite(priced.speedup[0])
    assert priced.breakdown.check_seconds[0] > 0


def test_measure_profile_in_memory_checks_every_measure_that_checks():
    adapter = T5Adapter(random_t5(seed=1, **{**MICRO, "num_layers": 3,
                                             "num_decoder_layers": 3}))
    settings = ProfileSettings(batch_sizes=(1, 2), contexts=(2, 4), source_len=8,
                               source_lens=(8,), repeats=1, warmup=0, min_run_seconds=0.0)
    run = measure_profile(adapter, settings, model_id="micro-3", name="micro3")
    checking = {name for name in MEASURES.names()
                if MEASURES.get(name)().checked_layers(3).any()}
    assert set(run.data["tables"]["measure_check_seconds"]) == checking
    assert {"static_layer", "oracle"} <= set(run.skipped_measures)
    # built-in measures are timed with their real operation, none with a stand-in
    assert all(how.startswith("real") for how in run.check_methods.values()), run.check_methods
    assert set(run.fixed_step_by_batch) == {1, 2}
    assert run.data["model"]["num_layers"] == 3


def test_timer_keeps_setup_out_of_the_timing_and_takes_the_median():
    calls = []

    def setup():
        time.sleep(0.01)

    timer = Timer(torch.device("cpu"), repeats=3, warmup=1, min_run_seconds=0.0)
    entries = {"op": Entry(op=lambda: calls.append(1), setup=setup)}
    seconds = timer.time_entries(entries)["op"]
    assert seconds < 0.005  # the 10 ms set-up is not timed
    assert len(calls) == 1 + 3 and len(entries["op"].runs) == 3
    # a phased entry reports the median of each part it timed itself
    parts = iter([(1.0, 10.0), (3.0, 30.0), (2.0, 99.0), (9.0, 20.0)])
    phased = {"step": Entry(op=lambda: next(parts), phases=("a", "b"))}
    assert timer.time_entries(phased)["step"] == (3.0, 30.0)  # warm-up (1, 10) dropped


def test_unknown_device_and_cuda_without_cuda_are_clear_errors(monkeypatch, micro_folder,
                                                               tmp_path, capsys):
    with pytest.raises(ProfilingError, match="cpu, cuda or cuda:N"):
        parse_device("tpu")
    with pytest.raises(ProfilingError, match="cpu, cuda or cuda:N"):
        parse_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ProfilingError, match="no CUDA GPU"):
        parse_device("cuda:0")
    out = tmp_path / "gpu.yaml"
    code = main(["profile", "--device", "cuda", "--model", str(micro_folder),
                 "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "--device 'cuda' asks for CUDA" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ProfilingError, match="no GPU 3"):
        parse_device("cuda:3")


def test_bad_settings_are_clear_errors(micro_folder, tmp_path, capsys):
    with pytest.raises(ProfilingError, match="context length 1"):
        ProfileSettings(contexts=(1, 8))
    with pytest.raises(ProfilingError, match="--repeats"):
        ProfileSettings(repeats=0)
    assert main(["profile", "--model", str(micro_folder), "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "must name a .yaml file" in capsys.readouterr().err
    assert main(["profile", "--model", str(micro_folder), "--measures", "softmax_margn",
                 "--out", str(tmp_path / "p.yaml")]) == 2
    assert "softmax_margin" in capsys.readouterr().err  # the closest name is suggested
    assert not (tmp_path / "p.yaml").exists()


def test_shipped_cpu_profile_prices_the_tiny_model():
    profile = get_profile("cpu_measured_tiny")
    assert isinstance(profile, MeasuredProfile)
    model = profile.model
    dims = ModelDims(num_layers=model.num_layers, d_model=model.d_model, d_ff=model.d_ff,
                     num_heads=model.num_heads, d_kv=model.d_kv, vocab_size=model.vocab_size)
    assert (dims.num_layers, dims.d_model, dims.d_ff) == (6, 128, 512)
    costs = MeasuredCosts(profile, dims, "float32")
    example_index = np.repeat(np.arange(16), 30)
    position = np.tile(np.arange(30), 16)
    rates = [example_index.size / full_depth_seconds(costs, dims, example_index, position,
                                                     np.full(16, 256), batch)
             for batch in (1, 8)]
    assert 0 < rates[0] < rates[1]  # batching raises throughput on the measured tables
    for name in MEASURES.names():  # every built-in measure that checks has a table
        if MEASURES.get(name)().checked_layers(dims.num_layers).any():
            assert name in profile.tables.measure_check_seconds, name
