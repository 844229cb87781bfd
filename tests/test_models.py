"""The T5 adapter: exit heads computed as the checkpoint computes its last layer, and the
layer-by-layer decoder reproducing HF's own forward pass."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_forward

from suite.backbones.t5 import T5Adapter, random_t5, scales_decoder_outputs, t5_exit_logits
from suite.errors import ExitbenchError
from suite.measures import ModelDims
from suite.models import DecoderAdapter, resolve_model_folder, weights_sha256

TINY = {"vocab_size": 96, "d_model": 32, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 3,
        "num_heads": 4, "d_kv": 8}
"""A tiny T5 for the cheap checks (the t5-small architecture is used where exactness
against HF matters)."""


def _inputs(vocab: int, lengths=(5, 9, 3), seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=generator).tolist() + [1] for n in lengths]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    decoder_inputs = torch.randint(3, vocab, (len(rows), 6), generator=generator)
    decoder_inputs[:, 0] = 0
    return ids, mask, decoder_inputs


def _our_layers(adapter: T5Adapter, ids, mask, decoder_inputs) -> list[torch.Tensor]:
    """Embeddings and every layer's un-normed output, from one parallel pass of ours."""
    with torch.inference_mode():
        state = adapter.start(ids, mask, use_cache=False)
        hidden = adapter.begin_step(state, decoder_inputs)
        outputs = [hidden]
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
            outputs.append(hidden)
    return outputs


@pytest.fixture(scope="module")
def t5_small():
    return T5Adapter(random_t5(seed=0), model_id="random-t5-small")


def test_adapter_reports_depth_dims_and_implements_the_protocol(t5_small):
    assert isinstance(t5_small, DecoderAdapter)
    assert t5_small.num_layers == 6
    assert t5_small.dims == ModelDims(num_layers=6, d_model=512, d_ff=2048, num_heads=8,
                                      d_kv=64, vocab_size=32128)
    assert (t5_small.eos_token_id, t5_small.pad_token_id, t5_small.decoder_start_token_id) \
        == (1, 0, 0)
    assert t5_small.dtype == torch.float32 and t5_small.device.type == "cpu"


@pytest.mark.slow
def test_exit_logits_match_hf_at_the_last_and_intermediate_layers(t5_small):
    model = t5_small.model
    ids, mask, decoder_inputs = _inputs(model.config.vocab_size)
    out, hf_last_raw = hf_forward(model, ids, mask, decoder_inputs)
    ours = _our_layers(t5_small, ids, mask, decoder_inputs)
    hf_states = out.decoder_hidden_states
    assert len(hf_states) == len(ours) == 7
    # Embeddings and every intermediate layer are HF's own hidden states.
    for layer in range(6):
        torch.testing.assert_close(ours[layer], hf_states[layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[-1], hf_last_raw, rtol=1e-5, atol=1e-5)
    # HF's last entry is normed; ours is not, and norming it gives HF's.
    torch.testing.assert_close(model.decoder.final_layer_norm(ours[-1]), hf_states[-1])
    with torch.inference_mode():
        torch.testing.assert_close(t5_small.exit_logits(5, ours[-1]), out.logits,
                                   rtol=1e-5, atol=1e-4)
        for layer in (0, 2, 4):
            expected = model.lm_head(model.decoder.final_layer_norm(hf_states[layer + 1])
                                     * 512 ** -0.5)
            got = t5_small.exit_logits(layer, ours[layer + 1])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        # The intermediate exits differ from the last one (the test compares something).
        assert not torch.allclose(t5_small.exit_logits(2, ours[3]), out.logits, atol=1e-2)


@pytest.mark.parametrize("flavour", ["t5-v1_1", "mt5"])
def test_untied_and_mt5_heads_do_not_scale(flavour):
    torch.manual_seed(0)
    if flavour == "mt5":
        from transformers import MT5Config, MT5ForConditionalGeneration
        model = MT5ForConditionalGeneration(MT5Config(**TINY, feed_forward_proj="gated-gelu",
                                                      decoder_start_token_id=0)).eval()
    else:
        model = random_t5(seed=0, residual_gain=1.0, **TINY, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False)
    assert scales_decoder_outputs(model.config) is False
    adapter = T5Adapter(model)
    ids, mask, decoder_inputs = _inputs(TINY["vocab_size"])
    out, hf_last_raw = hf_forward(model, ids, mask, decoder_inputs)
    ours = _our_layers(adapter, ids, mask, decoder_inputs)
    with torch.inference_mode():
        torch.testing.assert_close(adapter.exit_logits(2, ours[-1]), out.logits,
                                   rtol=1e-5, atol=1e-5)
        # Scaling would have been wrong here: the switch matters.
        scaled = model.lm_head(model.decoder.final_layer_norm(hf_last_raw) * TINY["d_model"] ** -0.5)
        assert not torch.allclose(scaled, out.logits, atol=1e-3)


def test_tied_t5_head_scales_and_already_normed_skips_the_norm():
    model = random_t5(seed=0, **TINY)
    assert scales_decoder_outputs(model.config) is True
    ids, mask, decoder_inputs = _inputs(TINY["vocab_size"])
    out, _ = hf_forward(model, ids, mask, decoder_inputs)
    with torch.inference_mode():
        torch.testing.assert_close(
            t5_exit_logits(model, out.decoder_hidden_states[-1], already_normed=True),
            out.logits)


def test_bfloat16_adapter_casts_and_matches_hf_in_bfloat16():
    model = random_t5(seed=0, **{**TINY, "num_layers": 3})
    adapter = T5Adapter(model, dtype="bfloat16")
    assert adapter.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids, mask, decoder_inputs = _inputs(TINY["vocab_size"])
    out, _ = hf_forward(model, ids, mask, decoder_inputs)
    ours = _our_layers(adapter, ids, mask, decoder_inputs)
    with torch.inference_mode():
        logits = adapter.exit_logits(2, ours[-1])
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, out.logits)


def test_load_from_a_local_folder_and_hash_the_weights(tmp_path):
    model = random_t5(seed=0, **TINY)
    model.save_pretrained(tmp_path / "m")
    adapter = T5Adapter.load(str(tmp_path / "m"))
    assert adapter.num_layers == 3 and adapter.model_id == str(tmp_path / "m")
    ids, mask, decoder_inputs = _inputs(TINY["vocab_size"])
    out, _ = hf_forward(model, ids, mask, decoder_inputs)
    ours = _our_layers(adapter, ids, mask, decoder_inputs)
    with torch.inference_mode():
        torch.testing.assert_close(adapter.exit_logits(2, ours[-1]), out.logits)
    digest = weights_sha256(tmp_path / "m")
    assert digest == weights_sha256(tmp_path / "m")
    random_t5(seed=1, **TINY).save_pretrained(tmp_path / "m")
    assert weights_sha256(tmp_path / "m") != digest


def test_missing_model_folder_and_unsupported_models_are_named(tmp_path):
    with pytest.raises(ExitbenchError, match="no-such-folder"):
        resolve_model_folder(str(tmp_path / "no-such-folder"))
    from transformers import BartConfig, BartForConditionalGeneration

    bart = BartForConditionalGeneration(BartConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                                   decoder_layers=1, encoder_attention_heads=2,
                                                   decoder_attention_heads=2,
                                                   encoder_ffn_dim=16, decoder_ffn_dim=16))
    with pytest.raises(ExitbenchError, match="model_type 'bart' is not supported"):
        T5Adapter(bart, model_id="bart")
    with pytest.raises(ExitbenchError, match="dtype 'float8'"):
        T5Adapter(random_t5(seed=0, **TINY), dtype="float8")
