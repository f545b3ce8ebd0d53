"""Calibration for cross-layer KV sharing (`share:G:cal`) and latent KV caches (`lowrank:R`).

`collect_kv(model, ids)` runs the model's own step over calibration text with a recording cache (a
full cache that also keeps every layer's un-rotated k and v as they arrive), so it works for any
model of `kvjax.models.protocol` (sliding layers masked to their window, as the model runs).
`fit_share_maps(model, ids, group)` then fits, for each follower layer l (l % G != 0; on Gemma 3,
counted over the global layers that share) and its leader l0 = l - l % G, the least-squares linear
maps (with bias)

  k_l ~= k_l0 @ k_w[l] + k_b[l]        v_l ~= v_l0 @ v_w[l] + v_b[l]

over the flattened [K * H] features of every calibration token (float64 `np.linalg.lstsq`), and
returns them as `kvjax.caches.shared.ShareMaps` for `make_cache("share:G:cal", ..., maps=maps)`.

`fit_lowrank(model, ids, rank)` fits, per layer, the top-R principal directions (and the mean) of
the flattened keys and of the values of every calibration token, for `make_cache("lowrank:R", ...,
maps=maps)` (`kvjax.caches.lowrank`); `rotated=True` fits the keys after RoPE at their window
positions instead (the cache's `keys="post"` mode).

Invariants (tests/caches/test_shared.py, tests/caches/test_lowrank.py): the recorded k/v equal the NumPy
Llama oracle's pre-RoPE projections; the fit recovers an exact affine relation; on the calibration
tokens the fitted maps' error is never above the identity map's (what plain `share:G` uses).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax.caches.full import FullCache
from kvjax.caches.lowrank import LowRankMaps
from kvjax.caches.shared import ShareMaps
from kvjax.models.config import layer_windows
from kvjax.models.protocol import model_dtype, static_step


@struct.dataclass
class _Recorder:
  """A full cache that also records the k, v [B, T, K, H] each layer gives it, in layer order."""

  inner: FullCache
  ks: tuple = ()
  vs: tuple = ()

  @property
  def lengths(self):
    return self.inner.lengths

  def token_positions(self, tokens: int):
    return self.inner.token_positions(tokens)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    out, inner = self.inner.attend(layer, q, k, v, n_valid, rope=rope, scale=scale)
    return out, self.replace(inner=inner, ks=self.ks + (k,), vs=self.vs + (v,))

  def advance(self, n_valid):
    return self.replace(inner=self.inner.advance(n_valid))


@functools.partial(jax.jit, static_argnames=("model", "layout"))
def _record(params, tokens, *, model, layout):
  """k, v [L, B, T, K, H] of every layer for tokens [B, T] fed into an empty cache."""
  n_layers, kv_heads, head_dim, dtype, sliding = layout
  batch, t = tokens.shape
  inner = FullCache.init(n_layers=n_layers, batch=batch, kv_heads=kv_heads, head_dim=head_dim,
                         capacity=t, dtype=dtype, sliding=sliding)
  _, rec = model.step(params, tokens, _Recorder(inner), jnp.full((batch,), t, jnp.int32))
  return jnp.stack(rec.ks), jnp.stack(rec.vs)


def collect_kv(model, ids, *, window: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """Un-rotated k, v of every layer for the token ids (1-D), cut into independent windows.

  Returns (k, v), each float32 [L, n_tokens, K * H] (the tail that does not fill a window is dropped
  unless the ids are shorter than one window).
  """
  ids = np.asarray(ids, np.int32).reshape(-1)
  window = min(window, ids.size)
  rows = ids[: ids.size // window * window].reshape(-1, window)  # [B, T]
  config = model.config
  windows = layer_windows(config)  # Gemma 3's sliding layers
  layout = (config.n_layers, config.n_kv_heads, config.head_dim, model_dtype(model),
            None if all(w is None for w in windows) else windows)
  ks, vs = [], []
  for row in rows:  # one window at a time keeps the attention matrix small
    k, v = _record(model.params, jnp.asarray(row[None]), model=static_step(model), layout=layout)
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
                   kv: Any = None, layers=None) -> ShareMaps:
  """Fits `share:G:cal` maps on calibration token ids (1-D). kv: precomputed `collect_kv` output.

  layers: the model layers the share:G:cal cache serves, in order; they share in runs of G of
    them, layers[i] reading layers[i - i % G]. Default: the layers a plain spec goes to, every
    layer of a Llama, Gemma 3's global ones (5, 11, 17: 11 reads 5), as `make_cache` groups them
    (`kvjax.layouts`); a layout placing share:G:cal elsewhere passes its layers. Every other row
    stays the identity. Returns maps over all L model layers (k_w [L, K*H, K*H], ...)."""
  if not isinstance(group, int) or group < 2:
    raise ValueError(f"fit_share_maps: group must be an int >= 2, got {group!r}")
  k, v = kv if kv is not None else collect_kv(model, ids, window=window)
  n_layers, _, features = k.shape
  if layers is None:
    config = getattr(model, "config", None)
    windows = layer_windows(config) if config is not None else (None,) * n_layers
    layers = [l for l, w in enumerate(windows) if w is None]
  layers = [int(l) for l in layers]
  if not layers or sorted(set(layers)) != layers or not 0 <= layers[0] <= layers[-1] < n_layers:
    raise ValueError(f"fit_share_maps: layers must be increasing model layers in [0, {n_layers}), "
                     f"got {layers}")
  maps = ShareMaps.identity(n_layers, features)
  k_w, k_b = np.array(maps.k_w), np.array(maps.k_b)
  v_w, v_b = np.array(maps.v_w), np.array(maps.v_b)
  for i, layer in enumerate(layers):
    leader = layers[i - i % group]
    if leader == layer:
      continue
    k_w[layer], k_b[layer] = fit_affine(k[leader], k[layer], ridge)
    v_w[layer], v_b[layer] = fit_affine(v[leader], v[layer], ridge)
  return ShareMaps(k_w=jnp.asarray(k_w, jnp.float32), k_b=jnp.asarray(k_b, jnp.float32),
                   v_w=jnp.asarray(v_w, jnp.float32), v_b=jnp.asarray(v_b, jnp.float32))


def principal_basis(x: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """PCA of the rows of x [n, F] in float64: (basis [F, rank] orthonormal, mean [F]).

  The columns are the top right singular vectors of the centred rows (eigenvectors of their F x F
  scatter matrix: one matrix product over the tokens, then a small symmetric eigenproblem), largest
  first, each with its largest-magnitude entry made positive (so the result does not depend on the
  solver's sign choice)."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=0)
  centred = x - mean
  _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
  basis = np.ascontiguousarray(vectors[:, ::-1][:, :rank])
  signs = np.sign(basis[np.argmax(np.abs(basis), axis=0), np.arange(rank)])
  return basis * np.where(signs == 0, 1.0, signs), mean


def rotate_flat(keys: np.ndarray, positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
  """RoPE of flattened keys [n, K * H] at positions [n] (float64, HF's rotate-half convention)."""
  n = keys.shape[0]
  x = np.asarray(keys, np.float64).reshape(n, -1, head_dim)
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  ang = positions.astype(np.float64)[:, None, None] * inv  # [n, 1, H/2]
  cos, sin = np.cos(ang), np.sin(ang)
  x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(n, -1)


def fit_lowrank(model, ids, rank: int, *, window: int = 512, kv: Any = None,
                rotated: bool = False) -> LowRankMaps:
  """Fits `lowrank:R` maps on calibration token ids (1-D): per layer, the top-`rank` principal
  directions and the mean of the flattened [K * H] keys, and of the values.

  kv: precomputed `collect_kv(model, ids, window=window)` output (un-rotated keys).
  rotated: fit the keys after RoPE at their positions in the calibration windows (0 .. window-1),
  for the cache's `keys="post"` mode (values are never rotated).
  """
  config = model.config
  features = config.n_kv_heads * config.head_dim
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
    raise ValueError(f"fit_lowrank: rank must be a positive int, got {rank!r}")
  if rank > features:
    raise ValueError(f"fit_lowrank: rank {rank} is larger than the {features} key/value features "
                     f"per token (kv_heads {config.n_kv_heads} x head_dim {config.head_dim})")
  k, v = kv if kv is not None else collect_kv(model, ids, window=window)
  n_layers, n_tokens, _ = k.shape
  if rotated:
    window = min(window, n_tokens)
    positions = np.arange(n_tokens) % window
  out = {"k_basis": [], "k_mean": [], "v_basis": [], "v_mean": []}
  for layer in range(n_layers):
    keys = k[layer]
    if rotated:
      keys = rotate_flat(keys, positions, config.head_dim, config.rope_theta)
    for name, x in (("k", keys), ("v", v[layer])):
      basis, mean = principal_basis(x, int(rank))
      out[name + "_basis"].append(basis)
      out[name + "_mean"].append(mean)
  arrays = {name: jnp.asarray(np.stack(xs), jnp.float32) for name, xs in out.items()}
  return LowRankMaps(**arrays, rotated=rotated)
