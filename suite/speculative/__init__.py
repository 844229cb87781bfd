"""Self-speculative decoding (LayerSkip-style), the decoding method beside early exit: the
method's settings and code hash (:mod:`.method`), exact replay of every draft-and-verify
cycle from full-depth traces (:mod:`.replay`), the lossless online decoder
(:mod:`.online`), and the stage that replays, prices and stores a config's ``methods:``
rows (:mod:`.sweep`). The cost of a cycle lives with the cost model
(:func:`suite.cost.speculative_cost`). ``docs/self_speculative.md`` explains it all."""
