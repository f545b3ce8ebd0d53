"""Compatibility: the scored kinds moved to the package `kvjax.caches.scored`.

H2O, SnapKV, AdaKV and PyramidKV live there now (the cache in scored/cache.py, the scorers in
scored/scorers.py, the spec terms in scored/kinds.py); this module re-exports the names it used to
define, so `from kvjax.caches import h2o; h2o.H2OCache` keeps working. `H2O`, `SNAPKV`, `PYRAMID`
and `ADAKV` here are the spec terms, as before (the scorer classes are `scored.H2O`,
`scored.SnapKV`).
"""

from kvjax.caches.scored import (SNAP_KERNEL, SNAP_OBSERVE, SNAP_POOLING, H2OCache,  # noqa: F401
                                 ScoredCache, append_encoded, estimate_bytes, evict_topk, from_spec,
                                 layer_budgets)
from kvjax.caches.scored.kinds import ADAKV_TERM as ADAKV  # noqa: F401
from kvjax.caches.scored.kinds import H2O_TERM as H2O  # noqa: F401
from kvjax.caches.scored.kinds import PYRAMID_TERM as PYRAMID  # noqa: F401
from kvjax.caches.scored.kinds import SNAPKV_TERM as SNAPKV  # noqa: F401
