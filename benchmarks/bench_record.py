"""Record-stage throughput with 1 and 2 Ray workers, and the scaling efficiency.

Both runs record the same task split with the same model into fresh directories, one
after the other in one process (in-process Ray on 127.0.0.1, one CPU thread per worker),
so the ratio is measured side by side. Scaling efficiency = (tokens/s with 2 workers) /
(2 x tokens/s with 1 worker).

Default model: a random-weight T5 of the ``tiny`` preset's size (6+6 layers, d_model 128)
with a tokenizer trained on the SQuAD sample; pass ``--model`` for a trained one (e.g.
runs/quickstart/models/tiny-calm after the quickstart).

    .venv/bin/python benchmarks/bench_record.py [--model DIR] [--examples 256]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_model(root: Path) -> Path:
    from suite.backbones.t5 import random_t5
    from suite.tokenizer import (
        TokenizerSettings,
        copy_tokenizer_files,
        load_tokenizer,
        task_texts,
        train_tokenizer,
    )

    samples = REPO_ROOT / "data" / "samples"
    texts, _ = task_texts(["squad"], "validation[200:]", samples)
    heldout, _ = task_texts(["squad"], "validation[:200]", samples)
    train_tokenizer(texts, heldout, root / "tokenizer", TokenizerSettings(vocab_size=4000))
    vocab_size = len(load_tokenizer(root / "tokenizer"))
    model = random_t5(seed=0, vocab_size=vocab_size, d_model=128, d_ff=512, num_layers=6,
                      num_decoder_layers=6, num_heads=4, d_kv=32)
    model.save_pretrained(root / "model")
    copy_tokenizer_files(root / "tokenizer", root / "model")
    return root / "model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()

    from suite.config import parse_config
    from suite.runner import init_ray, run_record_stage
    from suite.traces import TraceStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = Path(args.model) if args.model else default_model(root)
        init_ray(None, num_cpus=2)
        rates = {}
        for workers in (1, 2):
            out = root / f"run-{workers}"
            config = parse_config({
                "output_dir": str(out), "data_dir": str(REPO_ROOT / "data" / "samples"),
                "tasks": [{"name": "squad", "split": f"validation[:{args.examples}]",
                           "max_new_tokens": args.max_new_tokens, "max_source_tokens": 256}],
                "models": [{"name": "bench", "path": str(model)}],
                "record_batch_size": 8, "shard_size": 8,
                "ray": {"record_workers": workers, "cpus_per_worker": 1}})
            started = time.perf_counter()
            report = run_record_stage(config, progress=False)
            seconds = time.perf_counter() - started
            traces = TraceStore(out / "traces" / "squad" / "bench" / "generated").load()
            rates[workers] = traces.num_tokens / seconds
            print(f"{workers} worker(s): {report.done} shards, {traces.num_tokens} tokens in "
                  f"{seconds:.1f} s -> {rates[workers]:.1f} tokens/s (worker start included)")
        efficiency = rates[2] / (2 * rates[1])
        print(f"speedup 2 vs 1 workers: {rates[2] / rates[1]:.2f}x; scaling efficiency "
              f"{efficiency:.0%}")


if __name__ == "__main__":
    main()
