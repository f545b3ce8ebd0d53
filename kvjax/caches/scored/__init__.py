"""Scored caches: the recent window plus the best-scored older tokens, the score a strategy.

One cache pytree serves every scored kind; what differs between H2O, SnapKV and the rest is a
small static `Scorer` (how a token's score starts, grows, and how a prompt chunk is scored):

  policy.py     `evict_topk`: the sinks, the recent window, then the best scores (pure function)
  scorers.py    the `Scorer` protocol and `H2O`, `SnapKV`
  admission.py  how tokens enter one layer: admit and evict, attend, compress a prompt
  cache.py      `ScoredCache` (alias `H2OCache`): the pytree and the cache protocol
  kinds.py      the spec terms (h2o, snapkv, pyramid, adakv), the factory, `register_scored`
  knorm.py etc. further scored kinds, one module each (listed in registry._BUILTIN_MODULES)

Invariants are stated in cache.py (the policy and the layout) and scorers.py (the hooks).
"""

from kvjax.caches.scored.cache import H2OCache, ScoredCache
from kvjax.caches.scored.kinds import (ScoredKind, estimate_bytes, from_spec, layer_budgets,
                                       register_scored)
from kvjax.caches.scored.policy import append_encoded, evict_topk
from kvjax.caches.scored.scorers import (H2O, SNAP_KERNEL, SNAP_OBSERVE, SNAP_POOLING, Scorer,
                                         SnapKV)

__all__ = ["ScoredCache", "H2OCache", "Scorer", "H2O", "SnapKV", "ScoredKind", "register_scored",
           "evict_topk", "append_encoded", "from_spec", "layer_budgets", "estimate_bytes",
           "SNAP_OBSERVE", "SNAP_KERNEL", "SNAP_POOLING"]
