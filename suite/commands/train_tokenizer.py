"""``exitbench train-tokenizer``: a T5-style SentencePiece tokenizer trained on task text."""

from __future__ import annotations

import argparse

from suite.errors import ExitbenchError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a SentencePiece tokenizer (T5 ids) on task sources and targets",
        description="Train a SentencePiece tokenizer on the sources and targets of one or more "
                    "tasks, check its unknown-token rate on held-out examples, and write a "
                    "folder that transformers.T5Tokenizer / AutoTokenizer.from_pretrained loads.")
    parser.add_argument("--task", action="append", required=True, dest="tasks",
                        help="task name (repeat for several; see `exitbench ls tasks`)")
    parser.add_argument("--split", default="validation",
                        help="split to train on, hub slice syntax allowed (default: validation)")
    parser.add_argument("--heldout-split", required=True,
                        help="split whose examples measure the unknown-token rate; must not "
                             "overlap --split (e.g. 'validation[:200]' with 'validation[200:]')")
    parser.add_argument("--out", required=True, help="folder to write (replaced when it is a "
                                                     "tokenizer folder from an earlier run)")
    parser.add_argument("--data-dir", default=None,
                        help="folder of JSON Lines in the hub layout (default: $EXITBENCH_DATA_DIR, "
                             "else the hub)")
    parser.add_argument("--vocab-size", type=int, default=4000,
                        help="SentencePiece pieces, specials included (default 4000; T5's 100 "
                             "sentinels come on top)")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--extra-ids", type=int, default=100, help="T5 sentinel tokens (default 100)")
    parser.add_argument("--max-unk-rate", type=float, default=0.01,
                        help="fail when more than this fraction of held-out tokens is <unk> "
                             "(default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many examples per task and split")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suite.tokenizer import TokenizerSettings, task_texts, train_tokenizer

    settings = TokenizerSettings(vocab_size=args.vocab_size, model_type=args.model_type,
                                 character_coverage=args.character_coverage,
                                 extra_ids=args.extra_ids, seed=args.seed,
                                 max_unk_rate=args.max_unk_rate)
    texts, sources = task_texts(args.tasks, args.split, args.data_dir, args.limit)
    heldout, heldout_sources = task_texts(args.tasks, args.heldout_split, args.data_dir, args.limit)
    for train_src, held_src in zip(sources, heldout_sources):
        overlap = set(train_src.example_ids) & set(held_src.example_ids)
        if overlap:
            raise ExitbenchError(
                f"task {train_src.task!r}: {len(overlap)} example(s) of --heldout-split "
                f"{args.heldout_split!r} are also in --split {args.split!r} (e.g. "
                f"{sorted(overlap)[0]!r}); the unknown-token rate must be measured on unseen "
                f"text, so choose disjoint slices such as 'validation[200:]' and "
                f"'validation[:200]'")
    provenance = {
        "train": [{"task": s.task, "split": s.split, "num_examples": s.num_examples}
                  for s in sources],
        "heldout": [{"task": s.task, "split": s.split, "num_examples": s.num_examples}
                    for s in heldout_sources],
        "data_dir": args.data_dir,
    }
    report = train_tokenizer(texts, heldout, args.out, settings, provenance)
    corpus = report.corpus
    print(f"tokenizer  {report.folder}")
    print(f"  vocabulary     {report.vocab_size} tokens ({settings.vocab_size} pieces + "
          f"{report.vocab_size - settings.vocab_size} sentinels), {settings.model_type}")
    print(f"  corpus         {corpus.num_texts} texts -> {corpus.num_lines} distinct lines, "
          f"{corpus.num_bytes:,} bytes; {corpus.num_split_texts} long text(s) split below "
          f"{settings.max_sentence_bytes} bytes; {corpus.num_skipped_lines} line(s) skipped")
    unk = report.heldout
    print(f"  held-out <unk>  {unk.rate:.3%} ({unk.num_unk} of {unk.num_tokens} tokens, "
          f"{args.heldout_split}); limit {settings.max_unk_rate:.2%}")
    print(f"  spiece.model   sha256 {report.spiece_sha256}")
    print(f"  took           {report.seconds:.1f} s")
    return 0
