"""Low-rank latent KV cache (`lowrank:R`): MLA-style storage for a model not trained with MLA.

Per layer, calibration text gives two PCA bases of the flattened [K * H] key and value features
(`kvjax.calibrate.fit_lowrank`): R orthonormal columns and a mean each (`LowRankMaps`). The cache
keeps, for every token, only its two R-dimensional coordinates in those bases,

  zk = (k - k_mean) @ k_basis        zv = (v - v_mean) @ v_basis          ([L, B, S, R] each)

instead of 2 * K * H numbers: R / (K * H) of a full cache (SmolLM2-135M: K * H = 192). The
latents are stored through a `kvjax.caches.codec.Codec`: at the cache dtype, or with an `intN` term
quantized per token over groups of `min(group, R)` latent dims (packed codes plus float16 scales),
or as fp8 codes with one scale per token.

Reading (what `attend` computes). A query never sees a rebuilt value: the softmax weights are
applied to the value latents and the up-projection comes last, once per query,

  out_g = (sum_s p_s zv_s) @ v_basis_g^T + v_mean_g      (g: the kv head's [H] rows of the basis)

which equals attending over the rebuilt values because the weights sum to one. Keys come in two
flavours, chosen by the maps (`fit_lowrank(rotated=...)`) and checked against the `keys=` option:

  keys="pre" (default): the basis is fitted on un-rotated keys (as Palu / Eigen Attention do) and
      the latents of un-rotated keys are stored. Each filled block of latents is turned back into
      keys [B, K, bs, H] (z @ k_basis^T + k_mean), rotated by RoPE at the block's slot positions,
      and scored against the rotated queries.
  keys="post": the basis is fitted on keys rotated at their calibration positions and the
      latents of rotated keys are stored. The key up-projection moves to the query side instead:
      q' = k_basis_g^T q (one [H] -> [R] product per query and kv head) and
      score = q' . zk + q . k_mean_g, so a step never rebuilds a key at all.

On SmolLM2 neither mode wins at every rank (docs/caches/lowrank.md): pre-RoPE is clearly better
at R = 16 and slightly at 96, post-RoPE better at 32 and 64; over the four ranks pre-RoPE has the
lower mean log-perplexity, and its basis does not depend on the positions seen in calibration
(a post-RoPE basis is fitted on positions 0 .. window-1 only). Hence the default.

Both read only the blocks below the longest row (cost follows the tokens held, as `full`). The
cache holds its own copy of the maps (a fixed cost per cache: `maps_nbytes()`), so donating a cache
never deletes the caller's. `view()` shows the rebuilt keys (rotated, as attention sees them) and
values; they are not the tokens given unless R = K * H, so `exact = False` and
`error_bound = None`. Storage of one token never depends on the others, so T tokens in one
`attend` give what one-by-one feeding gives (`chunk_exact`).

Invariants (tests/caches/test_lowrank.py): attention equals a NumPy oracle of the latent cache
(project, store, rebuild, attend); with R = K * H the logits equal the full cache's; the
reconstruction error on the calibration tokens never grows with R; `estimate_bytes` equals the
measured `nbytes()`; the `kvjax.testing` conformance kit passes with and without intN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from kvjax import attention as attn
from kvjax.attention import RoPE
from kvjax.caches import base, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches.codec import TokenStore
from kvjax.caches.registry import SpecError

KEY_MODES = ("pre", "post")


@struct.dataclass
class LowRankMaps:
  """Per-layer PCA bases of the flattened [K * H] keys and values (float32).

  k_basis, v_basis: [L, K*H, R] with orthonormal columns; k_mean, v_mean: [L, K*H].
  rotated (static): the key basis was fitted on keys rotated by RoPE (`keys="post"`).
  """

  k_basis: jax.Array
  k_mean: jax.Array
  v_basis: jax.Array
  v_mean: jax.Array
  rotated: bool = struct.field(pytree_node=False, default=False)

  @property
  def n_layers(self) -> int:
    return self.k_basis.shape[0]

  @property
  def features(self) -> int:
    return self.k_basis.shape[1]

  @property
  def rank(self) -> int:
    return self.k_basis.shape[2]

  def project(self, layer: int, k, v):
    """k, v [..., K, H] -> latents zk, zv [..., R] (float32)."""

    def one(x, basis, mean):
      flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
      return (flat - mean[layer]) @ basis[layer]

    return one(k, self.k_basis, self.k_mean), one(v, self.v_basis, self.v_mean)

  def rebuild(self, layer: int, zk, zv, kv_heads: int):
    """Latents [..., R] -> keys, values [..., K, H] (float32)."""

    def one(z, basis, mean):
      flat = z.astype(jnp.float32) @ basis[layer].T + mean[layer]
      return flat.reshape(*flat.shape[:-1], kv_heads, -1)

    return one(zk, self.k_basis, self.k_mean), one(zv, self.v_basis, self.v_mean)


@struct.dataclass
class LowRankCache(base.Limited):
  """Latents of keys and values, [L, B, S, R] each (see the module docstring).

  zk, zv: `TokenStore`s of logical shape [L, B, S, R] in the format `codec` (static) names.
  maps: this cache's own `LowRankMaps`. lengths: int32 [B] tokens seen per row.
  """

  exact = False
  error_bound = None  # the view is a projection of what was given, not bounded by a step size
  chunk_exact = True

  zk: TokenStore
  zv: TokenStore
  maps: LowRankMaps
  lengths: jax.Array
  kv_heads_: int = struct.field(pytree_node=False, default=1)
  head_dim_: int = struct.field(pytree_node=False, default=1)
  rank: int = struct.field(pytree_node=False, default=1)
  codec: codec_lib.Codec = struct.field(pytree_node=False, default=codec_lib.Codec())
  block_size: int = struct.field(pytree_node=False, default=256)
  rope: RoPE | None = struct.field(pytree_node=False, default=None)

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, maps: LowRankMaps, batch: int, kv_heads: int, head_dim: int, capacity: int,
           bits: int | None = None, group: int = 32, dtype=jnp.float32, rope: RoPE | None = None,
           block_size: int | None = None, codec: codec_lib.Codec | None = None) -> "LowRankCache":
    """Latents are stored through `codec` (default: intN from `bits` and `group`, else `dtype`)."""
    if not isinstance(capacity, int) or capacity <= 0:
      raise ValueError(f"LowRankCache: capacity must be positive, got {capacity}")
    rank = maps.rank
    if codec is None:
      if bits is not None and bits not in codec_lib.SUPPORTED_BITS:
        raise ValueError(f"LowRankCache: unsupported bit width {bits}; supported: "
                         f"{codec_lib.SUPPORTED_BITS}")
      codec = codec_lib.of_dtype(dtype) if bits is None else codec_lib.of_bits(bits, group)
    if codec.kind == "int" and rank % min(codec.group, rank):
      raise ValueError(f"LowRankCache: group:{min(codec.group, rank)} must divide the rank {rank} "
                       "(latents are quantized per token over groups of latent dims)")
    codec = codec.fitted(rank)
    bs = block_size or base.pick_block_size(capacity)
    if capacity % bs:
      raise ValueError(f"LowRankCache: block_size {bs} must divide capacity {capacity}")
    shape = (maps.n_layers, batch, capacity, rank)
    own = jax.tree_util.tree_map(jnp.array, maps)  # generate donates the cache; the caller keeps its maps
    return cls(zk=codec.empty(shape), zv=codec.empty(shape), maps=own,
               lengths=jnp.zeros((batch,), jnp.int32), kv_heads_=kv_heads, head_dim_=head_dim,
               rank=rank, codec=codec, block_size=bs, rope=rope)

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def n_layers(self) -> int:
    return self.zk.data.shape[0]

  @property
  def batch(self) -> int:
    return self.zk.data.shape[1]

  @property
  def capacity(self) -> int:
    return self.zk.data.shape[2]

  @property
  def bits(self) -> int | None:
    return self.codec.bits

  @property
  def group(self) -> int:
    return self.codec.group

  @property
  def kv_heads(self) -> int:
    return self.kv_heads_

  @property
  def head_dim(self) -> int:
    return self.head_dim_

  @property
  def keys(self) -> str:
    """'post' when the stored key latents are of rotated keys, else 'pre'."""
    return "post" if self.maps.rotated else "pre"

  # ---- latent storage -------------------------------------------------------------------------
  def _store(self, which: str, layer: int, z, slots):
    """{which: latent store `which` ('zk'/'zv') with z [B, T, R] written at slots [B, T]}."""
    rows = jnp.arange(self.batch)[:, None]
    put = lambda buf, part: buf.at[layer, rows, slots].set(part.astype(buf.dtype), mode="drop")
    return {which: getattr(self, which).map(put, self.codec.encode(z))}

  def _load(self, which: str, layer: int, start, size: int):
    """Float32 latents [B, size, R] of store `which` at slots [start, start + size)."""
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x[layer], start, size, axis=1)
    return getattr(self, which).map(cut).decode(jnp.float32)

  # ---- protocol -------------------------------------------------------------------------------
  def write(self, layer: int, k, v, n_valid=None) -> "LowRankCache":
    """Projects k, v [B, T, K, H] (as given) and stores their latents at each row's next slots.

    Slots >= capacity are dropped, never clamped; padding is written past the valid region and
    overwritten by the row's next write (as `FullCache.write`)."""
    zk, zv = self.maps.project(layer, k, v)
    slots = base.row_slots(self.lengths, k.shape[1])
    return self.replace(**self._store("zk", layer, zk, slots), **self._store("zv", layer, zv, slots))

  def advance(self, n_valid) -> "LowRankCache":
    return self.replace(lengths=self.lengths + n_valid)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Stores the new tokens' latents, then attends over the filled latent blocks of `layer`.

    Returns (out [B, T, N, H], cache); see the module docstring for the two key modes."""
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.apply_rope(rope, q, positions)
    post = self.maps.rotated
    cache = self.write(layer, attn.apply_rope(rope, k, positions) if post else k, v)
    kv_len = jnp.minimum(self.lengths + n_valid, self.capacity)
    kh, h, r, bs = self.kv_heads, self.head_dim, self.rank, self.block_size
    qg = attn.prepare_queries(q, kh, scale).astype(jnp.float32)  # [B, T, K, G, H]
    b, t, _, g, _ = qg.shape
    maps = self.maps
    if post:  # absorb the key up-projection into the queries
      k_heads = maps.k_basis[layer].reshape(kh, h, r)
      q_lat = jnp.einsum("btkgh,khr->btkgr", qg, k_heads)
      q_bias = jnp.einsum("btkgh,kh->bkgt", qg, maps.k_mean[layer].reshape(kh, h))
    visible = attn.causal_visibility(positions, kv_len)

    def body(j, stats):
      start = j * bs
      slots = start + jnp.arange(bs, dtype=jnp.int32)
      zk = cache._load("zk", layer, start, bs)  # [B, bs, R]
      zv = cache._load("zv", layer, start, bs)
      if post:
        scores = jnp.einsum("btkgr,bsr->bkgts", q_lat, zk) + q_bias[..., None]
      else:
        keys = (zk @ maps.k_basis[layer].T + maps.k_mean[layer]).reshape(b, bs, kh, h)
        keys = attn.apply_rope_bounded(rope, keys, jnp.broadcast_to(slots, (b, bs)), self.capacity)
        scores = attn.scores_of(qg, keys.swapaxes(1, 2))
      peak, weights = attn._masked_exp(scores, visible(slots)[:, :, None])
      new = (peak[..., 0], jnp.sum(weights, axis=-1), jnp.einsum("bkgts,bsr->bkgtr", weights, zv))
      return attn.combine_stats(stats, new)

    init = (jnp.full((b, kh, g, t), attn.MASKED, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, kh, g, t, r), jnp.float32))
    _, total, acc = jax.lax.fori_loop(0, attn.n_filled_blocks(kv_len, bs), body, init)
    latent = acc / jnp.maximum(total, 1e-30)[..., None]  # [B, K, G, T, R]
    v_heads = maps.v_basis[layer].reshape(kh, h, r)
    out = jnp.einsum("bkgtr,khr->bkgth", latent, v_heads)
    out = out + maps.v_mean[layer].reshape(kh, h)[None, :, None, None, :]
    return attn.ungroup(out).astype(q.dtype), cache

  def view(self) -> base.CacheView:
    """Rebuilt keys (rotated by slot position in the pre-RoPE mode) and values [L, B, K, S, H]."""
    keys, values = [], []
    slots = jnp.broadcast_to(jnp.arange(self.capacity, dtype=jnp.int32), (self.batch, self.capacity))
    for layer in range(self.n_layers):
      zk = self._load("zk", layer, 0, self.capacity)
      zv = self._load("zv", layer, 0, self.capacity)
      kl, vl = self.maps.rebuild(layer, zk, zv, self.kv_heads)  # [B, S, K, H]
      if not self.maps.rotated:
        kl = attn.apply_rope(self.rope, kl, slots)
      keys.append(kl.swapaxes(1, 2))
      values.append(vl.swapaxes(1, 2))
    dtype = self.zk.data.dtype if self.codec.is_float else jnp.float32
    return base.prefix_view(self, jnp.stack(keys).astype(dtype), jnp.stack(values).astype(dtype))

  def reset(self) -> "LowRankCache":
    return self.replace(lengths=jnp.zeros_like(self.lengths))

  def nbytes(self) -> dict[str, int]:
    """Every array: the latents (and their scales), the lengths, and the cache's copy of the maps."""
    return base.tree_nbytes(self)

  def kv_nbytes(self) -> dict[str, int]:
    """The per-token storage alone (latents, scales, lengths)."""
    return base.tree_nbytes(self.replace(maps=None))

  def maps_nbytes(self) -> int:
    return sum(base.tree_nbytes(self.maps).values())

  def logical_axes(self):
    """For `kvjax.sharding`: latents [layers, batch, slots, -]; the maps are replicated."""
    def names(x):
      return base.Names(("layers", "batch", "slots", None)[:x.ndim])

    unnamed = lambda x: base.Names((None,) * x.ndim)
    latents = {n: getattr(self, n).map(names) for n in ("zk", "zv")}
    return self.replace(**latents, maps=jax.tree_util.tree_map(unnamed, self.maps),
                        lengths=base.Names(("batch",)))

  # ---- beam search / speculative decoding -------------------------------------------------------
  def crop(self, length) -> "LowRankCache":
    """Forgets every token at position >= length (per row if length is [B])."""
    return self.replace(lengths=jnp.minimum(self.lengths, jnp.asarray(length, jnp.int32)))

  def reorder(self, indices) -> "LowRankCache":
    """Row b of the result is row indices[b] of this cache (beam reordering)."""
    indices = jnp.asarray(indices, jnp.int32)
    take = lambda x: jnp.take(x, indices, axis=1)
    return self.replace(zk=self.zk.map(take), zv=self.zv.map(take),
                        lengths=jnp.take(self.lengths, indices, axis=0))


def _needs_maps(spec) -> SpecError:
  return SpecError(
      f"{str(spec)!r} needs calibration maps: make_cache(spec, config, ..., "
      f"maps=kvjax.calibrate.fit_lowrank(model, ids, {spec.lowrank})) (or cache_options={{'maps': "
      "maps}} for generate / perplexity)")


def check_maps(spec, config, maps) -> None:
  """Clear errors for maps that do not fit `spec` and `config`."""
  if maps is None:
    raise _needs_maps(spec)
  if not isinstance(maps, LowRankMaps):
    raise TypeError(f"{str(spec)!r}: maps must be kvjax.caches.lowrank.LowRankMaps (from "
                    f"kvjax.calibrate.fit_lowrank), got {type(maps).__name__}")
  features = config.n_kv_heads * config.head_dim
  rank = spec.lowrank
  if rank > features:
    raise SpecError(f"{str(spec)!r}: rank {rank} is larger than the {features} key/value features "
                    f"per token (kv_heads {config.n_kv_heads} x head_dim {config.head_dim})")
  want = {"k_basis": (config.n_layers, features, rank), "v_basis": (config.n_layers, features, rank),
          "k_mean": (config.n_layers, features), "v_mean": (config.n_layers, features)}
  for name, shape in want.items():
    got = tuple(getattr(maps, name).shape)
    if got != shape:
      raise ValueError(f"{str(spec)!r}: maps.{name} has shape {got}, expected {shape} "
                       f"(layers, kv_heads * head_dim{', rank' if len(shape) == 3 else ''})")


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32, maps=None,
              keys: str | None = None, **options) -> LowRankCache:
  """`lowrank:R[+intN][+group:G]`: needs `maps` (`LowRankMaps` of rank R); `keys` ('pre' or
  'post', default: whatever the maps were fitted for) must agree with the maps."""
  registry.no_options("lowrank", options)
  check_maps(spec, config, maps)
  if keys is not None:
    if keys not in KEY_MODES:
      raise ValueError(f"{str(spec)!r}: keys must be one of {KEY_MODES}, got {keys!r}")
    fitted = "post" if maps.rotated else "pre"
    if keys != fitted:
      raise ValueError(f"{str(spec)!r}: keys={keys!r} but the maps were fitted on {fitted}-RoPE keys; "
                       f"fit them with kvjax.calibrate.fit_lowrank(..., rotated={keys == 'post'})")
  theta = getattr(config, "rope_theta", None)
  rope = RoPE(config.head_dim, theta) if theta is not None else None
  return LowRankCache.init(maps=maps, batch=batch, kv_heads=config.n_kv_heads,
                           head_dim=config.head_dim, capacity=capacity, dtype=dtype, rope=rope,
                           codec=codec_lib.for_spec(spec, dtype))


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """Latents of keys and values for `context` slots ([L, B, S, R] each: float, or packed codes
  plus float16 scales and zero points), the lengths, and the float32 maps (2 x [L, K*H, R + 1])."""
  r, layers = spec.lowrank, config.n_layers
  features = config.n_kv_heads * config.head_dim
  tokens = layers * batch * context
  codec = codec_lib.for_spec(spec, dtype)
  if codec.kind == "int" and r % min(codec.group, r):
    raise SpecError(f"{str(spec)!r}: group:{min(codec.group, r)} does not divide the rank {r}")
  per_token = codec.fitted(r).token_bytes(r)
  maps = 2 * layers * features * (r + 1) * 4
  return 2 * tokens * per_token + 4 * batch + maps


LOWRANK = terms.int_term("lowrank", "store R-dimensional latents of each layer's keys and values, "
                         "from projections fitted on calibration text (MLA-style; with intN the "
                         "latents are quantized)", usage="lowrank:R", kind="lowrank", rank=80,
                         check=terms.alone("lowrank", "storage", "group"), order=70)

registry.register_kind("lowrank", from_spec, estimate_bytes=estimate_bytes, terms=(LOWRANK,),
                       options=("keys",), layer_options=("maps",),
                       capacity=registry.unbounded_capacity, accepts={"bits", "group"}, builtin=True,
                       description="R-dim PCA latents of each layer's keys and values (calibrated)")
