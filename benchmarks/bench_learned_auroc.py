"""Learned measures vs softmax_margin: AUROC of "the layer's prediction will not change"
against "will change", on held-out traces of a tiny T5 trained here.

Steps (all offline, resumable under --out): a tokenizer and a tiny T5 trained on the SQuAD
sample's validation[200:] (the objective is an option: ``vanilla`` leaves intermediate layers
untrained, so their predictions change often; ``calm`` trains every exit), traces of
validation[200:500] (fit) and validation[:200] (held out) — reference-forced by default,
since a model this small repeats one token when left to generate — hidden states re-materialised,
each learned measure fitted on the fit traces (5 epochs, consistency labels), then AUROC on
the held-out traces over layers 2..L-1 (where every measure, classifier_three_hidden
included, gives a score), next to softmax_margin's and hidden_state_saturation's.

    .venv/bin/python benchmarks/bench_learned_auroc.py [--objective vanilla] [--steps 200]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = REPO_ROOT / "data" / "samples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="vanilla", choices=["vanilla", "calm", "free"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/bench-auroc")
    parser.add_argument("--kind", default="forced", choices=["forced", "generated"],
                        help="forced (teacher forcing on the gold answers; a tiny model's own "
                             "greedy output repeats one token, which leaves one class) or "
                             "generated traces")
    args = parser.parse_args()

    from suite.config import ModelConfig, TaskConfig
    from suite.learned import compare_auroc
    from suite.measures import MEASURES
    from suite.record import load_hidden_states, record_task
    from suite.tokenizer import TokenizerSettings, read_metadata, task_texts, train_tokenizer
    from suite.training import TrainSettings, read_model_metadata, train

    out = Path(args.out)
    started = time.perf_counter()
    if read_metadata(out / "tokenizer") is None:
        texts, _ = task_texts(["squad"], "validation[200:]", SAMPLES)
        heldout, _ = task_texts(["squad"], "validation[:200]", SAMPLES)
        train_tokenizer(texts, heldout, out / "tokenizer", TokenizerSettings(vocab_size=4000))
    model_dir = out / f"tiny-{args.objective}"
    try:
        read_model_metadata(model_dir)
    except Exception:  # noqa: BLE001 - not trained yet
        train(TrainSettings(objective=args.objective, preset="tiny", tasks=("squad",),
                            split="validation[200:]", max_source_tokens=256, steps=args.steps,
                            batch_size=16, learning_rate=3e-3), out / "tokenizer", model_dir,
              data_dir=SAMPLES)
    model = ModelConfig(name=model_dir.name, path=str(model_dir))
    dirs = {}
    for role, split in (("fit", "validation[200:500]"), ("heldout", "validation[:200]")):
        dirs[role] = out / "traces" / args.kind / role
        record_task(TaskConfig(name="squad", split=split, max_source_tokens=256), model,
                    args.kind, dirs[role], data_dir=str(SAMPLES), batch_size=16,
                    shard_size=100, progress=False)
    fit = load_hidden_states(dirs["fit"], model_path=str(model_dir), data_dir=str(SAMPLES))
    held = load_hidden_states(dirs["heldout"], model_path=str(model_dir), data_dir=str(SAMPLES))
    print(f"backbone: tiny T5 trained here ({args.objective}, {args.steps} steps) on 764 SQuAD "
          f"sample questions; {args.kind} traces; fit {fit.traces.num_tokens} tokens, held-out "
          f"{held.traces.num_tokens} tokens, hidden-state mismatch "
          f"{fit.mismatch_rate:.2%} / {held.mismatch_rate:.2%}")
    measures = {}
    for name in ("softmax_margin", "hidden_state_saturation", "classifier_single",
                 "classifier_three_hidden", "classifier_lstm"):
        measure = MEASURES.get(name)()
        if measure.needs_fit:
            measure.fit(fit.traces, cache_dir=out / "measures", seed=0)
        measures[name] = measure
    num_layers = held.traces.num_layers
    layers = (np.arange(num_layers) >= 2) & (np.arange(num_layers) < num_layers - 1)
    results = compare_auroc(measures, held.traces, layers)
    print(f"{'measure':<26}{'AUROC':>8}   per layer (layers 3..{num_layers - 1}, 1-based)")
    for name, result in results.items():
        per_layer = " ".join(f"{x:.3f}" for x in np.asarray(result.per_layer)[layers])
        print(f"{name:<26}{result.auroc:>8.3f}   {per_layer}")
    first = next(iter(results.values()))
    print(f"pairs {first.num_pairs}, share 'will not change' {first.positive_fraction:.2%}; "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
