"""How examples become token ids for each backbone family, and when generation stops.

- **Encoder-decoder (T5)**: the encoder reads the task's ``input_template`` text cut to
  ``max_source_tokens - 1`` and ended with EOS; targets likewise
  (:func:`suite.record.encode_texts`, unchanged).
- **Decoder-only (Llama, Mistral, Qwen)**: the model reads the task's ``prompt_template``
  (a plain few-line prompt ending where the answer starts, e.g. ``...\\nAnswer:``), or that
  prompt as the user turn of the tokenizer's chat template when the model's config entry
  says ``chat_template: true``. The tokenizer's own leading special tokens (Llama's BOS;
  Qwen has none) are kept; no EOS is appended. A prompt over ``max_source_tokens`` keeps
  its leading special tokens and its **last** tokens, so the instruction at the end (where
  the answer starts) survives. The target is the continuation of the prompt: the tokens
  that ``prompt + separator + target`` has after the prompt's own tokens (the
  lm-evaluation-harness way of splitting a context and its continuation), cut to
  ``max_target_tokens - 1``, then EOS.

Stop conditions: generation stops at any of the checkpoint's EOS ids and, for decoder-only
models, at any token whose text contains one of the task's ``stop_strings`` (a newline
after a short answer). A stop token ends the output and is not part of its text; the
token containing a stop string is the last one recorded, like EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from suite.errors import ExitbenchError
from suite.tasks import Example, TaskSpec


@dataclass(frozen=True)
class PromptFormat:
    """How one (task, model) turns examples into token ids and where its outputs stop."""

    decoder_only: bool
    eos_token_id: int
    stop_token_ids: tuple[int, ...]
    """Ids that end generation and cut replayed outputs (EOS first)."""
    chat_template: bool = False

    def generation(self) -> dict:
        """What the trace manifest records of it (only for decoder-only models, so that T5
        manifests, and the keys built on them, are as before)."""
        if not self.decoder_only:
            return {}
        return {"prompt": "chat_template" if self.chat_template else "plain",
                "stop_token_ids": list(self.stop_token_ids)}


def prompt_format(tokenizer, task: TaskSpec, *, decoder_only: bool,
                  eos_token_ids: Sequence[int], chat_template: bool = False) -> PromptFormat:
    """The format of ``task`` for a model (its EOS ids first)."""
    eos = [int(i) for i in eos_token_ids]
    if not eos:
        raise ExitbenchError("the model names no EOS token; generation could not stop")
    if not decoder_only:
        if chat_template:
            raise ExitbenchError("chat_template: true is for decoder-only models; T5 reads "
                                 "the task's input template")
        return PromptFormat(decoder_only=False, eos_token_id=eos[0], stop_token_ids=(eos[0],))
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ExitbenchError(f"task {task.name!r}: the config asks for the chat template, but "
                             f"the model's tokenizer has none; drop chat_template or use a "
                             f"tokenizer with one (tokenizer_config.json's chat_template)")
    stops = dict.fromkeys(eos)
    for token in stop_string_tokens(tokenizer, task.stop_strings):
        stops.setdefault(token, None)
    return PromptFormat(decoder_only=True, eos_token_id=eos[0], stop_token_ids=tuple(stops),
                        chat_template=chat_template)


def stop_string_tokens(tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """Ids of the vocabulary's tokens whose text contains a stop string (one pass over the
    vocabulary; special tokens excluded)."""
    if not stop_strings:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return [i for i, text in zip(ids, texts) if any(s in text for s in stop_strings)]


def prompt_text(tokenizer, example: Example, fmt: PromptFormat) -> str:
    """The text a decoder-only model reads for ``example``."""
    text = example.prompt if example.prompt is not None else example.source
    if fmt.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    return text


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default (Llama's BOS)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def encode_prompts(tokenizer, texts: Sequence[str], max_tokens: int, *,
                   chat_template: bool = False) -> list[list[int]]:
    """Decoder-only prompt ids: leading special tokens (none when the text comes from a chat
    template, which writes its own), then the text's tokens, the last ones kept when over
    ``max_tokens``."""
    prefix = [] if chat_template else special_prefix(tokenizer)
    if max_tokens <= len(prefix):
        raise ExitbenchError(f"a prompt limit of {max_tokens} tokens leaves no room for text")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    keep = max_tokens - len(prefix)
    return [prefix + list(ids[-keep:]) for ids in encoded]


def encode_sources(tokenizer, examples: Sequence[Example], fmt: PromptFormat,
                   max_tokens: int) -> list[list[int]]:
    """What the model reads for each example: encoder inputs or decoder-only prompts."""
    if not fmt.decoder_only:
        from suite.record import encode_texts

        return encode_texts(tokenizer, [e.source for e in examples], max_tokens,
                            fmt.eos_token_id)
    return encode_prompts(tokenizer, [prompt_text(tokenizer, e, fmt) for e in examples],
                          max_tokens, chat_template=fmt.chat_template)


def encode_targets(tokenizer, examples: Sequence[Example], fmt: PromptFormat,
                   max_tokens: int) -> list[list[int]]:
    """Gold target ids, ended with EOS: T5's encoded target, or the prompt's continuation."""
    if not fmt.decoder_only:
        from suite.record import encode_texts

        return encode_texts(tokenizer, [e.target for e in examples], max_tokens,
                            fmt.eos_token_id)
    if max_tokens < 1:
        raise ExitbenchError(f"a token limit of {max_tokens} leaves no room for EOS")
    separator = "" if fmt.chat_template else " "
    prompts = [prompt_text(tokenizer, e, fmt) for e in examples]
    contexts = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    wholes = tokenizer([p + separator + e.target for p, e in zip(prompts, examples)],
                       add_special_tokens=False)["input_ids"]
    targets = []
    for context, whole, example in zip(contexts, wholes, examples):
        if list(whole[:len(context)]) == list(context) and len(whole) > len(context):
            continuation = list(whole[len(context):])
        else:  # the joint tokenisation merged across the boundary: encode the target alone
            continuation = tokenizer(separator + example.target,
                                     add_special_tokens=False)["input_ids"]
        targets.append(continuation[:max_tokens - 1] + [fmt.eos_token_id])
    return targets
