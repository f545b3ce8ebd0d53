"""The engine's page accounting (kvjax.engine.admission) on the allocator alone, no model.

Invariants: a request (prompt, max_new_tokens, n samples) run through `page_table` as the engine
runs it (prefill row 0, fork it to the other samples, then one token per running row per step)
fits a pool of exactly `need` pages with no refusal, and a pool one page smaller refuses a row: the
count is exact, not padded. Right after admission the free pages beyond `promised` are the pool's
spare, and they never go negative while the request runs. `adoptions` gives up a partially filled
hit page as its second choice; `audit` finds nothing in these states and names an idle row that
still holds tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvjax.caches import page_table
from kvjax.engine import admission
from tests.helpers import examples

M = 8  # pages per row at most


def run_request(prompt: int, new: int, n: int, p: int, n_pages: int):
  """Runs one request through a pool of n_pages pages; returns (refused, spare after admission,
  least spare while running)."""
  pages = page_table.empty(n, M, n_pages, p)
  lengths = jnp.zeros(n, jnp.int32)
  pages, ok, _, _ = page_table.reserve(pages, lengths, jnp.asarray([prompt] + [0] * (n - 1)))
  refused = not bool(np.all(ok))
  lengths = lengths.at[0].set(prompt)
  if n > 1:
    pages = page_table.fork(pages, jnp.zeros(n - 1, jnp.int32), jnp.arange(1, n, dtype=jnp.int32))
    lengths = jnp.full(n, prompt, jnp.int32)
  end = prompt + new - 1  # the last token drawn is never fed back
  ends = {r: end for r in range(n)}
  first = least = admission.spare(pages, lengths, ends, p)
  while int(lengths.min()) < end:
    step = (lengths < end).astype(jnp.int32)
    pages, ok, _, _ = page_table.reserve(pages, lengths, step)
    refused |= not bool(np.all(ok))
    lengths = lengths + step
    least = min(least, admission.spare(pages, lengths, ends, p))
  return refused, first, least


@examples(20)
@given(prompt=st.integers(1, 20), new=st.integers(1, 12), n=st.integers(1, 3),
       p=st.sampled_from([2, 4, 8]))
def test_need_is_exactly_the_pages_a_request_takes(prompt, new, n, p):
  if prompt + new > M * p:
    return
  need = admission.need(prompt, prompt + new - 1, n, 0, 0, p)
  refused, first, least = run_request(prompt, new, n, p, need)
  assert not refused and first == 0 and least >= 0
  if need > 1:
    refused, _, _ = run_request(prompt, new, n, p, need - 1)
    assert refused


def test_adoptions_give_up_a_partial_hit_page_second():
  assert admission.adoptions([], 9, 4) == [([], 0)]
  assert admission.adoptions([5, 6], 12, 4) == [([5, 6], 8)]  # 2 full pages; token 12 recomputed
  assert admission.adoptions([5, 6, 7], 12, 4) == [([5, 6, 7], 11), ([5, 6], 8)]  # 11 % 4: a copy


def test_audit_names_an_idle_row_that_holds_tokens():
  class Cache:  # the three fields `audit` reads
    pages = page_table.empty(2, M, 8, 4)
    lengths = jnp.asarray([3, 0], jnp.int32)
    failed = jnp.zeros(2, bool)
  Cache.pages, _, _, _ = page_table.reserve(Cache.pages, jnp.zeros(2, jnp.int32), Cache.lengths)
  assert admission.audit(Cache, {0: 6}, [], 4) == []
  assert admission.audit(Cache, {}, [], 4) == ["idle row 0 still holds 3 tokens"]
