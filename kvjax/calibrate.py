"""Calibration for cross-layer KV sharing (`share:G:cal`).

`collect_kv(model, ids)` runs the model's own forward over calibration text with a recording
"cache" that attends causally over the call's tokens (exactly the uncached forward) and keeps every
layer's un-rotated k and v. `fit_share_maps(model, ids, group)` then fits, for each follower layer l
(l % G != 0) and its leader l0 = l - l % G, the least-squares linear maps (with bias)

  k_l ~= k_l0 @ k_w[l] + k_b[l]        v_l ~= v_l0 @ v_w[l] + v_b[l]

over the flattened [K * H] features of every calibration token (float64 `np.linalg.lstsq`), and
returns them as `kvjax.caches.shared.ShareMaps` for `make_cache("share:G:cal", ..., maps=maps)`.

Invariants (tests/caches/test_shared.py): the recorded k/v equal the NumPy
Llama oracle's pre-RoPE projections; the fit recovers an exact affine relation; on the calibration
tokens the fitted maps' error is never above the identity map's (what plain `share:G` uses).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.attention import RoPE, causal_attention
from kvjax.caches.shared import ShareMaps
from kvjax.models.llama import Llama, params_dtype


@struct.dataclass
class _Recorder:
  """Stands in for a cache: causal attention over the call's own tokens; records k, v per layer."""

  lengths: jax.Array
  ks: tuple = ()
  vs: tuple = ()

  def attend(self, layer: int, q, k, v, rope: RoPE, n_valid):
    positions = self.lengths[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)
    out = causal_attention(rope.apply(q, positions), rope.apply(k, positions), v, positions, n_valid)
    return out, self.replace(ks=self.ks + (k,), vs=self.vs + (v,))

  def advance(self, n_valid):
    return self


def collect_kv(model, ids, *, window: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Un-rotated k, v of every layer for the token ids (1-D), cut into independent windows.

  Returns (k, v), each float32 [L, n_tokens, K * H] (the tail that does not fill a window is dropped
  unless the ids are shorter than one window).
  """
  ids = np.asarray(ids, np.int32).reshape(-1)
  window = min(window, ids.size)
  rows = ids[: ids.size // window * window].reshape(-1, window)  # [B, T]
  dtype = params_dtype(model.params)
  config = model.config

  @jax.jit
  def record(params, tokens):
    recorder = _Recorder(lengths=jnp.zeros((tokens.shape[0],), jnp.int32))
    _, rec = Llama(config, dtype).apply({"params": params}, tokens, recorder)
    return jnp.stack(rec.ks), jnp.stack(rec.vs)  # [L, B, T, K, H]

  ks, vs = [], []
  for row in rows:  # one window at a time keeps the attention matrix small
    k, v = record(model.params, jnp.asarray(row[None]))
    ks.append(np.asarray(k, np.float32).reshape(config.n_layers, window, -1))
    vs.append(np.asarray(v, np.float32).reshape(config.n_layers, window, -1))
  return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)


def fit_affine(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Least squares y ~= x @ w + b for x [n, F_in], y [n, F_out]; returns (w [F_in, F_out], b [F_out]).

  ridge > 0 adds ridge * I to the normal equations of w (not of b), for short calibration texts.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  design = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  if ridge:
    reg = np.sqrt(ridge) * np.eye(design.shape[1])[:-1]  # no penalty on the bias column
    design = np.concatenate([design, reg], axis=0)
    y = np.concatenate([y, np.zeros((reg.shape[0], y.shape[1]))], axis=0)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  return coef[:-1], coef[-1]


def fit_share_maps(model, ids, group: int, *, window: int = 512, ridge: float = 0.0,
                   kv: Any = None) -> ShareMaps:
  """Fits `share:G:cal` maps on calibration token ids (1-D). kv: precomputed `collect_kv` output."""
  if not isinstance(group, int) or group < 2:
    raise ValueError(f"fit_share_maps: group must be an int >= 2, got {group!r}")
  k, v = kv if kv is not None else collect_kv(model, ids, window=window)
  n_layers, _, features = k.shape
  maps = ShareMaps.identity(n_layers, features)
  k_w, k_b = np.array(maps.k_w), np.array(maps.k_b)
  v_w, v_b = np.array(maps.v_w), np.array(maps.v_b)
  for layer in range(n_layers):
    leader = layer - layer % group
    if leader == layer:
      continue
    k_w[layer], k_b[layer] = fit_affine(k[leader], k[layer], ridge)
    v_w[layer], v_b[layer] = fit_affine(v[leader], v[layer], ridge)
  return ShareMaps(k_w=jnp.asarray(k_w, jnp.float32), k_b=jnp.asarray(k_b, jnp.float32),
                   v_w=jnp.asarray(v_w, jnp.float32), v_b=jnp.asarray(v_b, jnp.float32))
