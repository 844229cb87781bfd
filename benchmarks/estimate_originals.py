"""What the originals' setups (``configs/originals/*.yaml``) cost on an A100 or H100,
estimated with the suite's own cost model (:class:`suite.cost.SimulatedCosts`, the
roofline prices the replay uses), not measured. Prints the table in docs/finetuning.md.

- **Training step** (per GPU, data parallel): 3 x the forward pass (the backward pass costs
  about twice the forward): the encoder over the source (``encoder_prefill``), every decoder
  layer teacher-forced over the target (``decoder_layer`` with ``query_len`` = target
  length), and the LM head over every target token at each trained exit (all ``L`` for
  CALM, two for FREE). Plus the optimizer update, memory-bound: 16 bytes per parameter
  (weight read and write, gradient read, Adafactor's factored state). DDP's all-reduce is
  left out (it overlaps the backward pass on NVLink), so the figure is ideal scaling.
- **Recording**: full-depth greedy decoding of the evaluated split and of the fit split,
  ``record_batch_size`` rows at a time, in the config's ``dtype``, split over the recording
  workers (``full_depth_seconds``), plus the LM head at every other layer (traces hold
  every layer's prediction). The roofline has no Python overhead beyond its fixed cost per
  step: eager decoding in this suite is slower.
- Token lengths: mean words of the bundled samples x 1.3 T5 pieces per English word and 1.5
  per French word (an assumption; T5's tokenizer is not available offline), sources capped
  at the config's ``max_source_tokens``.

    .venv/bin/python benchmarks/estimate_originals.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
T5_LARGE = dict(num_layers=24, d_model=1024, d_ff=4096, num_heads=16, d_kv=64, vocab_size=32128)
T5_LARGE_PARAMS = 737_668_096
PIECES_PER_WORD = {"en": 1.3, "fr": 1.5}
SPLIT_SIZES = {("squad", "validation"): 10_570, ("cnn_dailymail", "validation"): 13_368,
               ("wmt15_en_fr", "validation"): 3_000}
"""Examples of the hub's splits (SQuAD v1.1 dev 10,570; CNN/DM 3.0.0 validation 13,368;
WMT15 fr-en validation, newstest2014, ~3,000)."""


def mean_lengths(task: str, samples: Path) -> tuple[float, float]:
    from suite.tasks import get_task, load_examples

    examples = load_examples(get_task(task), "validation", samples)
    target_language = "fr" if task == "wmt15_en_fr" else "en"
    source = np.mean([len(e.source.split()) for e in examples]) * PIECES_PER_WORD["en"]
    target = np.mean([len(e.target.split()) for e in examples]) * PIECES_PER_WORD[target_language]
    return float(source), float(target) + 1  # + EOS


def main() -> None:
    from suite.config import load_config
    from suite.cost import SimulatedCosts, full_depth_seconds
    from suite.measures import ModelDims
    from suite.profiles import PROFILES
    from suite.tasks import get_task, split_base

    dims = ModelDims(**T5_LARGE)
    rows = []
    for path in sorted((REPO / "configs" / "originals").glob("*.yaml")):
        config = load_config(path)
        task = config.tasks[0]
        spec = get_task(task.name)
        source, target = mean_lengths(task.name, REPO / "data" / "samples")
        source = min(source, task.max_source_tokens or spec.limits.max_source_tokens)
        new_tokens = min(target, task.max_new_tokens or spec.limits.max_new_tokens)
        for model in config.models:
            train = model.train
            workers = train.workers or 1
            per_gpu = train.batch_size / workers
            heads = dims.num_layers if train.objective == "calm" else 2
            for profile_name in ("a100_sxm_80gb", "h100_sxm"):
                profile = PROFILES.get(profile_name)
                cells = {}
                for dtype in ("float32", "bfloat16"):
                    costs = SimulatedCosts(profile, dims, dtype)
                    forward = (costs.encoder_prefill(per_gpu, source)
                               + dims.num_layers * costs.decoder_layer(per_gpu, target, source,
                                                                       query_len=target)
                               + heads * costs.lm_head(per_gpu * target))
                    update = 16 * T5_LARGE_PARAMS / costs.bandwidth_bytes_per_s
                    step = 3 * float(forward) + update
                    cells[dtype] = step * train.steps / 3600
                record = SimulatedCosts(profile, dims, config.dtype)
                decoded = 0.0
                for split, limit in ((task.split, task.limit), (task.fit_split, task.fit_limit)):
                    if split is None:
                        continue
                    base = split_base(split)
                    count = SPLIT_SIZES.get((task.name, base), 10_000)
                    if "[:" in split:
                        count = min(count, int(split.split("[:")[1].rstrip("]")))
                    count = min(count, limit or count)
                    per_example = max(1, int(round(new_tokens)))
                    example_index = np.repeat(np.arange(count), per_example)
                    position = np.tile(np.arange(per_example), count)
                    decoded += full_depth_seconds(record, dims, example_index, position,
                                                  np.full(count, int(source)),
                                                  config.record_batch_size)
                    # traces read every layer's prediction: L - 1 more LM heads per step
                    steps = -(-count // config.record_batch_size) * per_example
                    decoded += steps * (dims.num_layers - 1) * float(
                        record.lm_head(config.record_batch_size))
                record_minutes = decoded / 60 / config.ray.record_workers
                rows.append((path.stem, model.name, workers, train.batch_size, train.steps,
                             profile_name, cells["float32"], cells["bfloat16"], record_minutes))
    print("| config | model | GPUs | global batch | steps | GPU | train h (fp32) | train h (bf16) "
          "| record min |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name, model, gpus, batch, steps, gpu, fp32, bf16, record in rows:
        print(f"| {name} | {model} | {gpus} | {batch} | {steps:,} | {gpu} | {fp32:,.1f} | "
              f"{bf16:,.1f} | {record:.1f} |")
    print("\nHours are wall-clock with every GPU of the row busy (GPU-hours = hours x GPUs); "
          "estimated with the suite's roofline cost model, not measured.")


if __name__ == "__main__":
    main()
