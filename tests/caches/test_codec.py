"""Tests for the storage codec (kvjax/caches/codec.py) and its use by every kind that stores tokens.

What is checked:
  * fp8 (e4m3, e5m2; float16 and float32 scales) encodes bit for bit like a NumPy oracle, jitted
    or not, and decodes within `error_bound` of the token's max|x|, over bucketed shapes and
    magnitudes from 2^-20 to 2^16; a token of zeros stays zeros;
  * integer formats are `packing.quantize`'s codes, along channels and along tokens (KIVI keys);
  * `token_bytes(H)` equals the measured bytes per token of caches built with each format, for
    quantized, tiered, h2o, paged and lowrank; `estimate_bytes` of an fp8 spec equals `nbytes()`;
  * each kind built with fp8 attends close to full attention over the tokens it was given (e5m2
    under `slow`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.caches import codec as codec_lib
from kvjax.caches import h2o, lowrank, packing, paged, quantized, tiered
from kvjax.testing import oracle
from tests.helpers import examples

FP8 = ("fp8_e4m3", "fp8_e5m2")
ALL = ("fp32", "bf16", "fp16", "int8", "int4", "int3", "int2") + FP8
L, B, K, H = 1, 2, 2, 16


# ---- the codec alone ----------------------------------------------------------------------------
@examples(10)
@given(fmt=st.sampled_from(FP8), scale=st.sampled_from(["float16", "float32"]),
       shape=st.sampled_from([(3, 8), (2, 4, 16), (1, 2, 16, 64)]),
       log_mag=st.integers(-20, 16), jit=st.booleans(), seed=st.integers(0, 2**16))
def test_fp8_matches_numpy_oracle_within_its_bound(fmt, scale, shape, log_mag, jit, seed):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape[:-1] + (1,)))
       * 2.0**log_mag).astype(np.float32)
  x[..., 0, :] = 0.0  # a token of zeros
  codec = codec_lib.parse(fmt, scale_dtype=scale)
  enc = jax.jit(codec.encode) if jit else codec.encode
  store = enc(jnp.asarray(x))
  codes, s, want = oracle.np_fp8(x, fmt, np.dtype(scale))
  np.testing.assert_array_equal(np.asarray(store.data).view(np.uint8), codes.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(store.scale), s)
  got = np.asarray(store.decode())
  np.testing.assert_array_equal(got, want)
  amax = np.abs(x).max(-1, keepdims=True)
  assert (np.abs(got - x) <= codec.error_bound * amax).all()
  assert (got[..., 0, :] == 0).all()


@pytest.mark.parametrize("bits,along", [(8, "channels"), (4, "channels"), (3, "tokens"), (2, "tokens")])
def test_int_formats_are_packings_codes(bits, along):
  x = jnp.asarray(np.random.default_rng(bits).standard_normal((2, 16, 8)), jnp.float32)
  codec = codec_lib.of_bits(bits, 4)
  codec = codec.along_tokens(4) if along == "tokens" else codec
  store = codec.encode(x)
  q = packing.quantize(x, bits, 4, axis=-2 if along == "tokens" else -1)
  for a, b in zip(store.leaves(), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(store.decode()), np.asarray(packing.dequantize(q)))


def test_codec_is_static_and_parses_every_format():
  assert codec_lib.parse("fp8") == codec_lib.parse("fp8_e4m3")
  assert hash(codec_lib.parse("int4", group=16)) == hash(codec_lib.of_bits(4, 16))
  assert codec_lib.of_dtype(jnp.bfloat16).format == "bf16"
  with pytest.raises(kvjax.SpecError, match="unknown"):
    codec_lib.parse("fp7")
  spec = kvjax.parse_spec("int4+group:16")
  assert codec_lib.for_spec(spec) == codec_lib.of_bits(4, 16)
  assert codec_lib.for_spec(_with_storage(spec, "fp8_e5m2")).format == "fp8_e5m2"
  assert codec_lib.for_spec(kvjax.parse_spec("full"), jnp.float16).format == "fp16"


# ---- bytes per token against the arrays ---------------------------------------------------------
def _kinds(fmt):
  """(cache, measured bytes, tokens, width) of the token storage of each kind with format fmt."""
  c = codec_lib.parse(fmt, group=8)
  out = []
  if not c.is_float:
    q = quantized.QuantizedCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, capacity=16,
                                      group=8, codec=c)
    per = c.along_tokens(8).token_bytes(H) + c.fitted(H).token_bytes(H)
    out.append(("quantized", q.quantized_bytes(), L * B * K * 16 * per))
  t = tiered.TieredCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, tiers=((4, fmt),), group=8)
  out.append(("tiered", t.tier_nbytes()[0], 2 * L * B * K * 4 * c.token_bytes(H)))
  hc = h2o.H2OCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, heavy=2, window=3, codec=c)
  out.append(("h2o", hc.k.nbytes() + hc.v.nbytes(), 2 * L * B * K * 5 * c.token_bytes(H)))
  pc = paged.PagedCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, capacity=8, page_size=4,
                             codec=c)
  out.append(("paged", pc.page_bytes(), 2 * L * K * 4 * c.token_bytes(H)))
  lr = lowrank.LowRankCache.init(maps=_identity_maps(), batch=B, kv_heads=K, head_dim=H,
                                 capacity=8, codec=c)
  out.append(("lowrank", lr.zk.nbytes() + lr.zv.nbytes(), 2 * L * B * 8 * c.token_bytes(K * H)))
  return out


@pytest.mark.parametrize("fmt", ALL)
def test_token_bytes_equal_measured_bytes_on_every_kind(fmt):
  for kind, measured, formula in _kinds(fmt):
    assert measured == formula, (kind, fmt, measured, formula)


class _with_storage:
  """A parsed spec plus a `storage` term (what the spec grammar will give)."""

  def __init__(self, spec, storage):
    self._spec, self.storage = spec, storage

  def __getattr__(self, name):
    return getattr(self._spec, name)

  def __str__(self):
    return f"{self._spec}+{self.storage}"


@pytest.mark.parametrize("text,module,options", [
    ("int8+group:8", quantized, {}), ("h2o:2+window:3", h2o, {}), ("paged:4", paged, {}),
    ("lowrank:32", lowrank, {"maps": None})])
def test_estimate_bytes_of_fp8_specs_equal_measured(text, module, options):
  cfg = kvjax.TINY.replace(n_layers=L, n_kv_heads=K, head_dim=H, n_heads=2 * K)
  spec = _with_storage(kvjax.parse_spec(text), "fp8")
  if "maps" in options:
    options = {"maps": _identity_maps()}
  cache = module.from_spec(spec, cfg, batch=B, capacity=16, dtype=jnp.float32, **options)
  assert module.estimate_bytes(spec, cfg, 16, B, jnp.float32) == sum(cache.nbytes().values())


# ---- attention with fp8 ---------------------------------------------------------------------------
def _identity_maps():
  f = K * H
  eye = jnp.eye(f, dtype=jnp.float32)[None]
  zero = jnp.zeros((1, f), jnp.float32)
  return lowrank.LowRankMaps(k_basis=eye, k_mean=zero, v_basis=eye, v_mean=zero)


def _fp8_caches(fmt):
  c = codec_lib.parse(fmt)
  return {
      "quantized": quantized.QuantizedCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H,
                                                 capacity=16, group=4, codec=c),
      "tiered": tiered.TieredCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H,
                                        tiers=((16, fmt),)),
      "h2o": h2o.H2OCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, heavy=4, window=12,
                               codec=c),
      "paged": paged.PagedCache.init(n_layers=L, batch=B, kv_heads=K, head_dim=H, capacity=16,
                                     page_size=4, codec=c),
      "lowrank": lowrank.LowRankCache.init(maps=_identity_maps(), batch=B, kv_heads=K, head_dim=H,
                                           capacity=16, codec=c),
  }


@pytest.mark.parametrize("fmt", ["fp8_e4m3", pytest.param("fp8_e5m2", marks=pytest.mark.slow)])
def test_every_kind_with_fp8_attends_close_to_full_attention(fmt):
  rng = np.random.default_rng(0)
  t0, t1, n = 8, 4, 2 * K
  q = rng.standard_normal((B, t0 + t1, n, H)).astype(np.float32)
  k = rng.standard_normal((B, t0 + t1, K, H)).astype(np.float32)
  v = rng.standard_normal((B, t0 + t1, K, H)).astype(np.float32)
  causal = np.tril(np.ones((t0 + t1, t0 + t1), bool))[t0:]
  want = np.stack([oracle.attention(q[b, t0:], k[b], v[b], causal) for b in range(B)])
  bound = codec_lib.parse(fmt).error_bound
  for kind, cache in _fp8_caches(fmt).items():
    assert kind == "lowrank" or cache.error_bound == bound, kind
    _, cache = cache.attend(0, jnp.asarray(q[:, :t0]), jnp.asarray(k[:, :t0]), jnp.asarray(v[:, :t0]))
    cache = cache.advance(jnp.full((B,), t0, jnp.int32))
    out, _ = cache.attend(0, jnp.asarray(q[:, t0:]), jnp.asarray(k[:, t0:]), jnp.asarray(v[:, t0:]))
    err = np.abs(np.asarray(out) - want).max()
    # keys and values each off by at most `bound` of their token's max|x| (~3 here)
    assert 0 < err < 3 * bound, (kind, err)
