"""knorm: keep the recent window plus the older tokens whose keys have the smallest L2 norm.

Spec: `knorm:K+window:W[+sink:S][+intN[+residual:R][+group:G]|fp8]` (and `pyramid`, `adakv`, as
for every scored kind). The idea is KnormPress's (Devoto et al. 2024, "A Simple and Effective L2
Norm-Based Strategy for KV Cache Compression"): keys with a small norm tend to draw high attention,
so the norm is a free stand-in for the attention a token will get; no query is needed to score.

Scorer. A token's score is -||k||_2 of its key, fixed when it is admitted and never updated
(`gain` is None). The key is the rotated one, the only form `write` (`kvjax.append`) ever sees and
the one `attend` holds after RoPE; RoPE turns each pair of channels by an angle, which keeps the
norm, so the rotated and un-rotated norms agree up to float rounding and the choice changes
nothing but one code path. The norm is taken in float32 from the key at the caller's precision,
before the pool quantizes it.

Policy. Chunks go token by token (`compresses_prompt` is False), as for h2o: per (row, layer, kv
head) the cache keeps the S first tokens, the W most recent, and among the others the K with the
smallest key norm; an evicted token never returns. Since scores never change, that is the K
smallest-norm tokens of all those that have left the window. Unlike kvpress, which compresses a
prompt once after prefill, prompt queries see only what is held as they arrive; chunked prefill
then equals token-by-token decoding. Tested in tests/caches/test_knorm.py against a NumPy oracle.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from kvjax.caches import terms
from kvjax.caches.scored.kinds import check_scored, register_scored
from kvjax.caches.scored.scorers import Scorer


@dataclasses.dataclass(frozen=True)
class KNorm(Scorer):
  """Score = -||k||_2 at admission (float32), fixed; see the module docstring."""

  name: ClassVar[str] = "knorm"

  def admit(self, k) -> jax.Array:
    return -jnp.sqrt(jnp.sum(jnp.square(k.astype(jnp.float32)), axis=-1))


KNORM_TERM = terms.int_term("knorm", "keep the K older tokens with the smallest key L2 norm "
                            "(KnormPress; needs window)", usage="knorm:K", kind="knorm", rank=44,
                            check=check_scored, order=31)

register_scored("knorm", KNorm, terms=(KNORM_TERM,),
                description="the recent window plus the older tokens with the smallest key norm "
                            "(KnormPress)")
