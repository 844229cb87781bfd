"""Traced, untraced and teacher-forced decoding through the suite's layer loop, checked
against Hugging Face's own ``generate`` and forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hf_reference import hf_forward

from suite.backbones.t5 import T5Adapter, random_t5
from suite.decoding import (
    forced_traces,
    greedy_decode,
    layer_statistics,
    pad_batch,
    rematerialise_hidden,
    traced_greedy_decode,
)
from suite.errors import ExitbenchError

MAX_NEW_TOKENS = 8
EXAMPLE_IDS = ["ex-a", "ex-b", "ex-c"]


def _sources(vocab: int, lengths=(6, 11, 3), seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() + [1] for n in lengths]


def _pick_eos(rows: list[np.ndarray]) -> tuple[int, int]:
    """A token that one row emits and no other row emits at all: used as EOS, that row
    stops early while the others run to the limit. Prefers a token first emitted after
    step 0 (a stop mid-sequence); random models often repeat one token, so step 0 is the
    fallback. Returns (token, row)."""
    for first_step in (1, 0):
        for row, tokens in enumerate(rows):
            others = set(np.concatenate([r for i, r in enumerate(rows) if i != row]).tolist())
            for step in range(first_step, len(tokens)):
                token = int(tokens[step])
                if token not in tokens[:step] and token not in others:
                    return token, row
    raise AssertionError("every row emits the same tokens; change the seed")


def _hf_teacher_forced(model, ids, mask, targets: list[np.ndarray]):
    """HF's forward over start + targets[:-1]: logits, hidden states (embeddings, then each
    layer un-normed; the last from a hook since HF's last entry is normed)."""
    decoder_inputs, _ = pad_batch([[0, *t[:-1].tolist()] for t in targets], 0)
    out, last = hf_forward(model, ids, mask, decoder_inputs)
    states = torch.stack([*out.decoder_hidden_states[:-1], last])  # [L+1, B, T, d]
    valid = torch.zeros(decoder_inputs.shape, dtype=torch.bool)
    for row, target in enumerate(targets):
        valid[row, : len(target)] = True
    return out.logits[valid], states[:, valid]


@pytest.fixture(scope="module")
def decoded():
    """t5-small architecture, random weights (see suite.backbones.t5.random_t5), three padded
    inputs; EOS chosen so that one row stops early. Decoded by us and by HF generate."""
    adapter = T5Adapter(random_t5(seed=0))
    model = adapter.model
    sources = _sources(model.config.vocab_size)
    ids, mask = pad_batch(sources, 0)
    first = greedy_decode(adapter, ids, mask, MAX_NEW_TOKENS)
    eos, early_row = _pick_eos(first.rows())
    adapter.eos_token_id = eos
    traces = traced_greedy_decode(adapter, ids, mask, EXAMPLE_IDS, MAX_NEW_TOKENS)
    untraced = greedy_decode(adapter, ids, mask, MAX_NEW_TOKENS)
    with torch.inference_mode():
        hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                            do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)
    return {"adapter": adapter, "sources": sources, "ids": ids, "mask": mask, "eos": eos,
            "early_row": early_row, "traces": traces, "untraced": untraced, "hf": hf}


def _hf_rows(hf: torch.Tensor, eos: int) -> list[list[int]]:
    rows = []
    for row in hf[:, 1:].tolist():  # drop the decoder start token
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.mark.slow
def test_traced_and_untraced_decoding_reproduce_hf_generate(decoded):
    traces, eos = decoded["traces"], decoded["eos"]
    expected = _hf_rows(decoded["hf"], eos)
    starts, ends = traces.example_bounds()
    traced_rows = [traces.final_id[s:e].tolist() for s, e in zip(starts, ends)]
    assert traced_rows == expected
    assert [r.tolist() for r in decoded["untraced"].rows()] == expected
    # The EOS step is recorded and ends the early row; the others ran to the limit.
    lengths = [len(r) for r in expected]
    assert lengths[decoded["early_row"]] < MAX_NEW_TOKENS
    assert traced_rows[decoded["early_row"]][-1] == eos
    assert sorted(lengths)[-1] == MAX_NEW_TOKENS


@pytest.mark.slow
def test_trace_layout_and_fields_match_hf_hidden_states(decoded):
    traces, adapter = decoded["traces"], decoded["adapter"]
    traces.validate()
    starts, ends = traces.example_bounds()
    assert traces.example_ids() == EXAMPLE_IDS
    for s, e in zip(starts, ends):
        assert traces.position[s:e].tolist() == list(range(e - s))
    assert np.all(traces.gold_id == -1)
    assert np.array_equal(traces.top1_id[:, -1], traces.final_id)
    assert np.allclose(traces.cos_last[:, -1], 1.0, atol=1e-5)
    assert np.all(traces.top1_prob >= traces.top2_prob) and np.all(traces.top2_prob > 0)

    targets = [traces.final_id[s:e].astype(np.int64) for s, e in zip(starts, ends)]
    logits, states = _hf_teacher_forced(adapter.model, decoded["ids"], decoded["mask"], targets)
    assert np.array_equal(logits.argmax(-1).numpy(), traces.final_id)
    with torch.inference_mode():
        model = adapter.model
        layer_logits = model.lm_head(model.decoder.final_layer_norm(states[1:]) * 512 ** -0.5)
    probs = layer_logits.float().softmax(-1).topk(2, dim=-1).values  # [L, N, 2]
    np.testing.assert_allclose(traces.top1_prob, probs[..., 0].T.numpy(), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(traces.top2_prob, probs[..., 1].T.numpy(), rtol=1e-3, atol=1e-7)
    final_prob = layer_logits.float().softmax(-1).gather(
        -1, torch.as_tensor(traces.final_id, dtype=torch.long)[None, :, None]
        .expand(layer_logits.shape[0], -1, 1))[..., 0]
    np.testing.assert_allclose(traces.final_prob, final_prob.T.numpy(), rtol=1e-3, atol=1e-7)
    cos_prev = F.cosine_similarity(states[1:], states[:-1], dim=-1).T.numpy()
    cos_last = F.cosine_similarity(states[1:], states[-1:], dim=-1).T.numpy()
    np.testing.assert_allclose(traces.cos_prev, cos_prev, atol=1e-4)
    np.testing.assert_allclose(traces.cos_last, cos_last, atol=1e-4)
    # Intermediate predictions agree too (a near-tie may flip, none is expected here).
    agree = traces.top1_id == layer_logits.argmax(-1).T.numpy()
    assert agree.mean() >= 0.99
    # The layers disagree with each other: the traces are not a constant.
    assert len(np.unique(traces.top1_id)) > 3


@pytest.mark.slow
def test_forced_traces_match_hf_teacher_forcing(decoded):
    adapter = decoded["adapter"]
    generator = torch.Generator().manual_seed(7)
    targets = [np.r_[torch.randint(3, 32000, (n,), generator=generator).numpy(), adapter.eos_token_id]
               for n in (4, 1, 6)]
    traces = forced_traces(adapter, decoded["ids"], decoded["mask"], EXAMPLE_IDS, targets)
    traces.validate()
    assert np.array_equal(traces.gold_id, np.concatenate(targets))
    assert traces.position.tolist() == [*range(5), *range(2), *range(7)]
    logits, states = _hf_teacher_forced(adapter.model, decoded["ids"], decoded["mask"], targets)
    assert np.array_equal(traces.final_id, logits.argmax(-1).numpy())
    np.testing.assert_allclose(traces.top1_prob[:, -1],
                               logits.softmax(-1).max(-1).values.numpy(), rtol=1e-4)
    # Hidden states of forced traces re-materialise from the gold tokens.
    sources = dict(zip(EXAMPLE_IDS, decoded["sources"]))
    rebuilt = rematerialise_hidden(adapter, traces, sources, batch_size=2)
    assert rebuilt.mismatched_tokens == 0
    np.testing.assert_allclose(rebuilt.traces.hidden, states[1:].permute(1, 0, 2).numpy(),
                               atol=1e-4)


@pytest.mark.slow
def test_rematerialised_hidden_states_reproduce_the_recorded_tokens(decoded):
    traces, adapter = decoded["traces"], decoded["adapter"]
    sources = dict(zip(EXAMPLE_IDS, decoded["sources"]))
    rebuilt = rematerialise_hidden(adapter, traces, sources, batch_size=2)
    assert rebuilt.mismatched_tokens == 0 and rebuilt.mismatch_rate == 0.0
    hidden = rebuilt.traces.hidden
    assert hidden.shape == (traces.num_tokens, 6, 512) and hidden.dtype == np.float32
    assert np.array_equal(rebuilt.traces.final_id, traces.final_id)
    # The states are the ones the traces were computed from: the recorded cosines follow.
    cos_last = F.cosine_similarity(torch.from_numpy(hidden), torch.from_numpy(hidden[:, -1:]),
                                   dim=-1).numpy()
    np.testing.assert_allclose(cos_last, traces.cos_last, atol=1e-4)
    # A token subset cannot be re-materialised (the decoder needs every earlier token).
    with pytest.raises(ExitbenchError, match="every position"):
        rematerialise_hidden(adapter, traces.take(traces.position > 0), sources)
    with pytest.raises(ExitbenchError, match="no encoder inputs"):
        rematerialise_hidden(adapter, traces, {})


def test_eos_mid_sequence_padding_and_batching_on_a_tiny_model():
    tiny = {"vocab_size": 120, "d_model": 32, "d_ff": 64, "num_layers": 2,
            "num_decoder_layers": 2, "num_heads": 4, "d_kv": 8}
    # Seed chosen so that some row's output changes mid-sequence (asserted below).
    adapter = T5Adapter(random_t5(seed=1, **tiny))
    sources = _sources(120, lengths=(2, 12, 5, 7), seed=5)
    ids, mask = pad_batch(sources, 0)
    eos, early_row = _pick_eos(greedy_decode(adapter, ids, mask, MAX_NEW_TOKENS).rows())
    adapter.eos_token_id = eos
    batched = traced_greedy_decode(adapter, ids, mask, list("abcd"), MAX_NEW_TOKENS)
    with torch.inference_mode():
        hf = adapter.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                    num_beams=1, max_new_tokens=MAX_NEW_TOKENS,
                                    eos_token_id=eos, pad_token_id=0)
    starts, ends = batched.example_bounds()
    assert [batched.final_id[s:e].tolist() for s, e in zip(starts, ends)] == _hf_rows(hf, eos)
    early = batched.final_id[batched.example_id == "abcd"[early_row]]
    assert 1 < len(early) < MAX_NEW_TOKENS and early[-1] == eos  # stopped mid-sequence
    # Each row alone (no padding, batch of one) gives the same trace as in the batch.
    for row, source in enumerate(sources):
        single_ids, single_mask = pad_batch([source], 0)
        single = traced_greedy_decode(adapter, single_ids, single_mask, ["x"], MAX_NEW_TOKENS)
        rows = batched.example_id == "abcd"[row]
        assert np.array_equal(single.final_id, batched.final_id[rows])
        np.testing.assert_allclose(single.top1_prob, batched.top1_prob[rows], rtol=1e-4)
        np.testing.assert_allclose(single.cos_prev, batched.cos_prev[rows], atol=1e-5)
    untraced = greedy_decode(adapter, ids, mask, MAX_NEW_TOKENS)
    assert untraced.lengths.tolist() == [e - s for s, e in zip(starts, ends)]


def test_pad_batch_pads_right_and_rejects_empty_rows():
    ids, mask = pad_batch([[5, 6, 1], [7, 1]], pad_id=0)
    assert ids.tolist() == [[5, 6, 1], [7, 1, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError):
        pad_batch([[5], []], pad_id=0)


def test_layer_statistics_by_hand_with_tied_logits():
    """Two layers, three tokens, a head that returns the hidden state itself as logits."""

    class IdentityHead:
        dims = type("Dims", (), {"vocab_size": 4})()

        def exit_logits(self, layer, hidden):
            return hidden

        def exit_norm(self, layer, hidden):
            return hidden * torch.tensor([1.0, 2.0, 1.0, 1.0])  # a norm weight: cosines change

    embeddings = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]])
    layer0 = torch.tensor([[2.0, 2, 0, 0], [0, 3, 1, 0], [0, 0, 5, 5]])  # ties in rows 0, 2
    layer1 = torch.tensor([[0.0, 0, 0, 9], [0, 1, 0, 0], [1, 0, 0, 0]])
    stats = layer_statistics(IdentityHead(), torch.stack([embeddings, layer0, layer1]))
    assert stats.top1_id.tolist() == [[0, 3], [1, 1], [2, 0]]  # ties go to the first index
    expected = layer0.softmax(-1).topk(2).values
    torch.testing.assert_close(stats.top1_prob[:, 0], expected[:, 0])
    torch.testing.assert_close(stats.top2_prob[:, 0], expected[:, 1])
    torch.testing.assert_close(stats.cos_prev[:, 0], F.cosine_similarity(layer0, embeddings))
    torch.testing.assert_close(stats.cos_prev[:, 1], F.cosine_similarity(layer1, layer0))
    torch.testing.assert_close(stats.cos_last[:, 0], F.cosine_similarity(layer0, layer1))
    torch.testing.assert_close(stats.cos_last[:, 1], torch.ones(3))
    # final_prob: each layer's probability of the last layer's prediction [3, 1, 0]
    final = torch.tensor([3, 1, 0])
    torch.testing.assert_close(stats.final_prob[:, 0], layer0.softmax(-1)[torch.arange(3), final])
    torch.testing.assert_close(stats.final_prob[:, 1], stats.top1_prob[:, 1])
    # the study's cosines: between final-normed states (here the norm doubles dimension 1)
    weight = torch.tensor([1.0, 2.0, 1.0, 1.0])
    torch.testing.assert_close(stats.cos_prev_normed[:, 0],
                               F.cosine_similarity(layer0 * weight, embeddings * weight))
    torch.testing.assert_close(stats.cos_last_normed[:, 0],
                               F.cosine_similarity(layer0 * weight, layer1 * weight))
    assert not torch.allclose(stats.cos_prev_normed[:, 0], stats.cos_prev[:, 0])
