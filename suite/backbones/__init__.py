"""Backbone families: adapters that decode a family's checkpoints one layer at a time
(:mod:`suite.backbones.decoder_only` for Llama-style causal LMs; the T5 adapter still
lives in :mod:`suite.models`, beside the :class:`suite.models.DecoderAdapter` protocol)."""
