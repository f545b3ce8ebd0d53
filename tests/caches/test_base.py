"""The protocol itself: ten members, a capabilities record, extension protocols by isinstance.

Invariants checked:
  * `KVCache` requires exactly the ten members `REQUIRED_MEMBERS` names, and every built-in kind
    (each registered example spec) has them and the derived members kvjax relies on;
  * `caps` is a frozen `Capabilities` agreeing with the kind's attributes, and a wrapper claims
    only the verbs its inner caches allow;
  * optional powers are extension protocols: only the paged kind is `PagedStorage`.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

import kvjax
from kvjax.caches import base


def test_ten_required_members():
  protocol_members = {name for name in dir(base.KVCache) if not name.startswith("_")}
  assert len(base.REQUIRED_MEMBERS) == 10
  assert set(base.REQUIRED_MEMBERS) == protocol_members | set(typing.get_type_hints(base.KVCache))


@pytest.mark.parametrize("text", ["full", "window:8", "int8", "h2o:2+window:4", "tier:4:fp32,4:int8",
                                  "share:2+window:8", "paged:4", "offload", "snapkv:2+window:4+pyramid"])
def test_every_kind_follows_the_protocol(text):
  cache = kvjax.make_cache(text, kvjax.TINY, 2, 16)
  base.check_cache(cache)
  assert isinstance(cache, kvjax.KVCache)
  caps = cache.caps
  assert (caps.limited, caps.exact, caps.chunk_exact) == (cache.limited, cache.exact, cache.chunk_exact)
  assert dataclasses.astuple(cache.sizes) == (cache.n_layers, cache.batch, cache.kv_heads,
                                              cache.head_dim, cache.capacity)
  with pytest.raises(dataclasses.FrozenInstanceError):
    caps.exact = True
  assert isinstance(cache, base.PagedStorage) == (text == "paged:4")


def test_wrappers_claim_what_they_wrap():
  shared_tiers = kvjax.make_cache("share:2+tier:4:fp32,4:int8", kvjax.TINY, 1)
  assert "crop" not in shared_tiers.caps.verbs and "reorder" in shared_tiers.caps.verbs
  shared_full = kvjax.make_cache("share:2", kvjax.TINY, 1, 16)
  assert {"crop", "reorder"} <= shared_full.caps.verbs and not shared_full.caps.exact
  pyramid = kvjax.make_cache("h2o:4+window:4+pyramid", kvjax.TINY, 1)
  assert pyramid.caps.lossless_tokens == min(c.capacity for c in pyramid.layers)


def test_a_kind_missing_members_is_told_which():
  class Half:
    lengths = None

  with pytest.raises(TypeError, match="lacks sizes, caps, attend"):
    base.check_cache(Half(), "generate")
