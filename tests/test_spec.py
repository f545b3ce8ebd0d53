"""Cache specs: `parse_spec` and `str(spec)` are inverse; bad specs name the offending term.

Invariants checked:
  * for every valid CacheSpec (hypothesis builds them from the constraints in kvjax/spec.py),
    `parse_spec(str(spec)) == spec`, and the canonical string is a fixed point;
  * term order, case and spaces do not matter;
  * unknown, malformed, repeated and contradictory terms raise SpecError (a ValueError) whose
    message contains the offending term;
  * derived facts (kind, budget, bounded, lossless) follow the terms.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import kvjax
from kvjax.caches import registry
from kvjax.spec import CacheSpec, SpecError, parse_spec
from tests.helpers import examples

small = st.integers(1, 4096)


@st.composite
def valid_specs(draw):
  mode = draw(st.sampled_from(["full", "dynamic", "none"]))
  if mode == "none":
    return CacheSpec(mode="none")
  fields = {"mode": mode}
  use_tiers = mode == "full" and draw(st.booleans()) and draw(st.booleans())
  if use_tiers:
    n = draw(st.integers(1, 3))
    fields["tiers"] = tuple((draw(small), draw(st.sampled_from(kvjax.caches.tiered.TIER_DTYPES))) for _ in range(n))
  else:
    if draw(st.booleans()):
      fields["bits"] = draw(st.sampled_from([8, 4, 3, 2]))
      fields["group"] = draw(st.sampled_from([16, 32, 64, 128]))
      if draw(st.booleans()):
        fields["residual"] = fields["group"] * draw(st.integers(1, 8))
    if mode == "full" and draw(st.booleans()):
      fields["window"] = draw(small)
      fields["sink"] = draw(st.sampled_from([0, 0, 1, 4, 16]))
      if draw(st.booleans()) and fields.get("residual", 0) <= fields["window"]:
        fields["h2o"] = draw(small)  # with h2o the full-precision residual lives in the window
    elif draw(st.booleans()):
      fields["offload"] = True
  if draw(st.booleans()):
    fields["share"] = draw(st.integers(2, 6))
    fields["share_calibrated"] = draw(st.booleans())
  return CacheSpec(**fields)


@given(spec=valid_specs())
@examples(25)
def test_roundtrip(spec):
  text = str(spec)
  assert parse_spec(text) == spec, text
  assert str(parse_spec(text)) == text
  # Order, case and spaces are free.
  shuffled = " + ".join(reversed(text.upper().split("+")))
  assert parse_spec(shuffled) == spec, shuffled


@pytest.mark.parametrize("text", [
    "full", "dynamic", "none", "window:64", "sink:4+window:64", "int8", "int4+group:64",
    "int2+residual:64", "int4+residual:128+group:64", "h2o:32+window:32", "offload", "int8+offload",
    "tier:64:fp32,512:int8,4096:int2", "share:2", "share:3:cal", "int4+share:2", "dynamic+int8",
    "h2o:16+sink:4+window:64", "int8+snapkv:16+sink:4+window:64",
    "fp8", "fp8_e5m2+residual:32", "fp8+paged:16", "fp8+h2o:8+window:16", "tier:64:fp32,512:fp8",
])
def test_known_strings_roundtrip(text):
  spec = parse_spec(text)
  assert str(spec) == text
  assert parse_spec(str(spec)) == spec
  assert parse_spec(spec) is spec


def test_equivalent_spellings():
  assert parse_spec("full+window:64") == parse_spec("window:64")
  assert str(parse_spec("  WINDOW:64 + Sink:4 ")) == "sink:4+window:64"
  assert parse_spec("int4+group:32") == parse_spec("int4")  # the default group is not printed


@pytest.mark.parametrize("text,fragment", [
    ("foo", "'foo'"),
    ("full+foo:3", "'foo:3'"),
    ("int5", "int5"),
    ("intx", "'intx'"),
    ("int8:3", "'int8:3'"),
    ("window:0", "window:0"),
    ("window:-4", "window:-4"),
    ("window:abc", "'window:abc'"),
    ("window", "'window'"),
    ("sink:8", "sink:8"),
    ("residual:64", "residual:64"),
    ("int4+residual:48", "residual:48"),
    ("h2o:16", "h2o:16"),
    ("int4+residual:64+h2o:8+window:32", "residual:64 must not exceed window:32"),
    ("full+dynamic", "'dynamic'"),
    ("window:8+window:16", "'window:16'"),
    ("none+int8", "'none'"),
    ("dynamic+window:64", "'dynamic'"),
    ("tier:64", "'tier:64'"),
    ("tier:64:fp64", "'fp64'"),
    ("tier:64:fp32+window:8", "tier"),
    ("share:2:x", "'share:2:x'"),
    ("share:1:cal", "share:1:cal"),
    ("offload+window:64", "offload"),
    ("full:3", "'full:3'"),
    ("", "empty cache spec"),
    ("full++int8", "empty term"),
    ("group:0", "group:0"),
    ("fp8+group:16", "group:16 sizes intN groups; fp8"),
    ("int8+fp8", "'fp8'"),
    ("fp8:3", "'fp8:3'"),
])
def test_errors_name_the_term(text, fragment):
  with pytest.raises(SpecError, match=fragment.replace("+", r"\+")):
    parse_spec(text)
  assert issubclass(SpecError, ValueError)


def test_non_string_spec():
  with pytest.raises(TypeError, match="string or CacheSpec"):
    parse_spec(8)


def test_derived_facts():
  assert parse_spec("full").kind == "full" and parse_spec("full").lossless
  assert parse_spec("dynamic").kind == "full" and parse_spec("dynamic").lossless
  assert not parse_spec("none").uses_cache and not parse_spec("none").lossless
  w = parse_spec("h2o:16+sink:4+window:64")
  assert (w.kind, w.budget, w.bounded, w.lossless) == ("h2o", 84, True, False)
  assert parse_spec("sink:4+window:64").kind == "window"
  assert parse_spec("int4").kind == "quantized" and not parse_spec("int4").lossless
  assert parse_spec("offload").kind == "offload" and parse_spec("offload").lossless
  assert parse_spec("tier:64:fp32,512:int8").budget == 576
  assert parse_spec("share:2+window:64").kind == "shared"
  assert parse_spec("full").budget is None


def test_lossless_only_where_the_kind_is_exact():
  """`CacheSpec.lossless` never promises more than the cache it builds: lowrank:R is lossy."""
  assert not parse_spec("lowrank:8").lossless
  for name in kvjax.registered_kinds():
    for text in registry.lookup(name).examples:
      spec = parse_spec(text)
      if spec.lossless:
        assert kvjax.make_cache(spec, kvjax.TINY, 1, 16).exact, text


def test_make_cache_dtype_follows_the_model():
  """make_cache(spec, model) stores keys/values in the model's dtype (it used to be fp32 always);
  a config that names a dtype is followed too; an explicit dtype wins."""
  import jax.numpy as jnp

  half = kvjax.load("tiny", dtype=jnp.bfloat16)
  assert kvjax.make_cache("full", half, 1, 16).k.dtype == jnp.bfloat16
  assert kvjax.make_cache("full", half, 1, 16, jnp.float32).k.dtype == jnp.float32
  assert kvjax.make_cache("int8", half, 1, 32).rk.dtype == jnp.bfloat16

  class Cfg:
    n_layers, n_kv_heads, head_dim, dtype = 2, 1, 8, jnp.float16

  assert kvjax.make_cache("window:8", Cfg(), 1).k.dtype == jnp.float16
  with pytest.raises(TypeError, match="config must have a positive int n_layers"):
    kvjax.make_cache("full", object(), 1, 16)


def test_the_grammar_is_declared_by_the_kinds():
  """Every term's words parse, every term has a help line, and the messages are generated from
  the declarations, so they cannot drift from the grammar (int3 is named where intN is needed)."""
  from kvjax.caches import terms

  lines = kvjax.spec.grammar().splitlines()
  declared = terms.all_terms()
  assert len(lines) == len(declared) and all(t.doc for t in declared)
  with pytest.raises(SpecError, match="int3"):
    parse_spec("residual:32")
  with pytest.raises(SpecError, match="known: full | dynamic | none.*paged:P"):
    parse_spec("nonsense")
  order = [t.name for t in declared]
  assert order.index("storage") < order.index("window") < order.index("paged")  # canonical order


def test_kind_is_the_highest_ranked_term():
  assert parse_spec("int8+window:8").kind == "window"
  assert parse_spec("int8+h2o:2+window:8").kind == "h2o"
  assert parse_spec("share:2+int8+h2o:2+window:8").kind == "shared"
  assert parse_spec("int8+paged:4").kind == "paged" and parse_spec("dynamic").kind == "full"
  assert parse_spec("share:2+window:8").budget == 8 and parse_spec("share:2").budget is None


def test_fp8_is_one_storage_word():
  """`+fp8` (e4m3) and `+fp8_e5m2` select a codec format, like intN: 8 bits a value, one scale
  per token, and every kind that stores tokens takes it."""
  spec = parse_spec("fp8")
  assert (spec.kind, spec.bits, spec.storage, spec.lossless) == ("quantized", 8, "fp8_e4m3", False)
  assert parse_spec("fp8_e4m3") == spec and str(parse_spec("fp8_e4m3")) == "fp8"
  assert parse_spec("int8").storage is None
