"""Paged KV cache (`paged:P`): one pool of P-token pages shared by every row, a block table per row.

Layout (N pages in the pool, M = capacity / P pages per row at most):

  pool    the leaves of the keys' then the values' `kvjax.caches.codec.TokenStore`s, each
          [L, K, N, P, ...]: keys, values [L, K, N, P, H] at the cache dtype; with `intN`
          bit-packed codes [L, K, N, P, Hp] and float16 scales / zero points [L, K, N, P, H / g]
          (one per token and group of g channels); with fp8 float8 codes [L, K, N, P, H] and one
          scale [L, K, N, P, 1] per token
  pages   a `page_table.PageTable`, the allocator: the block table int32 [B, M] (table[b, j] is
          the page that holds row b's positions [jP, (j+1)P), or N, "no page"), the refcount
          int32 [N] (table entries plus pins per page; free iff 0) and the pins int32 [N]
          (references held from outside the rows: the page index of `kvjax.Engine`)
  lengths int32 [B]: tokens each row has seen
  failed  bool [B]: rows that asked for a page when the pool had none (their tokens were dropped)

Keys are stored rotated by RoPE, as in the full cache. A row's token at position p lives in slot
p % P of page table[b, p // P]. Pages are taken and given back inside jit by the pure functions of
`kvjax.caches.page_table` (the free list is the set of pages whose count is 0, read in page order;
the counts are recomputed from the table and pins after every change, so they cannot drift); this
class keeps the pool in step with them (the copy-on-write copies) and `audit()` lists any broken
allocator invariant.

Rules (checked by tests/caches/test_paged.py against a NumPy oracle):
  * the first layer's write of a call reserves pages: every page a row needs for its new tokens,
    and a private copy of a shared, partially filled last page before the row extends it
    (copy-on-write); rows take free pages in row order. Copies are decided on the counts before
    the call: when every holder of a shared page writes into it at once (forks that all take
    their next token), each takes a copy and the original goes free;
  * pool exhausted: a row that needs more pages than are free gets none; its new tokens are
    dropped (never written over another row's page) and `overflowed()` flags it for good. Outside
    jit, `kvjax.append` raises `CapacityError` first (`has_room` counts free pages). Page 0 is a
    page like any other;
  * tokens past the capacity (M pages) are dropped and flagged, as in the full cache;
  * `reorder` (beam search, parallel sampling) and `fork` copy table rows, never pages: rows that
    share a prefix share its pages until one of them writes into a shared page;
  * `crop` and `release` give pages back (a page shared with another row or pinned stays).

Attention reads a row's pages through its table, a block of pages at a time, over the blocks
below the longest row (as the full cache does over its slots), so a step's cost follows the tokens
held. Memory: `nbytes()` is the pool's (fixed when it is built, as in vLLM); `used_bytes()` what
the pages in use hold, which follows the tokens, not batch x capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from kvjax import attention as attn
from kvjax import kernels
from kvjax.caches import base, page_table, registry, terms
from kvjax.caches import codec as codec_lib
from kvjax.caches import paged_rows
from kvjax.caches.registry import SpecError


def _pool_size(batch: int, capacity: int, page_size: int, pages: int | None) -> tuple[int, int]:
  """(M pages per row, N pages in the pool; default batch x M); raises ValueError for sizes that
  are not positive ints or a capacity that is not a multiple of the page size."""
  for name, value in (("page_size", page_size), ("capacity", capacity)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"PagedCache: {name} must be a positive int, got {value!r}")
  if capacity % page_size:
    raise ValueError(f"PagedCache: capacity {capacity} is not a multiple of the page size {page_size}")
  per_row = capacity // page_size
  pages = batch * per_row if pages is None else pages
  if not isinstance(pages, (int, np.integer)) or pages <= 0:
    raise ValueError(f"PagedCache: pages must be a positive int, got {pages!r}")
  return per_row, int(pages)


def _pages_per_block(per_row: int, page_size: int) -> int:
  """Pages attention reads per block: the most that divide M and hold <= 256 tokens (one page
  when a page alone is larger)."""
  for d in range(per_row, 0, -1):
    if per_row % d == 0 and d * page_size <= max(256, page_size):
      return d
  return 1


def _halves(leaves: tuple) -> tuple[tuple, tuple]:
  """(the key store's leaves, the value store's leaves) of a pool-like tuple."""
  half = len(leaves) // 2
  return leaves[:half], leaves[half:]


@struct.dataclass
class PagedCache(base.Limited):
  """Pages shared by all rows; see the module docstring for the layout and the rules.

  pool: tuple of arrays [L, K, N, P, ...]: the leaves of the key store then of the value store
    (`TokenStore.leaves`): (keys, values) at full precision, (key codes, key scales, [key zeros],
    value codes, value scales, [value zeros]) with intN, (key codes, key scales, value codes,
    value scales) with fp8. codec (static): their format.
  pages: the allocator (`kvjax.caches.page_table`): block table [B, M], refcounts and pins [N].
  """

  pool: tuple
  pages: page_table.PageTable
  lengths: jax.Array
  failed: jax.Array
  page_size: int = struct.field(pytree_node=False)
  head_dim_: int = struct.field(pytree_node=False)
  codec: codec_lib.Codec = struct.field(pytree_node=False, default=codec_lib.Codec())
  pages_per_block: int = struct.field(pytree_node=False, default=1)
  sliding: int | tuple | None = struct.field(pytree_node=False, default=None)  # see `FullCache.sliding`
  # With an int `sliding` W: rows give back their pages wholly before position length - W + 1
  # (no later query sees them) on every write, so a row holds about W / P pages, not all it saw.
  window_only: bool = struct.field(pytree_node=False, default=False)
  # "auto" | "jnp" | "pallas": the decode kernel (`kvjax.kernels`; `choice` says which runs)
  kernel: str = struct.field(pytree_node=False, default="auto")

  # ---- construction -------------------------------------------------------------------------
  @classmethod
  def init(cls, *, n_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
           page_size: int = 16, pages: int | None = None, dtype=jnp.float32, bits: int | None = None,
           group: int = 32, codec: codec_lib.Codec | None = None,
           sliding: int | None = None, window_only: bool = False) -> "PagedCache":
    """An empty cache: `capacity` tokens per row at most (a multiple of page_size), a pool of
    `pages` pages (default: batch x capacity / page_size, room for every row to be full).
    Pages store tokens through `codec` (default: intN from `bits` and `group`, else `dtype`).
    window_only (needs an int `sliding`): pages behind the window are given back as rows
    advance (see `window_pages` for what a row then holds at most)."""
    if window_only and not isinstance(sliding, (int, np.integer)):
      raise ValueError(f"PagedCache: window_only needs one sliding window for every layer (an int "
                       f"sliding), got sliding={sliding!r}")
    per_row, pages = _pool_size(batch, capacity, page_size, pages)
    if codec is None:
      codec = codec_lib.of_dtype(dtype) if bits is None else codec_lib.of_bits(bits, group)
    if codec.kind == "int" and head_dim % min(codec.group, head_dim):
      raise SpecError(f"paged: group:{codec.group} must divide the head dim {head_dim}")
    codec = codec.fitted(head_dim)
    shape = (n_layers, kv_heads, pages, page_size, head_dim)
    pool = codec.empty(shape).leaves() + codec.empty(shape).leaves()
    return cls(pool=pool, pages=page_table.empty(batch, per_row, pages, page_size),
               lengths=jnp.zeros((batch,), jnp.int32), failed=jnp.zeros((batch,), bool),
               page_size=page_size, head_dim_=head_dim, codec=codec,
               pages_per_block=_pages_per_block(per_row, page_size),
               sliding=base.check_sliding(sliding, "PagedCache", n_layers), window_only=window_only)

  # ---- static facts ---------------------------------------------------------------------------
  @property
  def exact(self) -> bool:
    return self.codec.is_float

  @property
  def error_bound(self) -> float:
    return 0.0 if self.exact else self.codec.error_bound

  @property
  def bits(self) -> int | None:
    return self.codec.bits

  @property
  def group(self) -> int:
    return self.codec.group

  @property
  def n_layers(self) -> int:
    return self.pool[0].shape[0]

  @property
  def kv_heads(self) -> int:
    return self.pool[0].shape[1]

  @property
  def n_pages(self) -> int:
    """Pages in the pool (N); also the table's "no page" marker."""
    return self.pool[0].shape[2]

  @property
  def batch(self) -> int:
    return self.pages.batch

  @property
  def max_pages(self) -> int:
    return self.pages.max_pages

  @property
  def capacity(self) -> int:
    return self.pages.capacity

  @property
  def head_dim(self) -> int:
    return self.head_dim_

  # ---- pages (the allocator lives in `page_table`; these delegate to it) ----------------------
  @property
  def table(self) -> jax.Array:
    """int32 [B, M]: the block table (N: no page)."""
    return self.pages.table

  @property
  def refcount(self) -> jax.Array:
    """int32 [N]: table entries plus pins per page."""
    return self.pages.refcount

  @property
  def pins(self) -> jax.Array:
    """int32 [N]: references held from outside the rows."""
    return self.pages.pins

  def free_pages(self) -> jax.Array:
    """int32 []: pages nobody references."""
    return page_table.free_count(self.pages)

  def pages_in_use(self) -> jax.Array:
    """int32 []: pages some row or pin references."""
    return page_table.used_count(self.pages)

  def page_bytes(self) -> int:
    """Bytes one page holds over all layers and kv heads (keys and values, scales included)."""
    return sum(int(np.prod(a.shape[:2] + a.shape[3:])) * a.dtype.itemsize for a in self.pool)

  def used_bytes(self) -> int:
    """Bytes of the pages in use plus the bookkeeping arrays: what the tokens held cost."""
    book = sum(int(a.size) * a.dtype.itemsize
               for a in (self.table, self.lengths, self.refcount, self.pins, self.failed))
    return int(self.pages_in_use()) * self.page_bytes() + book

  def _first_live(self):
    """int32 [B]: with `window_only`, the first page a row's next query may see (None without)."""
    if not self.window_only:
      return None
    return jnp.maximum(self.lengths - self.sliding + 1, 0) // self.page_size

  def pages_needed(self, n) -> jax.Array:
    """int32 [B]: new pages each row needs to take n (int or [B]) more tokens (a copy of a shared
    last page included)."""
    return page_table.pages_needed(self.pages, self.lengths, n, self._first_live())

  def pages_short(self, n) -> jax.Array:
    """int32 []: pages the pool lacks for n (int or [B]) more tokens per row (0: they fit)."""
    return page_table.pages_short(self.pages, self.lengths, n, self._first_live())

  def _reserve(self, n_valid) -> "PagedCache":
    """Takes the pages the rows need for n_valid [B] more tokens and makes the copy-on-write
    copies in the pool (see `page_table.reserve`); refused rows are flagged `failed`. With
    `window_only` the rows first give back the pages behind their next query's window."""
    first, pages = self._first_live(), self.pages
    if first is not None:
      pages = page_table.drop_before(pages, first)
    pages, ok, src, dst = page_table.reserve(pages, self.lengths, n_valid, first)
    pool = tuple(a.at[:, :, dst].set(a[:, :, src], mode="drop") for a in self.pool)
    return self.replace(pages=pages, pool=pool, failed=self.failed | ~ok)

  # ---- storage --------------------------------------------------------------------------------
  def _decode(self, leaves) -> jax.Array:
    """Floats [..., H] from the leaves of one of keys/values (float pools as stored, else fp32)."""
    return self.codec.wrap(leaves, self.head_dim).decode(None)

  def write(self, layer: int, k, v, n_valid=None) -> "PagedCache":
    """Stores k, v [B, T, K, H] of one layer at each row's next positions (lengths unchanged).
    The call for layer 0 reserves the pages first (every layer uses the same pages)."""
    n_valid = base.normalize_n_valid(n_valid, self.batch, k.shape[1], what="PagedCache.write")
    cache = self._reserve(n_valid) if layer == 0 else self
    p = self.page_size
    pos = base.row_slots(cache.lengths, k.shape[1])  # [B, T]
    col = jnp.minimum(pos // p, self.max_pages - 1)
    page = jnp.take_along_axis(cache.table, col, axis=1)
    real = ((jnp.arange(k.shape[1])[None, :] < n_valid[:, None]) & (pos < self.capacity)
            & ~cache.failed[:, None])
    page = jnp.where(real, page, self.n_pages)  # padding, overflow and failed rows: dropped
    slot = pos % p
    new = self.codec.encode(k).leaves() + self.codec.encode(v).leaves()
    pool = tuple(a.at[layer, :, page, slot].set(x, mode="drop") for a, x in zip(cache.pool, new))
    return cache.replace(pool=pool)

  def advance(self, n_valid) -> "PagedCache":
    return self.replace(lengths=self.lengths + n_valid)

  def _load_block(self, layer: int, start):
    """(k, v [B, K, bs, H]) of positions [start, start + bs) of every row, through its table."""
    ppb, p = self.pages_per_block, self.page_size
    ids = jax.lax.dynamic_slice_in_dim(self.table, start // p, ppb, axis=1)  # [B, ppb]
    ids = jnp.minimum(ids, self.n_pages - 1)  # "no page" reads a real page; it is masked
    # one gather straight from the pool ([B, ppb, K, P, ...]): slicing the layer out first made
    # XLA copy the whole layer's pool on every block
    leaves = tuple(jnp.swapaxes(a[layer, :, ids], 1, 2) for a in self.pool)  # [B, K, ppb, P, ...]
    flat = tuple(x.reshape(x.shape[:2] + (ppb * p,) + x.shape[4:]) for x in leaves)
    kl, vl = _halves(flat)
    return self._decode(kl), self._decode(vl)

  def attend(self, layer: int, q, k, v, n_valid=None, *, rope=None, scale=None):
    """Rotates, stores and attends over the row's filled pages. Returns (out [B,T,N,H], cache)."""
    n_valid, positions = base.attend_inputs(self, q, k, v, n_valid)
    q = attn.apply_rope(rope, q, positions)
    cache = self.write(layer, attn.apply_rope(rope, k, positions), v, n_valid)
    kv_len = jnp.where(cache.failed, 0, jnp.minimum(self.lengths + n_valid, self.capacity))
    qg = attn.prepare_queries(q, self.kv_heads, scale)
    bs = self.pages_per_block * self.page_size

    def jnp_path():
      return attn.attend_prefix_blocks(qg, lambda start: cache._load_block(layer, start),
                                       positions, kv_len, bs, base.layer_sliding(self.sliding, layer))

    choice = self.choice(q.shape[1], layer)
    if choice.is_jnp:
      return jnp_path(), cache
    keys, values = _halves(tuple(a[layer] for a in cache.pool))  # (data[, scale [K, N, P, 1]])
    scales = (keys[1][..., 0], values[1][..., 0]) if self.codec.kind == "fp8" else None
    return kernels.paged_decode(choice, qg, keys[0], values[0], cache.table, kv_len, jnp_path,
                                scales), cache

  def choice(self, queries: int, layer: int = 0, on: str | None = None) -> kernels.Choice:
    """The kernel `attend` runs for `queries` tokens per row at `layer` (`kvjax.kernels.choose`;
    on: the platform, default the current one)."""
    return kernels.choose(self.kernel, "paged", queries=queries, head_dim=self.head_dim,
                          window=base.layer_sliding(self.sliding, layer),
                          storage=self.codec.kind, pages_per_row=self.max_pages,
                          page_size=self.page_size, on=on)

  # ---- capacity -------------------------------------------------------------------------------
  def has_room(self, n: int) -> jax.Array:
    """bool []: every row can take n more tokens: below the capacity, and enough free pages."""
    return ((jnp.max(self.lengths) + n <= self.capacity)
            & (jnp.sum(self.pages_needed(n)) <= self.free_pages()) & ~jnp.any(self.failed))

  def overflowed(self) -> jax.Array:
    """bool [B]: rows given more tokens than the capacity, or refused a page by a full pool."""
    return (self.lengths > self.capacity) | self.failed

  # ---- inspection ---------------------------------------------------------------------------
  def view(self) -> base.CacheView:
    """Dense [L, B, K, capacity, H] picture: position s of row b at slot s."""
    leaves = tuple(jnp.swapaxes(a[:, :, jnp.minimum(self.table, self.n_pages - 1)], 1, 2)
                   for a in self.pool)  # [L, B, K, M, P, ...]
    flat = tuple(x.reshape(x.shape[:3] + (self.capacity,) + x.shape[5:]) for x in leaves)
    kl, vl = _halves(flat)
    view = base.prefix_view(self, self._decode(kl), self._decode(vl))
    if not self.window_only:
      return view
    # positions whose page was given back (behind the window) are no longer held
    held = jnp.repeat(self.table < self.n_pages, self.page_size, axis=1)  # [B, S]
    held = jnp.broadcast_to(held[None, :, None, :], view.mask.shape)
    return view.replace(mask=view.mask & held, positions=jnp.where(held, view.positions, -1))

  def filled(self) -> jax.Array:
    return jnp.where(self.failed, 0, jnp.minimum(self.lengths, self.capacity))

  # ---- rows (the surgery the engine and the prefix store do: `kvjax.caches.paged_rows`) ---
  def reset(self) -> "PagedCache":
    """Empty: no page referenced, no pin, no failure (the pool keeps stale values)."""
    return self.replace(pages=page_table.reset(self.pages), lengths=jnp.zeros_like(self.lengths),
                        failed=jnp.zeros_like(self.failed))

  def crop(self, length) -> "PagedCache":
    """Forgets every token at position >= length (per row if [B]); pages past it are given back."""
    lengths = jnp.minimum(self.lengths, jnp.asarray(length, jnp.int32))
    return self.replace(pages=page_table.crop(self.pages, lengths), lengths=lengths)

  def reorder(self, indices) -> "PagedCache":
    """Row b of the result is row indices[b]: rows point at the same pages, nothing is copied."""
    indices = jnp.asarray(indices, jnp.int32)
    return self.replace(pages=page_table.reorder(self.pages, indices),
                        lengths=jnp.take(self.lengths, indices), failed=jnp.take(self.failed, indices))

  def fork(self, src, dst) -> "PagedCache":
    """Rows dst[i] share the pages of rows src[i] (int [n] each); see `paged_rows.fork`."""
    return paged_rows.fork(self, src, dst)

  def release(self, rows) -> "PagedCache":
    """Empties the rows where rows (bool [B]) is true and gives their pages back."""
    return paged_rows.release(self, rows)

  def compact(self) -> "PagedCache":
    """The same rows in a pool of only the pages they reference (outside jit)."""
    return paged_rows.compact(self)

  def widen(self, batch: int, room: int) -> "PagedCache":
    """`batch` rows sharing this batch-1 cache's pages, with room for `room` more tokens each."""
    return paged_rows.widen(self, batch, room)

  def audit(self) -> list[str]:
    """The allocator's broken invariants (`page_table.audit`; rows refused a page are not held
    to their lengths), as sentences; empty when all hold. Outside jit."""
    return page_table.audit(self.pages, self.lengths, rows=~np.asarray(self.failed),
                            window=self.sliding if self.window_only else None)


def window_pages(window: int, page_size: int, chunk: int) -> int:
  """Pages a `window_only` row holds at most when it writes up to `chunk` tokens at a time: those
  of positions [length - window + 1, length + chunk), which straddle at most one more page."""
  return -(-(window - 1 + chunk) // page_size) + 1


def pages_for(row_tokens, page_size: int) -> int:
  """Pages a pool needs for rows that will hold `row_tokens` [B] tokens each (no sharing)."""
  return max(1, int(np.sum(-(-np.asarray(row_tokens, np.int64) // page_size))))


def from_spec(spec, config, *, batch: int, capacity: int, dtype=jnp.float32, pages: int | None = None,
              sliding: int | None = None, window_only: bool = False, **options) -> PagedCache:
  """`paged:P[+intN][+group:G]`; option `pages=` sizes the pool (default: every row full),
  `sliding=` a sliding-window layer's W (see `FullCache.sliding`; every page is still held unless
  `window_only`: see `PagedCache.window_only`)."""
  registry.no_options("paged", options)
  p = spec.paged
  capacity = -(-capacity // p) * p
  return PagedCache.init(n_layers=config.n_layers, batch=batch, kv_heads=config.n_kv_heads,
                         head_dim=config.head_dim, capacity=capacity, page_size=p, pages=pages,
                         dtype=dtype, codec=codec_lib.for_spec(spec, dtype), sliding=sliding,
                         window_only=window_only)


def estimate_bytes(spec, config, context: int, batch: int, dtype) -> int:
  """The default pool (every row full) plus the table and counters."""
  p, h = spec.paged, config.head_dim
  per_row = -(-context // p)
  per_token = 2 * codec_lib.for_spec(spec, dtype).fitted(h).token_bytes(h)
  pages = batch * per_row
  return (registry.streams(config, batch) * per_row * p * per_token
          + 4 * batch * per_row + 4 * batch + 8 * pages + batch)


def _capacity(spec, *, needed: int, prompt: int) -> int:
  cap = registry.bucket(needed)
  return -(-cap // spec.paged) * spec.paged


PAGED = terms.int_term("paged", "keys/values live in a pool of P-token pages shared by all rows, "
                       "with a block table per row (vLLM-style); with intN the pages are "
                       "quantized", usage="paged:P", kind="paged", rank=90,
                       check=terms.alone("paged", "storage", "group"), order=80)

registry.register_kind("paged", from_spec, estimate_bytes=estimate_bytes, capacity=_capacity,
                       options=("pages", "sliding"),
                       terms=(PAGED,), lossless=lambda spec: spec.bits is None,
                       builtin=True, examples=("paged:4", "paged:4+int8+group:4"),
                       description="pages of P tokens in a pool shared by all rows, a block table per row")
