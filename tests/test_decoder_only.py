"""The decoder-only adapter (suite/backbones/decoder_only.py) on random-weight models of the
real Llama, Mistral (sliding window), Qwen2 and Qwen3 architectures, configs written here
(no download): traced greedy decoding equals HF ``generate``, exit heads equal HF's logits
and the final norm + LM head on HF's hidden states, online decoding with exits that never
fire reproduces full depth, CALM propagation and FREE's catch-up against hand-built
references. ``initializer_range=0.1`` makes random layers disagree (HF's 0.02 lets the
embedding dominate and every layer repeat one token), so the checks can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from suite.backbones.decoder_only import (
    DecoderOnlyAdapter,
    causal_exit_logits,
    generation_positions,
    left_align,
    random_causal_lm,
)
from suite.decoding import forced_traces, greedy_decode, pad_batch, traced_greedy_decode
from suite.errors import ExitbenchError
from suite.measures import get_measure
from suite.models import DecoderAdapter, load_adapter
from suite.online import ExitPolicy, online_greedy_decode

ARCHITECTURES = {
    "llama": {},
    # a window shorter than prompt + output, so the sliding mask and cache matter
    "mistral": {"sliding_window": 6},
    "qwen2": {},  # q/k/v biases
    "qwen3": {"head_dim": 16},  # q/k norms
}
STEPS = 14
LENGTHS = (5, 11, 1, 8)
IDS = list("abcd")


def _model(model_type: str, **overrides):
    return random_causal_lm(model_type, seed=0, initializer_range=0.1,
                            **{**ARCHITECTURES[model_type], **overrides})


def _prompts(vocab: int = 256, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


def _hf_generate(model, prompts, pad_id, eos_id, steps=STEPS) -> list[list[int]]:
    """HF's own greedy ``generate`` over the left-padded batch, each row cut after EOS."""
    ids, mask = left_align(*pad_batch(prompts, pad_id), pad_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos_id)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
    return rows


def _traced_rows(traces) -> list[list[int]]:
    return [traces.final_id[traces.example_id == e].tolist() for e in traces.example_ids()]


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request):
    model_type = request.param
    model = _model(model_type)
    prompts = _prompts()
    # EOS: a token the model emits mid-way in some rows, so rows finish at different steps
    probe = _hf_generate(model, prompts, 0, eos_id=10_000)
    eos = probe[1][4]
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    adapter = DecoderOnlyAdapter(model, model_id=f"random-{model_type}")
    ids, mask = pad_batch(prompts, adapter.pad_token_id)
    return {"type": model_type, "model": model, "adapter": adapter, "prompts": prompts,
            "ids": ids, "mask": mask, "eos": eos}


def test_adapter_implements_the_protocol_and_reports_dims(arch):
    adapter = arch["adapter"]
    assert isinstance(adapter, DecoderAdapter)
    assert adapter.num_layers == 4 and adapter.dims.d_model == 64
    assert adapter.dims.d_kv == (16 if arch["type"] == "qwen3" else 16)
    assert adapter.eos_token_id == arch["eos"] and adapter.pad_token_id == 0


def test_traced_final_tokens_equal_hf_generate_batched_and_padded(arch):
    adapter = arch["adapter"]
    expected = _hf_generate(arch["model"], arch["prompts"], adapter.pad_token_id, arch["eos"])
    assert len({len(r) for r in expected}) > 1, "rows should finish at different steps"
    traces = traced_greedy_decode(adapter, arch["ids"], arch["mask"], IDS, STEPS)
    assert _traced_rows(traces) == expected
    plain = greedy_decode(adapter, arch["ids"], arch["mask"], STEPS)
    assert [r.tolist() for r in plain.rows()] == expected
    # batch 1 too (no padding at all)
    single = greedy_decode(adapter, *pad_batch([arch["prompts"][1]], 0), STEPS)
    assert single.rows()[0].tolist() == expected[1]


def test_exit_logits_equal_hf_logits_and_the_head_on_hf_hidden_states(arch):
    """One parallel pass of ours over prompt + continuation, against HF's forward over the
    same left-padded batch: every layer's output is HF's hidden state, the last layer's exit
    head gives HF's logits, an intermediate one the final norm + LM head of HF's state."""
    adapter, model = arch["adapter"], arch["model"]
    prompts = arch["prompts"]
    continuation = torch.randint(3, 256, (len(prompts), 5),
                                 generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        state = adapter.start(arch["ids"], arch["mask"], use_cache=False)
        hidden = adapter.begin_step(state, torch.cat([state.first_input_ids, continuation], 1))
        ours = [hidden]
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
            ours.append(hidden)
        left_ids, left_mask = left_align(arch["ids"], arch["mask"], 0)
        full_ids = torch.cat([left_ids, continuation], 1)
        full_mask = torch.cat([left_mask, torch.ones_like(continuation)], 1)
        out = model(input_ids=full_ids, attention_mask=full_mask,
                    position_ids=generation_positions(full_mask), output_hidden_states=True)
        width = continuation.shape[1] + 1  # the last prompt token and the continuation
        hf_states = [h[:, -width:] for h in out.hidden_states]
        for layer in range(adapter.num_layers):  # embeddings and raw layer outputs
            torch.testing.assert_close(ours[layer], hf_states[layer], rtol=1e-4, atol=1e-5)
        # HF's last entry is normed; ours is raw and its head gives HF's logits
        torch.testing.assert_close(model.model.norm(ours[-1]), hf_states[-1], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(adapter.exit_logits(adapter.num_layers - 1, ours[-1]),
                                   out.logits[:, -width:], rtol=1e-4, atol=1e-4)
        middle = 1
        torch.testing.assert_close(model.lm_head(adapter.exit_norm(middle, ours[middle + 1])),
                                   adapter.exit_logits(middle, ours[middle + 1]))
        torch.testing.assert_close(adapter.exit_logits(middle, ours[middle + 1]),
                                   model.lm_head(model.model.norm(hf_states[middle + 1])),
                                   rtol=1e-4, atol=1e-4)


def test_forced_traces_read_the_targets(arch):
    adapter = arch["adapter"]
    targets = [[5, 6, arch["eos"]], [7, arch["eos"]], [8, 9, 10, arch["eos"]], [arch["eos"]]]
    traces = forced_traces(adapter, arch["ids"], arch["mask"], IDS, targets)
    assert traces.gold_id.tolist() == [t for row in targets for t in row]
    traces.validate()


def policy(name, threshold, min_layer=0, **options):
    return ExitPolicy(get_measure(name)(**options), threshold, min_layer)


@pytest.mark.parametrize("name,options", [("softmax_margin", {}), ("hidden_state_saturation", {}),
                                          ("free_shallow_deep", {"shallow_layer": 1})])
def test_a_threshold_that_never_exits_reproduces_full_depth_online(arch, name, options):
    adapter = arch["adapter"]
    reference = greedy_decode(adapter, arch["ids"], arch["mask"], STEPS)
    out = online_greedy_decode(adapter, arch["ids"], arch["mask"], IDS, STEPS,
                               policy(name, float("inf"), **options))
    assert np.array_equal(out.decoded.token_ids, reference.token_ids)
    assert np.all(out.traces.exit_layer == adapter.num_layers - 1)


def _hf_pass(model, prompt: list[int], tokens: list[int]):
    """HF's forward over one prompt and the tokens fed after it (no padding)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[*prompt, *tokens]]), output_hidden_states=True)


@pytest.mark.parametrize("min_layer", [0, 2])
def test_always_exiting_at_min_layer_matches_a_hand_built_calm_reference(arch, min_layer):
    """Every token exits at min_layer: each output token is the exit head of HF's state after
    layer min_layer over the prompt and the tokens so far, and every skipped layer's cache
    holds, at each generated position, the rotated K and the V its attention computes from
    that (propagated) state."""
    adapter, model = arch["adapter"], arch["model"]
    prompt = arch["prompts"][1]
    out = online_greedy_decode(adapter, *pad_batch([prompt], 0), ["b"], STEPS,
                               policy("static_layer", 0.0, min_layer))
    tokens = out.decoded.rows()[0].tolist()
    assert np.all(out.traces.exit_layer == min_layer)
    reference: list[int] = []
    for _ in range(len(tokens)):
        states = _hf_pass(model, prompt, reference).hidden_states
        with torch.inference_mode():
            reference.append(int(causal_exit_logits(model, states[min_layer + 1][0, -1])
                                 .argmax()))
        if reference[-1] == adapter.eos_token_id:
            break
    assert tokens == reference
    # propagation, by hand: K = rope(k_proj(input_norm(h))), V = v_proj(input_norm(h)) at the
    # generated positions (the prompt's were prefilled at full depth); the last token's
    # state is never fed back, so the cache ends one position short of the output
    full = _hf_pass(model, prompt, tokens[:-1])
    exited = full.hidden_states[min_layer + 1][0, len(prompt) - 1:]  # [T, d]
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + exited.shape[0])[None]
    cos, sin = model.model.rotary_emb(exited[None], positions)
    for layer in range(min_layer + 1, adapter.num_layers):
        block = model.model.layers[layer]
        attention = block.self_attn
        with torch.inference_mode():
            normed = block.input_layernorm(exited)
            keys = attention.k_proj(normed).view(exited.shape[0], -1, attention.head_dim)
            if hasattr(attention, "k_norm"):
                keys = attention.k_norm(keys)
            keys = keys.transpose(0, 1)  # [heads, T, head_dim]
            half = keys.shape[-1] // 2
            rotated = torch.cat([-keys[..., half:], keys[..., :half]], -1)
            keys = keys * cos + rotated * sin
            values = attention.v_proj(normed).view(exited.shape[0], -1,
                                                   attention.head_dim).transpose(0, 1)
        cache = out.state.cache.layers[layer]
        window = exited.shape[0] if arch["type"] != "mistral" else min(
            exited.shape[0], cache.keys.shape[2])
        torch.testing.assert_close(cache.keys[0, :, -window:], keys[:, -window:], rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(cache.values[0, :, -window:], values[:, -window:],
                                   rtol=1e-4, atol=1e-5)


def test_free_catch_up_matches_a_full_parallel_pass(arch):
    """FREE: tokens that exit at the shallow layer get their deep K/V in the next deep
    token's parallel pass, so every token equals HF's pass over the emitted prefix: the
    shallow head where it exited, the last layer's elsewhere."""
    adapter, model = arch["adapter"], arch["model"]
    shallow, mixed = 1, 0
    measure = get_measure("free_shallow_deep")(shallow_layer=shallow)
    traced = traced_greedy_decode(adapter, arch["ids"], arch["mask"], IDS, STEPS)
    scores = measure.scores(traced)[:, shallow]
    for prompt in arch["prompts"]:
        for threshold in np.quantile(scores, [0.4, 0.7]):  # exits mixed across layers
            out = online_greedy_decode(adapter, *pad_batch([prompt], 0), ["x"], STEPS,
                                       policy("free_shallow_deep", threshold,
                                              shallow_layer=shallow))
            tokens = out.decoded.rows()[0].tolist()
            exits = out.traces.exit_layer
            mixed += len(set(exits.tolist())) == 2
            result = _hf_pass(model, prompt, tokens[:-1])
            start = len(prompt) - 1
            with torch.inference_mode():
                shallow_pred = causal_exit_logits(
                    model, result.hidden_states[shallow + 1][0, start:]).argmax(-1)
            expected = torch.where(torch.from_numpy(exits == shallow), shallow_pred,
                                   result.logits[0, start:].argmax(-1))
            assert tokens == expected.tolist()
    assert mixed >= 2, "too few decodes mixed shallow and deep tokens to test catch-up"


@pytest.mark.parametrize("name,threshold", [("softmax_margin", 0.05),
                                            ("hidden_state_saturation", 0.9)])
def test_batched_and_batch_1_online_decoding_agree(arch, name, threshold):
    adapter = arch["adapter"]
    exit_policy = policy(name, threshold)
    batched = online_greedy_decode(adapter, arch["ids"], arch["mask"], IDS, STEPS, exit_policy)
    for row, prompt in enumerate(arch["prompts"]):
        single = online_greedy_decode(adapter, *pad_batch([prompt], 0), [IDS[row]], STEPS,
                                      exit_policy)
        assert single.decoded.rows()[0].tolist() == batched.decoded.rows()[row].tolist()


def test_load_adapter_chooses_the_family_and_refuses_what_does_not_fit(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _model("qwen2").save_pretrained(tmp_path / "qwen2")
    adapter = load_adapter(str(tmp_path / "qwen2"))
    assert isinstance(adapter, DecoderOnlyAdapter) and adapter.num_layers == 4
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ExitbenchError, match="gpt2.*learned absolute positions"):
        load_adapter(str(tmp_path / "gpt2"))
    with pytest.raises(ExitbenchError, match="not supported by the decoder-only adapter"):
        DecoderOnlyAdapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                      vocab_size=32)))


def test_logit_soft_capping_and_scaling_from_the_config_are_applied():
    model = _model("llama")
    hidden = torch.randn(3, 64)
    with torch.inference_mode():
        plain = model.lm_head(model.model.norm(hidden))
        model.config.final_logit_softcapping = 0.5
        capped = causal_exit_logits(model, hidden)
        model.config.final_logit_softcapping = None
        model.config.logit_scale = 2.0
        scaled = causal_exit_logits(model, hidden)
    torch.testing.assert_close(capped, torch.tanh(plain / 0.5) * 0.5)
    torch.testing.assert_close(scaled, plain * 2.0)


def _step_logits(adapter, state, tokens):
    with torch.inference_mode():
        hidden = adapter.begin_step(state, tokens)
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
        return adapter.exit_logits(adapter.num_layers - 1, hidden[:, -1])


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_rollback_drops_each_rows_rejected_positions(model_type):
    """After feeding 5 tokens and rolling back 2, 0 and 4 of them per row, the next step's
    logits equal those of each row decoded alone over the tokens it kept."""
    adapter = DecoderOnlyAdapter(_model(model_type))
    prompts = _prompts()[:3]
    fed = torch.randint(3, 256, (3, 5), generator=torch.Generator().manual_seed(3))
    rejected = torch.tensor([2, 0, 4])
    nxt = torch.tensor([[7], [8], [9]])
    with torch.inference_mode():
        state = adapter.start(*pad_batch(prompts, 0))
        _step_logits(adapter, state, torch.cat([state.first_input_ids, fed[:, :-1]], 1))
        adapter.rollback(state, rejected)
        batched = _step_logits(adapter, state, torch.cat(
            [fed[torch.arange(3), 4 - rejected, None]], 1))
        second = _step_logits(adapter, state, nxt)
    for row, prompt in enumerate(prompts):
        keep = 5 - int(rejected[row])
        with torch.inference_mode():
            alone = adapter.start(*pad_batch([prompt], 0))
            tokens = torch.cat([alone.first_input_ids, fed[row:row + 1, :keep - 1]], 1)
            _step_logits(adapter, alone, tokens)
            expected = _step_logits(adapter, alone, fed[row:row + 1, keep - 1:keep])
            expected_second = _step_logits(adapter, alone, nxt[row:row + 1])
        torch.testing.assert_close(batched[row:row + 1], expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(second[row:row + 1], expected_second, rtol=1e-4, atol=1e-4)
    with pytest.raises(ExitbenchError, match="sliding-window"):
        mistral = DecoderOnlyAdapter(_model("mistral"))
        state = mistral.start(*pad_batch(prompts, 0))
        _step_logits(mistral, state, state.first_input_ids)
        mistral.rollback(state, torch.tensor([1, 1, 1]))
