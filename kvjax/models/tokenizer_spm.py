"""SentencePiece-style tokenizer for GGUF ``tokenizer.ggml.model = "llama"`` vocabularies.

It reproduces llama.cpp's SPM tokenizer (``llm_tokenizer_spm`` and ``tokenizer_st_partition`` in
llama.cpp's src/llama-vocab.cpp), which is the reference for these files (Gemma 3, Llama 2, ...).
The vocabulary carries a score per token and no merge list; encoding is

1. Partition on whole tokens. USER_DEFINED tokens (type 4) are always cut out of the raw text as
   they are; CONTROL (3) and UNKNOWN (2) tokens too when ``parse_special`` is on. Like llama.cpp
   the tokens are taken longest first, and each one is cut at all its leftmost non-overlapping
   occurrences in every fragment still left as text before the next (shorter) one is looked for.
2. Each text fragment: a space is prepended if ``add_space_prefix`` and the fragment opens the
   text or follows a cut-out token; every ' ' becomes U+2581; the fragment is split into
   characters. Every adjacent pair whose concatenation is a vocabulary token goes into a max-heap
   keyed by that token's score, the leftmost pair first on equal scores. The best pair is popped
   (entries whose symbols have changed since are skipped), merged, and the pairs it now forms
   with its two neighbours are pushed, until the heap is empty.
3. Every final symbol that is a token gives its id; any other is a single character outside the
   vocabulary (a merge only ever produces tokens), which falls back to its UTF-8 bytes as the
   ``<0xXX>`` byte tokens (type 6).
4. BOS is prepended if asked for (default: ``tokenizer.ggml.add_bos_token``), EOS appended
   likewise (``add_eos_token``).

Decoding maps NORMAL tokens to their text with U+2581 -> ' ', BYTE tokens to their byte, CONTROL,
UNKNOWN and USER_DEFINED tokens to their text, UNUSED tokens (type 5) to nothing (llama.cpp's
``token_to_piece``), then reads the bytes as UTF-8 with U+FFFD for invalid sequences.
``skip_special_tokens`` drops CONTROL and UNKNOWN tokens. With ``add_space_prefix`` the one space
the encoder put in front of the text is removed again.

The lookup tables for a vocabulary (262 144 entries for Gemma 3) are built once and shared by
every tokenizer made from the same token list, scores and types.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import struct
import threading
from typing import Iterable, Optional, Sequence

from kvjax.models.tokenizer import (TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNKNOWN,
                                    TOKEN_UNUSED, TOKEN_USER_DEFINED, StreamDecoder,
                                    TokenizerError, _GgufIds, _TemplateMixin)

_SPACE = "\u2581"

# Spellings llama.cpp takes for end-of-turn/-generation and fill-in-the-middle tokens when it
# loads a vocabulary (llama_vocab::impl::load, "auto-detect special tokens by text"); whatever
# their type in the file, it makes them CONTROL. So Gemma 3's "</s>", USER_DEFINED in the file
# (the HTML strike-through tag), is a control token there: not matched in text unless specials
# are parsed, dropped by decode with skip_special_tokens.
_CONTROL_BY_TEXT = frozenset([
    # end of turn / message / generation
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    # fill in the middle
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "<|code_prefix|>", "<|prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "<|code_middle|>", "<|middle|>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
])
# ... except that "</s>" is made a NORMAL token again in vocabularies that have one of these.
_PLAIN_CLOSING_S_WITH = ("<|tool_response>", "<|plamo:eos|>")
# Fragments remembered per tokenizer (text -> ids); prose repeats lines and words often.
_FRAGMENT_CACHE_SIZE = 1 << 16


class _Vocab:
  """The per-vocabulary tables: text -> id, scores, token bytes, whole-token partition lists."""

  def __init__(self, tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]):
    n = len(tokens)
    self.tokens = tuple(tokens)
    # llama.cpp keeps the last id of a duplicated text (token_to_id[word] = i).
    self.text_to_id = {t: i for i, t in enumerate(self.tokens)}
    # Token types as llama.cpp ends up using them (see _CONTROL_BY_TEXT).
    types = [int(t) for t in types]
    for text in _CONTROL_BY_TEXT:
      i = self.text_to_id.get(text)
      if i is not None and types[i] not in (TOKEN_CONTROL, TOKEN_UNKNOWN):
        types[i] = TOKEN_CONTROL
    s_id = self.text_to_id.get("</s>")
    if s_id is not None and any(t in self.text_to_id for t in _PLAIN_CLOSING_S_WITH):
      types[s_id] = TOKEN_NORMAL
    self.types = tuple(types)
    self.scores = tuple(float(s) for s in scores)
    # Score of every token text, for the merge loop (one dict look-up per candidate pair).
    self.text_score = {t: self.scores[i] for t, i in self.text_to_id.items()}

    byte_ids = [None] * 256
    for b in range(256):
      i = self.text_to_id.get(f"<0x{b:02X}>")
      if i is None:  # llama.cpp falls back to a token spelled as the byte itself
        i = self.text_to_id.get(chr(b)) if b < 128 else None
      byte_ids[b] = i
    self.byte_ids = tuple(byte_ids)

    token_bytes = []
    for i, (t, ty) in enumerate(zip(self.tokens, self.types)):
      if ty == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
        token_bytes.append(bytes([int(t[3:5], 16)]))
      elif ty == TOKEN_UNUSED:
        token_bytes.append(b"")
      elif ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
        token_bytes.append(t.encode("utf-8", "surrogatepass"))
      else:
        token_bytes.append(t.replace(_SPACE, " ").encode("utf-8", "surrogatepass"))
    self.token_bytes = tuple(token_bytes)
    self.special_ids = frozenset(
        i for i, ty in enumerate(self.types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN))

    # Whole tokens for the partition step, longest in UTF-8 bytes first. Ties go by id;
    # llama.cpp's sort is not stable, which only matters for two equal-length whole tokens that
    # can overlap each other in a text (none in Gemma 3's vocabulary).
    def whole(kinds):
      ids = [i for i in range(n) if self.types[i] in kinds]
      ids.sort(key=lambda i: (-len(self.tokens[i].encode("utf-8", "surrogatepass")), i))
      return tuple((self.tokens[i], i) for i in ids)

    self.user_defined = whole((TOKEN_USER_DEFINED,))
    self.all_whole = whole((TOKEN_USER_DEFINED, TOKEN_CONTROL, TOKEN_UNKNOWN))
    # First characters of the whole tokens, to skip those that cannot occur in a text.
    self.first_chars_ud = frozenset(t[0] for t, _ in self.user_defined)
    self.first_chars_all = frozenset(t[0] for t, _ in self.all_whole)


_VOCABS: dict = {}
_VOCABS_LOCK = threading.Lock()


def _vocab_key(tokens, scores, types) -> str:
  h = hashlib.blake2b(digest_size=16)
  h.update(len(tokens).to_bytes(8, "little"))
  h.update("\0".join(tokens).encode("utf-8", "surrogatepass"))
  h.update(struct.pack(f"<{len(scores)}d", *scores))
  h.update(struct.pack(f"<{len(types)}q", *types))
  return h.hexdigest()


def _get_vocab(tokens, scores, types) -> _Vocab:
  key = _vocab_key(tokens, scores, types)
  with _VOCABS_LOCK:
    vocab = _VOCABS.get(key)
    if vocab is None:
      vocab = _VOCABS[key] = _Vocab(tokens, scores, types)
    return vocab


def _spm_pieces(text: str, text_score: dict) -> list[str]:
  """llama.cpp's SPM merge loop on one (already escaped) fragment; the final symbols in order."""
  n = len(text)
  if n < 2:
    return [text] if n else []
  sym = list(text)
  nxt = list(range(1, n + 1))
  nxt[-1] = -1
  prv = list(range(-1, n - 1))
  heap = []
  get = text_score.get
  for i in range(n - 1):
    pair = text[i:i + 2]
    score = get(pair)
    if score is not None:
      heap.append((-score, i, i + 1, 2))
  heapq.heapify(heap)
  pop, push = heapq.heappop, heapq.heappush
  while heap:
    _, left, right, size = pop(heap)
    a, b = sym[left], sym[right]
    # Stale: one side was merged away, or the right side grew since the pair was pushed.
    if not a or not b or len(a) + len(b) != size:
      continue
    merged = a + b
    sym[left] = merged
    sym[right] = ""
    after = nxt[right]
    nxt[left] = after
    if after >= 0:
      prv[after] = left
    before = prv[left]
    if before >= 0:
      pair = sym[before] + merged
      score = get(pair)
      if score is not None:
        push(heap, (-score, before, left, len(pair)))
    if after >= 0:
      pair = merged + sym[after]
      score = get(pair)
      if score is not None:
        push(heap, (-score, left, after, len(pair)))
  out = []
  i = 0
  while i >= 0:
    out.append(sym[i])
    i = nxt[i]
  return out


class SpmTokenizer(_GgufIds, _TemplateMixin):
  """SentencePiece (GGUF "llama" model) tokenizer with llama.cpp's exact encoding.

  Same interface as `Tokenizer`. `encode` matches CONTROL tokens written in the text (e.g.
  ``<start_of_turn>``) whole by default, as `Tokenizer.encode` does, so chat prompts rendered
  as text tokenize as intended; pass ``parse_special=False`` to tokenize such text as plain
  characters (llama.cpp's ``parse_special=false``). USER_DEFINED tokens are matched whole either
  way.
  """

  def __init__(self, metadata: dict):
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "llama":
      raise TokenizerError(f"tokenizer.ggml.model is {kind!r}; SpmTokenizer reads 'llama' only")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
      raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens")
    n = len(tokens)
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
      scores = [0.0] * n
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None:
      types = [TOKEN_NORMAL] * n
    if len(scores) < n or len(types) < n:
      raise TokenizerError("tokenizer.ggml.scores / token_type are shorter than the token list")
    # llama.cpp renames empty tokens; an empty text can never be produced by encoding.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    self._v = _get_vocab(tokens, list(scores[:n]), list(types[:n]))
    self.pre_type = metadata.get("tokenizer.ggml.pre", "default") or "default"

    self._read_ids(metadata)
    self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    self.add_space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    self.chat_template = metadata.get("tokenizer.chat_template") or None
    self._special_strings = {
        f"{name}_token": (self._v.tokens[i] if i is not None else None)
        for name, i in (("bos", self._bos), ("eos", self._eos), ("pad", self._pad),
                        ("unk", self._unk))}
    self._fragment_ids = functools.lru_cache(maxsize=_FRAGMENT_CACHE_SIZE)(self._encode_fragment)

  @classmethod
  def from_metadata(cls, metadata: dict) -> "SpmTokenizer":
    return cls(metadata)

  # -- encoding --------------------------------------------------------------------------------

  def _partition(self, text: str, parse_special: bool) -> list:
    """`text` cut into plain-text pieces (str) and whole-token ids (int), in order."""
    v = self._v
    whole, first = ((v.all_whole, v.first_chars_all) if parse_special
                    else (v.user_defined, v.first_chars_ud))
    parts: list = [text]
    if not first.intersection(text):
      return parts
    for tok, tid in whole:
      if tok[0] not in text or tok not in text:
        continue
      out = []
      for part in parts:
        if type(part) is int or tok not in part:
          out.append(part)
          continue
        pieces = part.split(tok)
        for k, piece in enumerate(pieces):
          if k:
            out.append(tid)
          if piece:
            out.append(piece)
      parts = out
    return parts

  def _encode_fragment(self, fragment: str) -> tuple:
    v = self._v
    ids = []
    text_to_id = v.text_to_id
    for piece in _spm_pieces(fragment.replace(" ", _SPACE), v.text_score):
      i = text_to_id.get(piece)
      if i is not None:
        ids.append(i)
        continue
      for b in piece.encode("utf-8", "surrogatepass"):
        bid = v.byte_ids[b]
        if bid is None:
          if self._unk is None:
            raise TokenizerError(f"byte 0x{b:02X} has no token and there is no unknown token")
          bid = self._unk
        ids.append(bid)
    return tuple(ids)

  def encode(self, text: str, add_bos: Optional[bool] = None, *, add_eos: Optional[bool] = None,
             parse_special: bool = True) -> list[int]:
    """Token ids of `text`.

    BOS is prepended if `add_bos` (default: the file's add_bos_token, True for Gemma 3) and EOS
    appended if `add_eos` (default: add_eos_token). Special-token strings in `text` map to their
    ids unless `parse_special` is False.
    """
    ids = []
    if (self.add_bos if add_bos is None else add_bos) and self._bos is not None:
      ids.append(self._bos)
    prev_whole = True
    if text:
      for part in self._partition(text, parse_special):
        if type(part) is int:
          ids.append(part)
          prev_whole = True
          continue
        if self.add_space_prefix and prev_whole:
          part = " " + part
        ids.extend(self._fragment_ids(part))
        prev_whole = False
    if (self.add_eos if add_eos is None else add_eos) and self._eos is not None:
      ids.append(self._eos)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  # -- decoding --------------------------------------------------------------------------------

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; byte sequences that are not valid UTF-8 come out as U+FFFD."""
    dec = self.stream_decoder(skip_special_tokens)
    return dec.push_many(ids) + dec.flush()

  def id_to_token(self, i: int) -> str:
    return self._v.tokens[i]

  def token_bytes(self, i: int) -> bytes:
    """The raw bytes token `i` stands for (U+2581 as a space; a byte token: its byte)."""
    tb = self._v.token_bytes
    if not 0 <= i < len(tb):
      raise ValueError(f"token id {i} is outside the vocabulary (0..{len(tb) - 1})")
    return tb[i]

  def token_to_id(self, token: str) -> Optional[int]:
    return self._v.text_to_id.get(token)

  def is_special(self, i: int) -> bool:
    return int(i) in self._v.special_ids

  def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
    return _SpmStreamDecoder(self, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
    if self.chat_template is None:
      raise TokenizerError("this GGUF file carries no tokenizer.chat_template")
    return super().apply_chat_template(messages, add_generation_prompt, **extra)

  @property
  def vocab_size(self) -> int:
    return len(self._v.tokens)

  @property
  def special_ids(self) -> frozenset:
    return self._v.special_ids

  def __repr__(self) -> str:
    return (f"SpmTokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, "
            f"pad={self.pad_id}, add_bos={self.add_bos}, "
            f"add_space_prefix={self.add_space_prefix})")


class _SpmStreamDecoder(StreamDecoder):
  """`StreamDecoder` that also drops the space the encoder prefixed (add_space_prefix)."""

  def __init__(self, tokenizer: SpmTokenizer, skip_special_tokens: bool = False):
    super().__init__(tokenizer, skip_special_tokens=skip_special_tokens)
    self._strip = tokenizer.add_space_prefix

  def push(self, token_id: int) -> str:
    token_id = int(token_id)
    if self._skip and self._tok.is_special(token_id):
      return ""
    data = self._tok.token_bytes(token_id)
    if self._strip and data:
      self._strip = False
      if data[:1] == b" ":
        data = data[1:]
    return self._utf8.decode(data)
