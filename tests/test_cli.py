"""The `kvjax` command line on the tiny model (in-process via `kvjax.cli.main`, plus one subprocess).

Invariants checked:
  * with --json the last stdout line is one JSON object with the documented keys, for generate,
    bench and perplexity; the generated ids are what `kvjax.generate` gives for the same prompt;
  * --cache none works; a bad --cache exits with code 2 and an error naming the bad term on stderr;
  * `python -m kvjax generate ... --json` works as a real process.

In-process runs reuse the session's `tiny` model instead of rebuilding it on every command
(`kvjax.load("tiny")` initializes the weights under a fresh jit each time, seconds per call); the
subprocess test goes through the real loading path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kvjax
from kvjax import cli

GENERATE_KEYS = {"prompt_ids", "ids", "text", "prefill_s", "decode_tok_per_s", "cache_bytes"}


@pytest.fixture(autouse=True)
def reuse_tiny(monkeypatch, tiny):
  from kvjax import loading

  real_load = loading.load

  def load(name_or_path="smollm2-135m", *, dtype=None, seed=0):
    if name_or_path == "tiny" and dtype is None and seed == 0:
      return tiny
    return real_load(name_or_path, dtype=dtype, seed=seed)

  monkeypatch.setattr(loading, "load", load)


def run_cli(capsys, *argv):
  """Runs the CLI in-process; returns (exit code, last stdout line parsed as JSON or None, stderr)."""
  code = cli.main(list(argv))
  captured = capsys.readouterr()
  lines = captured.out.strip().splitlines()
  payload = None
  if "--json" in argv and code == 0:
    payload = json.loads(lines[-1])
  return code, payload, captured.err


def test_generate_json(capsys, tiny):
  # 64 slots: the executables tests/test_decode.py builds for batch 1 (the default is covered by
  # the subprocess test).
  code, out, _ = run_cli(capsys, "generate", "Hi", "--model", "tiny", "--max-new-tokens", "5", "--json",
                         "--capacity", "64")
  assert code == 0
  assert GENERATE_KEYS <= out.keys()
  assert out["prompt_ids"] == [72, 105]
  assert len(out["ids"]) == 5 and all(0 <= i < 260 for i in out["ids"])
  assert isinstance(out["text"], str)
  assert out["prefill_s"] > 0 and out["cache_bytes"] > 0
  want = kvjax.generate(tiny, "Hi", max_new_tokens=5, capacity=64)
  assert out["ids"] == want.tokens[0, :want.n_generated[0]].tolist()


def test_generate_no_cache(capsys):
  code, out, _ = run_cli(capsys, "generate", "Hi", "--model", "tiny", "--max-new-tokens", "5", "--json",
                         "--cache", "none")
  assert code == 0
  assert out["cache_bytes"] == 0 and len(out["ids"]) == 5


def test_generate_plain_text(capsys):
  code = cli.main(["generate", "Hi", "--model", "tiny", "--max-new-tokens", "3", "--capacity", "64"])
  assert code == 0
  assert capsys.readouterr().out.startswith("Hi")


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "Hi", "--cache", "foo"], "foo"),
    (["generate", "Hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "Hi", "--temperature", "-1"], "temperature"),
    (["perplexity", "/nonexistent/file.txt"], "/nonexistent/file.txt"),
])
def test_errors_exit_2(capsys, argv, fragment):
  code, _, err = run_cli(capsys, *argv, "--model", "tiny", "--json")
  assert code == 2
  assert fragment in err and "error" in err


def test_bench_json(capsys):
  code, out, _ = run_cli(capsys, "bench", "--model", "tiny", "--new-tokens", "8", "--json",
                         "--prompt-len", "16", "--capacity", "64")
  assert code == 0
  for key in ("decode_tok_per_s", "prefill_s", "compile_s", "n_compiles", "cache_bytes", "peak_rss_bytes"):
    assert key in out, key
  assert out["decode_tok_per_s"] > 0 and out["cache_bytes"] > 0 and out["peak_rss_bytes"] > 0
  assert out["n_compiles"] >= 0 and out["compile_s"] >= 0
  assert out["batch"] == 1 and out["new_tokens"] == 8 and out["capacity"] == 64
  assert out["kernel"] == "auto" and out["kernel_decode"] == "jnp.blockwise"  # CPU: jnp


@pytest.mark.slow
def test_bench_json_names_the_pallas_kernel(capsys):
  code, out, _ = run_cli(capsys, "bench", "--model", "tiny", "--new-tokens", "4", "--json",
                         "--prompt-len", "8", "--capacity", "64", "--cache", "paged:16",
                         "--kernel", "pallas", "--repeats", "1")
  assert code == 0
  assert out["kernel"] == "pallas"
  assert out["kernel_decode"] == "pallas.gpu.paged_attention+interpret"
  assert out["kernel_prefill"] == "jnp.blockwise"


def test_bad_kernel_flag_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_:  # argparse refuses it, naming the choices
    cli.main(["bench", "--model", "tiny", "--kernel", "cuda", "--json"])
  assert exit_.value.code == 2 and "'auto', 'jnp', 'pallas'" in capsys.readouterr().err


def test_perplexity_json(capsys, tmp_path, tiny):
  path = tmp_path / "text.txt"
  text = "The quick brown fox jumps over the lazy dog. " * 4
  path.write_text(text)
  code, out, _ = run_cli(capsys, "perplexity", str(path), "--model", "tiny", "--max-tokens", "64", "--json")
  assert code == 0
  for key in ("ppl", "nll", "tokens", "cache_bytes"):
    assert key in out, key
  assert out["tokens"] == 64
  assert np.isclose(out["ppl"], np.exp(out["nll"]), rtol=1e-5)
  # Random weights over 260 ids: close to uniform.
  assert 100 < out["ppl"] < 600
  assert out["cache_bytes"] > 0


def test_python_dash_m_runs_the_cli(monkeypatch, capsys, tiny):
  """`python -m kvjax` is the CLI (in this process: the subprocess version is in the full lane)."""
  import runpy

  monkeypatch.setattr(sys, "argv", ["kvjax", "generate", "Hi", "--model", "tiny",
                                    "--max-new-tokens", "2", "--json"])
  with pytest.raises(SystemExit) as exit_info:
    runpy.run_module("kvjax", run_name="__main__")
  assert exit_info.value.code in (0, None)
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(out["ids"]) == 2


@pytest.mark.slow
def test_module_subprocess():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "kvjax", "generate", "Hi", "--model", "tiny", "--max-new-tokens", "4", "--json"],
      capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert GENERATE_KEYS <= out.keys() and len(out["ids"]) == 4


def test_bugs_are_not_reported_as_bad_input(monkeypatch, capsys):
  """Bad input exits 2 with a message; an internal error keeps its traceback."""
  import sys

  ppl_module = sys.modules["kvjax.perplexity"]

  def broken(*args, **kwargs):
    raise TypeError("an internal bug")

  monkeypatch.setattr(ppl_module, "perplexity", broken)
  with pytest.raises(TypeError, match="internal bug"):
    cli.main(["perplexity", __file__, "--model", "tiny", "--max-tokens", "8"])


def test_plugin_from_the_current_directory_or_a_file(monkeypatch, capsys, tmp_path):
  """--plugin finds a module in the current directory (the console script's sys.path lacks it),
  takes a .py path, may come before the subcommand, and a failing plugin is one line."""
  (tmp_path / "kvjax_cwd_plugin.py").write_text("LOADED = True\n")
  (tmp_path / "kvjax_file_plugin.py").write_text("LOADED = True\n")
  (tmp_path / "kvjax_bad_plugin.py").write_text("raise RuntimeError('boom')\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  for name in ("kvjax_cwd_plugin", "kvjax_file_plugin", "kvjax_bad_plugin"):
    monkeypatch.delitem(sys.modules, name, raising=False)
  # The plugins load before the (here deliberately bad) cache spec is read.
  rc = cli.main(["--plugin", "kvjax_cwd_plugin", "generate", "hi", "--model", "tiny",
                 "--plugin", str(tmp_path / "kvjax_file_plugin.py"), "--cache", "nosuchkind"])
  assert rc == 2 and "nosuchkind" in capsys.readouterr().err
  assert sys.modules["kvjax_cwd_plugin"].LOADED and sys.modules["kvjax_file_plugin"].LOADED
  for plugin, fragment in (("kvjax_bad_plugin.py", "raised RuntimeError: boom"),
                           ("./missing.py", "no such file"), ("no_such_module_xyz", "cannot import")):
    rc = cli.main(["generate", "hi", "--model", "tiny", "--plugin", plugin])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_specs_lists_the_grammar_and_the_kinds(capsys):
  """`kvjax specs` prints one line per declared term (the same help the grammar's errors use)
  and every kind, with a plugin's kinds too."""
  assert cli.main(["specs", "--json"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  text = "\n".join(out["terms"])
  for usage in ("window:N", "sink:S", "paged:P", "share:G", "tier:"):
    assert usage in text
  assert {"full", "window", "paged", "h2o"} <= set(out["kinds"])


def test_generate_gemma3_with_a_layout(capsys):
  """A layout on a model with sliding layers, from the command line (tiny-gemma3: layers 0-4
  slide over 16 tokens, layer 5 is global)."""
  code, out, _ = run_cli(capsys, "generate", "Hello there, a prompt longer than the window",
                         "--model", "tiny-gemma3", "--cache", "int8@global; window:8@sliding",
                         "--max-new-tokens", "4", "--json")
  assert code == 0 and len(out["ids"]) == 4
  code, _, err = run_cli(capsys, "generate", "Hi", "--model", "tiny-gemma3", "--cache",
                         "snapkv:8+window:4@sliding", "--json")
  assert code == 2 and "slides over 16 tokens" in err
