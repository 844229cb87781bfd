"""Is a run's backbone worth measuring? Its figures against the targets of issue 14, from a
finished run (``make quickstart`` first, or any ``exitbench run``):

- disagreement: share of held-out generated tokens whose top-1 at a layer differs from the
  final token (every layer shown; the target is >= 10% at the middle layer, ``L / 2``
  1-based);
- distinct tokens: share of outputs of two or more tokens (EOS not counted) holding at
  least two distinct tokens (target >= 90%);
- learned measures: fitted on the fit split's traces (both classes present, or not),
  held-out AUROC of "the layer's prediction will not change" beside softmax_margin's and
  hidden_state_saturation's (layers 3..L-1, where every measure scores);
- quality: the full-depth metric against a trivial answer (SQuAD: the best constant
  answer's F1; CNN/DM: lead-3's ROUGE);
- the leaderboard: how many distinct (quality, tokens/s) points each measure draws on the
  first profile at batch size 1 (one point means a flat line);
- the run's wall time per stage (``run_manifest.json``).

    .venv/bin/python benchmarks/bench_backbone.py --config configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from suite.baselines import best_constant_answer, lead_sentences
    from suite.config import MeasureConfig, load_config
    from suite.learned import compare_auroc
    from suite.measures import get_measure
    from suite.metrics import get_metric
    from suite.results import read_results
    from suite.runner import trace_dir
    from suite.sweep import HiddenStateLoader
    from suite.tasks import load_examples, task_spec
    from suite.traces import TraceStore
    from suite.training import model_label

    started = time.perf_counter()
    config = load_config(args.config)
    out = Path(config.output_dir)
    rows = read_results(out / "results" / "results.json")
    figures: dict = {"config": args.config, "tasks": {}}
    manifest = json.loads((out / "run_manifest.json").read_text())
    figures["stage_seconds"] = {s["name"]: round(s["seconds"], 1) for s in manifest["stages"]}
    print(f"run {out}: stages " + ", ".join(f"{k} {v:.0f} s"
                                             for k, v in figures["stage_seconds"].items())
          + f" (total {sum(figures['stage_seconds'].values()):.0f} s)")
    for model in config.models:
        print(f"backbone {model.name}: {model_label(model)}")
        for task in config.tasks:
            store = TraceStore(trace_dir(out, task.name, model.name))
            traces = store.load()
            num_layers = traces.num_layers
            eos = 1
            disagree = (traces.top1_id != traces.final_id[:, None]).mean(axis=0)
            middle = num_layers // 2  # 1-based
            order = np.argsort(traces.example_id, kind="stable")
            ids, starts = np.unique(traces.example_id[order], return_index=True)
            tokens = np.split(traces.final_id[order], starts[1:])
            body = [t[t != eos] for t in tokens]
            multi = [t for t in body if len(t) >= 2]
            distinct = float(np.mean([len(set(t.tolist())) >= 2 for t in multi])) if multi \
                else float("nan")
            task_figures = {
                "tokens": int(traces.num_tokens), "examples": int(len(ids)),
                "disagreement_by_layer": [round(float(x), 4) for x in disagree],
                "middle_layer": middle, "middle_disagreement": float(disagree[middle - 1]),
                "outputs_of_two_or_more": len(multi), "distinct_share": distinct}
            print(f"  {task.name}: {traces.num_tokens} tokens of {len(ids)} outputs; top-1 "
                  f"differs from the final token at layers 1..{num_layers}: "
                  + " ".join(f"{x:.1%}" for x in disagree)
                  + f" (middle layer {middle}: {disagree[middle - 1]:.1%}, target >= 10%)")
            print(f"    outputs of >= 2 tokens with >= 2 distinct tokens: {distinct:.1%} of "
                  f"{len(multi)} (target >= 90%)")

            # quality against a trivial answer
            ours = [r for r in rows if r.task == task.name and r.model == model.name]
            full = ours[0].quality_full_depth if ours else float("nan")
            examples = load_examples(task_spec(task), task.split, config.data_dir, task.limit)
            metric = ours[0].metric if ours else "?"
            if task.name == "squad":
                constant = best_constant_answer([e.references for e in examples])
                trivial = {"name": f"best constant answer {constant.answer!r}", "value": constant.f1}
            elif task.name in ("cnn_dailymail", "big_patent"):
                from suite.tasks import get_path, load_records

                records, _ = load_records(task_spec(task), task.split, config.data_dir)
                field = "article" if task.name == "cnn_dailymail" else "description"
                leads = [lead_sentences(get_path(r, field)) for r in records][:len(examples)]
                result = get_metric("rouge")(leads, [e.references for e in examples])
                trivial = {"name": "lead-3", "value": result.scores.get(metric, float("nan"))}
            else:
                trivial = {"name": "none defined", "value": float("nan")}
            task_figures["quality"] = {"metric": metric, "full_depth": full, "trivial": trivial}
            print(f"    full-depth {metric} {full:.2f} vs {trivial['name']} "
                  f"{trivial['value']:.2f}")

            # the leaderboard's lines
            first = config.profiles[0] if config.profiles else None
            points = {}
            for r in ours:
                if r.profile == first and r.batch_size == min(config.batch_sizes) \
                        and r.mode == "replay":
                    points.setdefault(r.measure, set()).add((round(r.quality, 3),
                                                             round(r.tokens_per_s, 1)))
            task_figures["distinct_points"] = {m: len(p) for m, p in sorted(points.items())}
            print("    distinct (quality, tokens/s) points per measure on "
                  f"{first}, batch {min(config.batch_sizes)}: "
                  + ", ".join(f"{m} {len(p)}" for m, p in sorted(points.items())))

            # learned measures, fitted as the sweep fits them, beside softmax_margin
            if task.fit_split:
                hidden = HiddenStateLoader(model.path, config.data_dir)
                fit_traces = hidden(trace_dir(out, task.name, model.name, role="fit"))
                held = hidden(trace_dir(out, task.name, model.name))
                fit_labels = fit_traces.top1_id[:, :-1] == fit_traces.final_id[:, None]
                measures, fitted = {}, {}
                for name in ("softmax_margin", "hidden_state_saturation", "classifier_single",
                             "classifier_three_hidden", "classifier_lstm"):
                    measure = get_measure(name)(**MeasureConfig(name=name).options)
                    if measure.needs_fit:
                        try:
                            measure.fit(fit_traces, cache_dir=out / "measures", seed=config.seed)
                            fitted[name] = "fitted"
                        except Exception as exc:  # noqa: BLE001 - reported, as the run does
                            fitted[name] = f"not fitted: {exc}"
                            continue
                    measures[name] = measure
                layers = (np.arange(num_layers) >= 2) & (np.arange(num_layers) < num_layers - 1)
                aurocs = compare_auroc(measures, held, layers)
                task_figures["fit_labels"] = {"will_not_change": int(fit_labels.sum()),
                                              "will_change": int((~fit_labels).sum())}
                task_figures["fitted"] = fitted
                task_figures["auroc"] = {k: v.auroc for k, v in aurocs.items()}
                print(f"    fit split: {fit_labels.sum()} 'will not change' and "
                      f"{(~fit_labels).sum()} 'will change' (token, layer) pairs; "
                      + "; ".join(f"{k}: {v}" for k, v in fitted.items()))
                print("    held-out AUROC (layers 3.." + str(num_layers - 1) + "): "
                      + ", ".join(f"{k} {v.auroc:.3f}" for k, v in aurocs.items()))
            figures["tasks"][f"{task.name}/{model.name}"] = task_figures
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
