"""Tokenizers: byte-level BPE rebuilt from GGUF metadata, and a byte tokenizer for `tiny`.

`Tokenizer` reconstructs, on the `tokenizers` library, the tokenizer a GGUF describes in its
``tokenizer.*`` metadata (vocabulary, merges, token types, special ids, chat template). For
SmolLM2 (``tokenizer.ggml.model = "gpt2"``, ``tokenizer.ggml.pre = "smollm"``) the pipeline is

  normalizer     none
  pre-tokenizer  Digits(individual_digits=True), then ByteLevel(add_prefix_space=False,
                 use_regex=True) -- i.e. every digit is its own piece, and the text between
                 them is split with the GPT-2 regex
                   's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
                 and mapped to the GPT-2 byte alphabet
  model          BPE (merges from the file, no unk token, no dropout, no byte fallback)
  decoder        ByteLevel
  added tokens   the 17 CONTROL tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...) as special
                 tokens, matched whole in the input text
  post-processor none: add_bos_token is False, nothing is added to encodings

This is the pipeline of SmolLM2's own tokenizer.json and of llama.cpp's "smollm" pre-tokenizer.
transformers (5.x) builds its GGUF tokenizer from the same metadata but does not know the
"smollm" pre-type and leaves out the Digits step. No merge in the vocabulary involves an ASCII
digit, so the two agree except where whitespace precedes a numeric character: "a  1" and
"\\n\\n1." split the whitespace run differently, and " \u00bd" (a space before a non-ASCII
numeric) can merge the space with the character's first byte. tests/fixtures/tokenizer_cases.json
records both variants for such strings.
"""

from __future__ import annotations

import codecs
import functools
import json
from typing import Iterable, Optional, Sequence

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(1, 7)

# GPT-2's split pattern (also the regex ByteLevel applies when use_regex=True).
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# Llama-3 style split (numbers in groups of up to three, case-insensitive contractions).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre values -> how the text is split before BPE.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_ONLY = {"gpt2", "default", "gpt-2", ""}
_LLAMA3_STYLE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"}

# Default chat format for tokenizers whose metadata carries no template (ChatML, like SmolLM2).
_CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


class TokenizerError(ValueError):
  """The metadata does not describe a tokenizer kvjax can rebuild."""


@functools.lru_cache(maxsize=None)
def _byte_alphabet() -> tuple[str, ...]:
  """GPT-2's printable stand-in character for each byte value 0..255."""
  # Bytes that are printable and not whitespace keep their own code point; the rest are moved
  # to 256, 257, ... in increasing byte order.
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
          + list(range(0xAE, 0xFF + 1)))
  table = {}
  extra = 256
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(extra)
      extra += 1
  return tuple(table[b] for b in range(256))


def _compile_template(source: str):
  import jinja2
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  # Same environment settings as transformers' chat templating, so templates render identically.
  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  return env.from_string(source)


class _TemplateMixin:
  """Chat templating shared by both tokenizers."""

  chat_template: str
  _special_strings: dict

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                          **extra) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}]) with the model's Jinja chat template.

    Returns the prompt text; tokenize it with `encode` (special tokens in it are matched whole).
    """
    template = getattr(self, "_compiled_template", None)
    if template is None:
      template = self._compiled_template = _compile_template(self.chat_template)
    return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                           **{**self._special_strings, **extra})

  def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
    return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


def _bpe_tables(tokens, merges, alphabet) -> tuple[dict, list]:
  """The BPE vocabulary (spelling -> id) and merge pairs. Tokens are already spelled in the byte
  alphabet; a token that is not (raw text some converters store for added tokens) is re-spelled
  from its UTF-8 bytes for BPE lookups."""
  alphabet_set = frozenset(alphabet)
  vocab = {}
  for i, tok in enumerate(tokens):
    spelled = tok if set(tok) <= alphabet_set else "".join(alphabet[b] for b in tok.encode())
    vocab.setdefault(spelled, i)
  pairs = []
  for m in merges:
    parts = m.split(" ")
    if len(parts) != 2:
      raise TokenizerError(f"malformed merge {m!r} (expected two symbols separated by a space)")
    pairs.append((parts[0], parts[1]))
  return vocab, pairs


def _add_whole_tokens(tk, tokens, token_types, vocab, AddedToken) -> None:
  """Control tokens become special tokens, user-defined ones plain added tokens; both are then
  matched whole in input text. Only tokens present verbatim in the vocabulary are added, so the
  vocabulary never grows."""
  special, added = [], []
  for tok, ttype in zip(tokens, token_types):
    if tok not in vocab:
      continue
    if ttype == TOKEN_CONTROL:
      special.append(AddedToken(tok, special=True, normalized=False))
    elif ttype == TOKEN_USER_DEFINED:
      added.append(AddedToken(tok, special=False, normalized=False))
  if special:
    tk.add_special_tokens(special)
  if added:
    tk.add_tokens(added)


class _GgufIds:
  """The special ids a GGUF vocabulary names (`tokenizer.ggml.*_token_id`): bos, eos, pad (eos
  when it names none) and unk. Shared by the BPE and SentencePiece tokenizers."""

  def _read_ids(self, metadata: dict) -> None:
    def opt_id(key):
      v = metadata.get(f"tokenizer.ggml.{key}")
      return None if v is None else int(v)

    self._bos = opt_id("bos_token_id")
    self._eos = opt_id("eos_token_id")
    self._pad = opt_id("padding_token_id")
    self._unk = opt_id("unknown_token_id")

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos

  @property
  def eos_id(self) -> Optional[int]:
    return self._eos

  @property
  def pad_id(self) -> Optional[int]:
    return self._pad if self._pad is not None else self._eos


class Tokenizer(_GgufIds, _TemplateMixin):
  """Byte-level BPE tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""

  def __init__(self, metadata: dict):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise TokenizerError(
          f"tokenizer.ggml.model is {kind!r}; this class rebuilds byte-level BPE ('gpt2') "
          f"tokenizers (sentencepiece 'llama' vocabularies: Tokenizer.from_metadata)")
    tokens = metadata.get("tokenizer.ggml.tokens")
    merges = metadata.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
      raise TokenizerError("GGUF metadata lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    self.pre_type = metadata.get("tokenizer.ggml.pre", "default") or "default"

    alphabet = _byte_alphabet()
    vocab, pairs = _bpe_tables(tokens, merges, alphabet)
    bpe = models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None, fuse_unk=False,
                     byte_fallback=False, ignore_merges=False)
    tk = HFTokenizer(bpe)
    tk.normalizer = None
    tk.pre_tokenizer = self._pre_tokenizer(self.pre_type, pre_tokenizers, Regex)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = None
    _add_whole_tokens(tk, tokens, token_types, vocab, AddedToken)
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
      raise TokenizerError("rebuilt vocabulary size differs from the GGUF token list")

    self._tk = tk
    self._tokens = list(tokens)
    # Bytes of every token, for streaming. Like the ByteLevel decoder: a character of the byte
    # alphabet stands for its byte, any other character for its own UTF-8 encoding.
    to_byte = {c: bytes([b]) for b, c in enumerate(alphabet)}
    self._token_bytes = [b"".join(to_byte.get(c) or c.encode() for c in tok) for tok in tokens]
    self._special_ids = frozenset(
        i for i, t in enumerate(token_types) if t == TOKEN_CONTROL and tokens[i] in vocab)

    self._read_ids(metadata)
    self.add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    self.add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    self.chat_template = metadata.get("tokenizer.chat_template") or _CHATML_TEMPLATE
    self._special_strings = {
        f"{name}_token": (self._tokens[i] if i is not None else None)
        for name, i in (("bos", self._bos), ("eos", self._eos), ("pad", self._pad),
                        ("unk", self._unk))}

  @staticmethod
  def _pre_tokenizer(pre_type: str, pre_tokenizers, Regex):
    if pre_type in _DIGITS_THEN_GPT2:
      return pre_tokenizers.Sequence([
          pre_tokenizers.Digits(individual_digits=True),
          pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre_type in _GPT2_ONLY:
      return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre_type in _LLAMA3_STYLE:
      return pre_tokenizers.Sequence([
          pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
          pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    raise TokenizerError(
        f"unknown tokenizer.ggml.pre {pre_type!r}; known: "
        f"{sorted(_DIGITS_THEN_GPT2 | _GPT2_ONLY | _LLAMA3_STYLE)}")

  @classmethod
  def from_metadata(cls, metadata: dict):
    """The tokenizer `metadata` describes: this class for byte-level BPE ("gpt2"), an
    `SpmTokenizer` (kvjax.models.tokenizer_spm) for SentencePiece vocabularies ("llama")."""
    if metadata.get("tokenizer.ggml.model") == "llama":
      from kvjax.models.tokenizer_spm import SpmTokenizer
      return SpmTokenizer(metadata)
    return cls(metadata)

  @classmethod
  def from_gguf(cls, path):
    from kvjax.models.gguf import read_metadata
    return cls.from_metadata(read_metadata(path))

  # -- encoding / decoding ---------------------------------------------------------------------

  def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
    """Token ids of `text`. Special-token strings in `text` (e.g. <|im_start|>) map to their ids.

    BOS is prepended only if `add_bos` (default: the file's add_bos_token, False for SmolLM2).
    """
    ids = self._tk.encode(text, add_special_tokens=False).ids
    if (self.add_bos if add_bos is None else add_bos) and self._bos is not None:
      ids = [self._bos] + ids
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; byte sequences that are not valid UTF-8 come out as U+FFFD."""
    return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str:
    return self._tokens[i]

  def token_bytes(self, i: int) -> bytes:
    """The raw bytes token `i` stands for (an added token: its text in UTF-8)."""
    if not 0 <= i < len(self._token_bytes):
      raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self._token_bytes) - 1})")
    return self._token_bytes[i]

  def token_to_id(self, token: str) -> Optional[int]:
    return self._tk.token_to_id(token)

  def is_special(self, i: int) -> bool:
    return int(i) in self._special_ids

  @property
  def backend(self):
    """The underlying `tokenizers.Tokenizer`."""
    return self._tk

  @property
  def vocab_size(self) -> int:
    return len(self._tokens)

  @property
  def special_ids(self) -> frozenset:
    return self._special_ids

  def __repr__(self) -> str:
    return (f"Tokenizer(vocab_size={self.vocab_size}, pre={self.pre_type!r}, bos={self._bos}, "
            f"eos={self._eos}, pad={self.pad_id})")


class ByteTokenizer(_TemplateMixin):
  """UTF-8 bytes as tokens, for the random-weight `tiny` model (vocabulary 260).

  ids 0..255 are bytes, 256 BOS, 257 EOS, 258 PAD, 259 unused. `encode` never produces ids
  >= 256 (special strings in the text are just bytes); `decode` renders specials as
  <|bos|>, <|eos|>, <|pad|>, <|unused|> unless skip_special_tokens.
  """

  BOS, EOS, PAD, UNUSED = 256, 257, 258, 259
  _NAMES = {256: "<|bos|>", 257: "<|eos|>", 258: "<|pad|>", 259: "<|unused|>"}

  def __init__(self, add_bos: bool = False):
    self.add_bos = add_bos
    self.chat_template = (
        "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    self._special_strings = {"bos_token": self._NAMES[256], "eos_token": self._NAMES[257],
                             "pad_token": self._NAMES[258]}

  def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
    ids = list(text.encode("utf-8"))
    if self.add_bos if add_bos is None else add_bos:
      ids = [self.BOS] + ids
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    out, run = [], bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        run.append(i)
        continue
      if i not in self._NAMES:
        raise ValueError(f"token id {i} is outside the byte vocabulary (0..259)")
      if not skip_special_tokens:
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        out.append(self._NAMES[i])
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def id_to_token(self, i: int) -> str:
    return self._NAMES.get(i) or _byte_alphabet()[i]

  def token_bytes(self, i: int) -> bytes:
    if 0 <= i < 256:
      return bytes([i])
    if i in self._NAMES:
      return self._NAMES[i].encode()
    raise ValueError(f"token id {i} is outside the byte vocabulary (0..259)")

  def token_to_id(self, token: str) -> Optional[int]:
    for i, name in self._NAMES.items():
      if name == token:
        return i
    alphabet = _byte_alphabet()
    return alphabet.index(token) if token in alphabet else None

  def is_special(self, i: int) -> bool:
    return int(i) >= 256

  @property
  def vocab_size(self) -> int:
    return 260

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_id(self) -> int:
    return self.EOS

  @property
  def pad_id(self) -> int:
    return self.PAD

  @property
  def special_ids(self) -> frozenset:
    return frozenset(self._NAMES)

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=260)"


class StreamDecoder:
  """Turns a stream of token ids into text pieces, never emitting a broken UTF-8 character.

  A character can be split over several byte-level tokens (an emoji is often 2-4 of them). The
  decoder feeds each token's bytes to an incremental UTF-8 decoder, which holds back an
  incomplete trailing sequence until the rest arrives, and replaces invalid bytes with U+FFFD as
  soon as they are known to be invalid. Usage:

    dec = tokenizer.stream_decoder()
    for t in generated_ids:
      print(dec.push(t), end="", flush=True)
    print(dec.flush())

  The concatenation of every returned piece equals `tokenizer.decode(all_ids)`. O(1) per token.
  """

  def __init__(self, tokenizer, skip_special_tokens: bool = False):
    self._tok = tokenizer
    self._skip = skip_special_tokens
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def push(self, token_id: int) -> str:
    """Add one token; returns the newly completed text (possibly "")."""
    token_id = int(token_id)
    if self._skip and self._tok.is_special(token_id):
      return ""
    return self._utf8.decode(self._tok.token_bytes(token_id))

  def push_many(self, ids: Iterable[int]) -> str:
    return "".join(self.push(i) for i in ids)

  def flush(self) -> str:
    """End of stream: whatever is still pending (an incomplete character) comes out as U+FFFD."""
    out = self._utf8.decode(b"", final=True)
    self._utf8.reset()
    return out
