"""Presses: KV-cache compression of a prompt, kvpress's methods as small pure scorers.

    import kvjax
    cache = kvjax.compress(model, ids, "snapkv", ratio=0.5)            # or budget=N, compat="kvpress"
    out = kvjax.generate(model, [question_ids], cache=cache, max_new_tokens=16)

  base.py       the protocol (`Press`: score, select, layer_kept), `LayerInputs`, the registry and
                spec strings ("adakv(snapkv)", "snapkv(window_size=64)")
  compress.py   `compress`: the jitted prefill that hands every layer to the press and writes the
                kept tokens into a `ScoredCache`; budgets (ratio or token count, per row);
                `prefill`: run the model once, then compress that prefill many ways
                (`save_prefilled` / `load_prefilled`: across sittings)
  keys.py       presses that read keys/values only (knorm, streaming_llm, ...)
  attention.py  presses that read attention (snapkv, pyramidkv, ...)
  wrappers.py   presses around presses (adakv, ...)
  rerotation.py presses whose kept keys move to positions 0..n-1 (key_rerotation, finch)
  kvzip.py      kvzip: scores from a second reading of the context (`Press.extend`)
  simlayerkv.py simlayerkv: whole layers keep everything or only their ends, by the data
  more.py       chunk, entropy_gated_chunkkv, non_causal_attn, compactor, cap, merging
  decoding.py   `decode`: generation that recompresses the cache every few tokens ("decoding")

Every press is checked against kvpress 0.5.5's own scores and selections
(tests/presses/test_kvpress_oracle.py, fixtures by scripts/make_kvpress_fixtures.py).
"""

from kvjax.presses.base import (LayerInputs, Press, example_spec, make_press, press_class,
                                press_names, protect, register_press, topk_per_head,
                                unregister_press, wraps_presses)
from kvjax.presses import keys, attention, wrappers  # noqa: F401  (register the built-ins)
from kvjax.presses import kvzip, rerotation, simlayerkv  # noqa: F401
from kvjax.presses import more  # noqa: F401
from kvjax.presses.compress import (Compressed, Prefilled, compress, load_prefilled, prefill,
                                    row_budgets, save_prefilled, score_prompt)
from kvjax.presses.decoding import decode

__all__ = ["Press", "LayerInputs", "make_press", "press_class", "press_names", "example_spec",
           "register_press",
           "unregister_press", "wraps_presses", "topk_per_head", "protect", "compress", "Compressed", "row_budgets",
           "score_prompt", "prefill", "Prefilled", "save_prefilled", "load_prefilled", "decode"]
