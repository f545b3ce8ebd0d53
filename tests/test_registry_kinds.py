"""An open protocol: a cache kind written here, from nothing but kvjax's public pieces, registered
under its own spec term and then used by string everywhere a built-in kind is (`make_cache`,
`generate`, `perplexity`, the CLI with `--plugin`).

The kind, `ring:N`, keeps the N most recent tokens of each row in a ring (rotated keys at their
original positions; no sinks, no re-indexing: it is a toy, not the `window` kind). Chunks go through
token by token, so it is chunk-exact; while a row holds fewer than N tokens it is the full cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import kvjax
from kvjax import attention as attn
from kvjax.caches import base
from kvjax.caches.registry import SpecError


@struct.dataclass
class RingCache(kvjax.Evicting):
  """k, v [L, B, K, N, H] (keys rotated); lengths int32 [B]. Slot s holds the newest position
  p < lengths with p = s (mod N), so no positions are stored."""

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  exact = True
  chunk_exact = True

  @property
  def _layout(self):
    return self.k

  @property
  def capacity(self) -> int:
    return self.k.shape[3]

  @property
  def head_dim(self) -> int:
    return self.k.shape[4]

  def held_positions(self, lengths) -> jax.Array:
    """int32 [B, N]: the position each slot holds after `lengths` tokens (-1: empty)."""
    slots = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]
    pos = attn.ring_position(slots, lengths[:, None], self.capacity)
    return jnp.where(pos >= 0, pos, -1)

  def filled(self):
    return jnp.minimum(self.lengths, self.capacity)

  def _push(self, layer, k_t, v_t, pos_t, valid_t):
    """One token per row into `layer` (k_t, v_t [B, K, H]); padding rows unchanged."""
    rows = jnp.arange(self.batch)
    slot = attn.ring_slot(pos_t, self.capacity)
    keep = valid_t[:, None, None]
    k = self.k.at[layer, rows, :, slot].set(jnp.where(keep, k_t, self.k[layer, rows, :, slot]))
    v = self.v.at[layer, rows, :, slot].set(jnp.where(keep, v_t, self.v[layer, rows, :, slot]))
    return self.replace(k=k, v=v)

  def attend(self, layer, q, k, v, n_valid=None, *, rope=None, scale=None):
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.prepare_queries(attn.apply_rope(rope, q, positions), self.kv_heads, scale)
    k = attn.apply_rope(rope, k, positions).astype(self.k.dtype)
    valid = jnp.arange(q.shape[1])[None, :] < n_valid[:, None]

    def step(cache, xs):
      q_t, k_t, v_t, pos_t, valid_t = xs
      cache = cache._push(layer, k_t, v_t, pos_t, valid_t)
      held = cache.held_positions(jnp.where(valid_t, pos_t + 1, cache.lengths))
      out = attn.dense_attention(q_t[:, None], cache.k[layer], cache.v[layer],
                                 (held >= 0)[:, None, None, :])
      return cache, out[:, 0]

    xs = jax.tree_util.tree_map(lambda a: a.swapaxes(0, 1), (q, k, v, positions, valid))
    cache, out = jax.lax.scan(step, self, xs)
    return out.swapaxes(0, 1), cache.replace(lengths=self.lengths)

  def write(self, layer, k, v, n_valid=None):
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1])
    cache = self
    for t in range(k.shape[1]):
      cache = cache._push(layer, k[:, t], v[:, t], self.lengths + t, t < n_valid)
    return cache

  def advance(self, n_valid):
    return self.replace(lengths=self.lengths + jnp.asarray(n_valid, jnp.int32))

  def view(self):
    pos = self.held_positions(self.lengths)
    shape = (self.n_layers, self.batch, self.kv_heads, self.capacity)
    positions = jnp.broadcast_to(pos[None, :, None, :], shape)
    return base.CacheView(keys=self.k, values=self.v, mask=positions >= 0, positions=positions)

  def reset(self):
    return self.replace(lengths=jnp.zeros_like(self.lengths))


def make_ring(spec, config, *, batch, capacity, dtype):
  slots = int(spec.arg)
  shape = (config.n_layers, batch, config.n_kv_heads, slots, config.head_dim)
  return RingCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))


def parse_ring(value):
  if value is None or not value.isdigit() or int(value) < 1:
    raise SpecError(f"ring:N needs a positive slot count, got {value!r}")


kvjax.register_kind("ring", make_ring, parse=parse_ring, replace=True,
                    capacity=lambda spec, needed, prompt: int(spec.arg),
                    description="the N most recent tokens (a test kind)")


# ---- the kind through every entry point ---------------------------------------------------------
def test_protocol_and_spec(tiny):
  cache = kvjax.make_cache("ring:8", tiny.config, 2, 8)
  assert isinstance(cache, kvjax.KVCache) and not kvjax.supports(cache, "crop")
  assert kvjax.parse_spec("ring:8").kind == "ring" and str(kvjax.parse_spec("ring:8")) == "ring:8"
  assert "ring" in kvjax.registered_kinds()
  assert kvjax.make_cache("ring:8", tiny, 1).k.dtype == tiny.dtype  # a model gives its dtype
  with pytest.raises(SpecError, match="positive slot count"):
    kvjax.parse_spec("ring:x")
  with pytest.raises(SpecError, match="does not take bits"):
    kvjax.make_cache("ring:8+int8", tiny.config, 1, 8)


def test_generate_while_it_holds_everything_equals_full(tiny):
  prompts = [[5, 6, 7, 8, 9], [10, 11]]
  ring = kvjax.generate(tiny, prompts, max_new_tokens=6, cache="ring:16", stop_at_eos=False)
  full = kvjax.generate(tiny, prompts, max_new_tokens=6, cache="full", stop_at_eos=False)
  np.testing.assert_array_equal(ring.tokens, full.tokens)
  assert ring.spec == "ring:16" and isinstance(ring.cache, RingCache)


def test_perplexity_chunked_equals_stepwise_and_evicts(tiny):
  ids = np.random.default_rng(0).integers(3, 250, 40)
  chunked = kvjax.perplexity(tiny, ids, cache="ring:8")  # chunk_exact: chunks of 256
  stepwise = kvjax.perplexity(tiny, ids, cache="ring:8", chunk=1)
  np.testing.assert_allclose(chunked.token_nll, stepwise.token_nll, atol=2e-5)
  full = kvjax.perplexity(tiny, ids, cache="full")
  np.testing.assert_allclose(chunked.token_nll[:8], full.token_nll[:8], atol=2e-5)
  assert not np.allclose(chunked.token_nll[20:], full.token_nll[20:], atol=1e-3)  # it evicted


def test_cli_with_plugin(capsys):
  from kvjax import cli

  rc = cli.main(["generate", "hi", "--plugin", __name__, "--model", "tiny", "--cache", "ring:16",
                 "--max-new-tokens", "4", "--json"])
  assert rc == 0
  assert '"cache": "ring:16"' in capsys.readouterr().out
  rc = cli.main(["generate", "hi", "--plugin", "no_such_module_xyz", "--model", "tiny"])
  assert rc == 2 and "cannot import" in capsys.readouterr().err


def test_registration_errors():
  with pytest.raises(ValueError, match="built-in"):
    kvjax.register_kind("window", make_ring)
  with pytest.raises(ValueError, match="already registered"):
    kvjax.register_kind("ring", make_ring)
  with pytest.raises(ValueError, match="lowercase"):
    kvjax.register_kind("Ring!", make_ring)
  with pytest.raises(SpecError, match="unknown term 'nosuchkind:3'"):
    kvjax.parse_spec("nosuchkind:3")


def test_a_kind_declares_its_own_terms(tiny):
  """A user kind's extra words go through the same grammar as the built-in ones: parsed, printed
  canonically, validated by the kind's check, given to its factory as spec fields, and gone with
  the kind."""
  from kvjax.caches import terms

  def check_stride(spec):
    if spec.custom and spec.custom[0][0] != "strided":
      raise SpecError(f"stride:{spec.stride} belongs to the strided kind")

  stride = terms.int_term("stride", "keep every S-th token (a test term)", usage="stride:S",
                          check=check_stride, order=95)
  seen = {}

  def make(spec, config, *, batch, capacity, dtype):
    seen["stride"] = spec.stride
    return make_ring(kvjax.parse_spec("ring:8"), config, batch=batch, capacity=capacity, dtype=dtype)

  kvjax.register_kind("strided", make, terms=(stride,), capacity=lambda spec, **_: 8)
  try:
    spec = kvjax.parse_spec(" stride:2 + strided ")
    assert (spec.kind, spec.stride, str(spec)) == ("strided", 2, "strided+stride:2")
    assert kvjax.parse_spec(str(spec)) == spec and "stride:S" in kvjax.spec.grammar()
    kvjax.make_cache(spec, tiny.config, 1)
    assert seen == {"stride": 2}
    with pytest.raises(SpecError, match="stride:0 must be a positive"):
      kvjax.parse_spec("strided+stride:0")
    with pytest.raises(SpecError, match="belongs to the strided kind"):
      kvjax.parse_spec("ring:8+stride:2")
    with pytest.raises(SpecError, match="repeats or contradicts"):
      kvjax.parse_spec("ring:8+strided")  # one registered kind per spec
  finally:
    kvjax.unregister_kind("strided")
  with pytest.raises(SpecError, match="unknown term 'stride:2'"):
    kvjax.parse_spec("ring:8+stride:2")
