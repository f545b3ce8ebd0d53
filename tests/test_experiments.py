"""Smoke runs of the experiment scripts: each `--quick` mode finishes and writes its JSON.

Invariants checked:
  * every script in experiments/ runs `--quick --out DIR` (in this process where it can, else in a
    fresh one within the time budget) and finishes, with or without matplotlib/tqdm (plots and
    progress bars are optional);
  * its JSON records the machine, date and exact command line, and the rows it promises;
  * report.py renders a results.md from whatever JSON files exist ("not run yet" for the others);
  * hf_peer.py (the HF transformers side of peers.py) works end to end when a python with
    torch + transformers is named in $KVJAX_HF_PYTHON (skipped otherwise: CI has no torch).
"""

import importlib.util
import json
import math
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
BUDGET_S = 600  # generous: --quick takes well under a minute on 2 idle cores, CI machines vary

pytestmark = pytest.mark.slow


# Scripts whose smoke run can share this process: no second JAX import, and the compilation
# cache of the run. sharding (8 devices), batch1_limits (native code and thread pools) and peers
# (peer processes) keep a process of their own.
IN_PROCESS = {"speedup", "memory", "quality", "streaming", "speculative", "lowrank", "needles",
              "serving", "fp8", "hybrid", "press_speed",
              "leaderboard"}


def run_script(name, out, *extra, env=None):
  if name in IN_PROCESS and env is None:
    return run_in_process(name, out, *extra)
  cmd = [sys.executable, str(EXPERIMENTS / f"{name}.py"), *extra, "--out", str(out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S, cwd=REPO,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})
  assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


def run_in_process(name, out, *extra):
  """Runs a flat experiment script as `__main__` here, with its argv, cwd and sys.path."""
  import kvjax

  argv = [str(EXPERIMENTS / f"{name}.py"), *extra, "--out", str(out)]
  saved = sys.argv, list(sys.path), os.getcwd()
  sys.argv = argv
  sys.path.insert(0, str(EXPERIMENTS))
  os.chdir(REPO)
  try:
    runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as e:
    assert not e.code, f"{name} exited with {e.code}"
  finally:
    sys.argv, sys.path[:] = saved[0], saved[1]
    os.chdir(saved[2])
    kvjax.clear_caches()  # the script's executables die with its namespace


def check_common(payload, name):
  assert payload["experiment"] == name
  assert payload["quick"] is True
  assert "--quick" in payload["command"]
  assert payload["machine"]["cpu_count"] >= 1
  assert payload["machine"]["jax_backend"] == "cpu"
  assert payload["date"]
  assert not payload.get("failed"), f"cache kinds failed in {name}: {payload['failed']}"


def maybe_png(out, name):
  if importlib.util.find_spec("matplotlib") is not None:
    assert (out / f"{name}.png").is_file()


def test_speedup_quick(tmp_path):
  run_script("speedup", tmp_path, "--quick")
  d = json.loads((tmp_path / "speedup.json").read_text())
  check_common(d, "speedup")
  assert {r["length"] for r in d["rows"]} == {64, 128}
  for r in d["rows"]:
    assert r["cached_total_s"] > 0 and r["uncached_total_s"] > 0
  measured = [r for r in d["rows"] if not r["uncached_extrapolated"]]
  # Greedy decoding with and without a cache must pick the same tokens (random tiny model).
  assert measured and all(r["greedy_tokens_agree"] >= min(16, r["new_tokens"]) for r in measured)
  assert (tmp_path / "speedup.csv").is_file()
  maybe_png(tmp_path, "speedup")


def test_memory_quick_and_report(tmp_path):
  run_script("memory", tmp_path, "--quick")
  d = json.loads((tmp_path / "memory.json").read_text())
  check_common(d, "memory")
  full = [r for r in d["rows"] if r["spec"] == "full"]
  assert full
  for r in full:
    # The seed formulas: measured arrays = formula + the int32 lengths of the one row.
    assert r["measured_bytes"] == r["formula_full_bytes"] + 4
  maybe_png(tmp_path, "memory")

  proc = subprocess.run([sys.executable, str(EXPERIMENTS / "report.py"), "--docs", str(tmp_path)],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert proc.returncode == 0, proc.stderr
  md = (tmp_path / "results.md").read_text()
  assert "2048*T floats" in md and "Quick (smoke) run" in md
  # speedup, quality, streaming, peers, batch1_limits, sharding, needles, speculative, lowrank,
  # serving, fp8, press_speed, the press leaderboard, Gemma 3's peers, hybrid and window pools
  assert md.count("*Not run yet.*") == 16


def test_quality_quick(tmp_path):
  run_script("quality", tmp_path, "--quick")
  d = json.loads((tmp_path / "quality.json").read_text())
  check_common(d, "quality")
  by_spec = {r["spec"]: r for r in d["rows"]}
  assert "full" in by_spec
  for r in d["rows"]:
    assert r["ppl"] > 1 and 0 <= r["passkey_accuracy"] <= 1
  maybe_png(tmp_path, "quality")


def test_hybrid_quick(tmp_path):
  run_script("hybrid", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "hybrid.json").read_text())
  check_common(d, "hybrid")
  ppl = {r["layout"]: r for r in d["rows"] if r["part"] == "perplexity"}
  assert set(ppl) == {"all-full", "hybrid", "hybrid+int8", "hybrid+int4", "hybrid+snapkv"}
  assert ppl["hybrid"]["ppl"] == pytest.approx(ppl["all-full"]["ppl"], rel=1e-5)
  assert ppl["hybrid"]["cache_bytes"] < ppl["all-full"]["cache_bytes"]
  assert {r["layout"] for r in d["rows"] if r["part"] == "needles"} == set(ppl)


def test_fp8_quick(tmp_path):
  run_script("fp8", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "fp8.json").read_text())
  check_common(d, "fp8")
  by_spec = {r["spec"]: r for r in d["rows"]}
  assert {"full", "int8", "fp8", "fp8_e5m2"} <= set(by_spec)
  for r in d["rows"]:
    assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["cache_bytes"] > 0
  # fp8 keeps one byte per channel and one scale per token: about a quarter of fp32, and no
  # more than int8 (a scale per 32 channels).
  assert by_spec["fp8"]["bytes_per_slot"] <= by_spec["int8"]["bytes_per_slot"]
  assert by_spec["fp8"]["bytes_per_slot"] < by_spec["full"]["bytes_per_slot"] / 3
  assert {e["spec"] for e in d["estimates"]} == {"full", "int8", "fp8", "int4"}
  assert (tmp_path / "fp8.csv").is_file()


def test_streaming_quick(tmp_path):
  run_script("streaming", tmp_path, "--quick")
  d = json.loads((tmp_path / "streaming.json").read_text())
  check_common(d, "streaming")
  for spec, r in d["results"].items():
    assert r["tokens"] == 512
    assert r["check_max_abs_nll_diff"] < 1e-3, spec  # the script's loop == kvjax.perplexity
  if "dynamic" in d["results"]:
    grown = d["results"]["dynamic"]["cache_bytes"]
    assert grown[-1] > grown[0]  # full precision memory grows with the stream
  maybe_png(tmp_path, "streaming")


def test_peers_quick(tmp_path):
  run_script("peers", tmp_path, "--quick", "--no-hf")
  d = json.loads((tmp_path / "peers.json").read_text())
  check_common(d, "peers")
  assert d["memory_bandwidth_bytes_per_s"] > 0
  assert d["kvjax"][0]["decode_tok_per_s"] > 0
  assert d["bandwidth_limit_tok_per_s_batch1"] > 0


@pytest.mark.skipif(not os.environ.get("KVJAX_HF_PYTHON"),
                    reason="set KVJAX_HF_PYTHON to a python with torch + transformers + gguf")
def test_peers_with_hf(tmp_path):
  run_script("peers", tmp_path, "--quick")
  d = json.loads((tmp_path / "peers.json").read_text())
  if d["settings"]["model"] != "smollm2-135m":
    pytest.skip("SmolLM2 GGUF not installed")
  assert d["hf"] is not None, d["hf_note"]
  assert d["ratios"]["kvjax_over_hf_batch1"] > 0
  assert d["greedy_tokens_agree"] == d["settings"]["new_tokens"]  # same model, same greedy tokens


def test_press_speed_quick(tmp_path):
  # The tiny model (no GGUF, so no kvpress): compiles in seconds; the timed runs never compile.
  run_script("press_speed", tmp_path, "--quick", "--model", "tiny")
  d = json.loads((tmp_path / "press_speed.json").read_text())
  check_common(d, "press_speed")
  n = d["settings"]["prompts"]
  assert {(r["press"], r["batch"]) for r in d["rows"]} == {
      (p, b) for p in ("none", "knorm", "streaming_llm", "snapkv") for b in (1, n)}
  for r in d["rows"]:
    assert r["framework"] == "kvjax" and r["timed_compiles"] == 0
    assert r["prefill_s"] > 0 and r["decode_s"] > 0
  assert set(d["compress_cost"]) == {f"{p}_kvjax_b{b}" for p in ("knorm", "streaming_llm", "snapkv")
                                     for b in (1, n)}
  assert d["kvpress"] is None and d["kvpress_note"].startswith("skipped")


@pytest.mark.skipif(not os.environ.get("KVJAX_KVPRESS_PYTHON"),
                    reason="set KVJAX_KVPRESS_PYTHON to kvpress's python (torch + kvpress 0.5.5)")
def test_press_speed_with_kvpress(tmp_path):
  run_script("press_speed", tmp_path, "--quick", "--presses", "knorm", "--threads", "1",
             env={"KVJAX_KVPRESS_PYTHON": os.environ["KVJAX_KVPRESS_PYTHON"]})
  d = json.loads((tmp_path / "press_speed.json").read_text())
  check_common(d, "press_speed")
  assert d["kvpress"]["kvpress"] == "0.5.5" and d["kvpress"]["torch_threads"] == 1
  assert {(r["press"], r["framework"]) for r in d["rows"] if r["batch"] == 1} == {
      (p, f) for p in ("none", "knorm") for f in ("kvjax", "kvpress")}
  # The same ids and weights: the first greedy token comes from the same uncompressed prefill.
  toks = d["tokens"]
  assert all(a[0] == b[0] for a, b in zip(toks["knorm/kvjax/b1"], toks["knorm/kvpress/b1"]))


def test_sharding_quick(tmp_path):
  run_script("sharding", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "sharding.json").read_text())
  check_common(d, "sharding")
  assert {r["devices"] for r in d["results"]} == {1, 2, 4, 8}
  for r in d["results"]:
    assert r["cache_bytes_per_device"] <= r["cache_bytes"] // r["devices"] + 64
  for c in d["contexts"]:
    assert c["with slot sharding"] >= c["devices"] * c["without slot sharding"] - 256 * c["devices"]


def test_needles_quick(tmp_path):
  run_script("needles", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "needles.json").read_text())
  check_common(d, "needles")
  kinds = {r["kind"] for r in d["rows"]}
  assert {"full", "sink+window", "h2o", "snapkv"} <= kinds
  for r in d["rows"]:
    assert 0 <= r["retrieval"] <= 1 and r["bytes_per_row"] > 0
  assert {r["kind"] for r in d["ppl_rows"]} >= {"full", "snapkv"}
  maybe_png(tmp_path, "needles")


def test_leaderboard_quick(tmp_path):
  run_script("leaderboard", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "leaderboard.json").read_text())
  check_common(d, "leaderboard")
  got = {(r["press"], r["ratio"], r["setting"]) for r in d["results"]}
  assert got == {("full", 0.0, "both")} | {(p, q, s) for p in ("knorm", "snapkv")
                                           for q in (0.5, 0.75)
                                           for s in ("query_agnostic", "query_aware")}
  assert all(0 <= r["average"] <= 1 for r in d["results"])
  assert (tmp_path / "leaderboard.svg").is_file()


def test_leaderboard_scores_kvzip_once_and_keeps_the_scores(tmp_path, capsys):
  """kvzip's extension is scored once per setting, before the plain prefills; with --prefill-dir
  a second sitting loads those scores and the prefills and measures the same answers."""
  extra = ("--quick", "--strict", "--presses", "kvzip", "--ratios", "0.5", "0.75",
           "--prefill-dir", str(tmp_path / "kept"))
  runs = []
  for name in ("first", "second"):
    run_script("leaderboard", tmp_path / name, *extra)
    runs.append(json.loads((tmp_path / name / "leaderboard.json").read_text()))
    runs[-1]["log"] = capsys.readouterr().out
  assert runs[0]["log"].count("kvzip scored its extension") == 2  # once per setting
  assert "scored its extension" not in runs[1]["log"]
  answers = [{(r["press"], r["ratio"], r["setting"]): r["answers"] for r in d["results"]}
             for d in runs]
  assert answers[0] == answers[1] and len(answers[0]) == 5


def test_speculative_quick(tmp_path):
  run_script("speculative", tmp_path, "--quick")
  d = json.loads((tmp_path / "speculative.json").read_text())
  check_common(d, "speculative")
  drafted = [r for r in d["rows"] if r["draft"]]
  assert drafted and all(r["same_tokens"] for r in drafted)  # greedy: identical output
  assert all(0 <= r["acceptance"] <= 1 for r in drafted)


def test_serving_quick(tmp_path):
  run_script("serving", tmp_path, "--quick", "--requests", "6", "--skip", "step")
  d = json.loads((tmp_path / "serving.json").read_text())
  check_common(d, "serving")
  by = {(r["setting"], r["method"]): r for r in d["rows"]}
  assert by[("trace", "continuous batching, paged:16")]["useful_tokens"] > 0
  on, off = (by[("prefix", f"paged:16, page index {s}")] for s in ("on", "off"))
  assert on["peak_bytes"] < off["peak_bytes"]


@pytest.mark.slow
def test_serving_window_pools_quick(tmp_path):
  """On tiny-gemma3 the engine's window pool is smaller than one pool over every layer, and the
  requests (two sharing a prefix past the window) equal generate alone."""
  run_script("serving", tmp_path, "--quick", "--model", "tiny-gemma3", "--skip", "trace",
             "prefix", "step")
  d = json.loads((tmp_path / "serving.json").read_text())
  (window,) = [r for r in d["rows"] if r["setting"] == "window"]
  assert window["pool_vs_one_pool"] < 1 and window["equal_alone"] == "4/4"
  assert window["prefix_tokens_adopted"] > 0


def test_lowrank_quick(tmp_path):
  run_script("lowrank", tmp_path, "--quick", "--strict")
  d = json.loads((tmp_path / "lowrank.json").read_text())
  check_common(d, "lowrank")
  by_label = {r["label"]: r for r in d["rows"]}
  assert {"full", "share:2:cal", "int8", "lowrank:16", "lowrank:64+int4"} <= set(by_label)
  assert by_label["lowrank:16"]["bytes_per_token"] < by_label["full"]["bytes_per_token"] / 8
  assert all(math.isfinite(r["ppl"]) for r in d["rows"])


def test_batch1_limits_quick(tmp_path):
  run_script("batch1_limits", tmp_path, "--quick")
  d = json.loads((tmp_path / "batch1_limits.json").read_text())
  check_common(d, "batch1_limits")
  assert d["xla_dot_chain"]["in_out"]["gb_per_s"] > 0
  assert d["step_tok_per_s"]["xla"]["best"] > 0
  if shutil.which("g++"):  # the roofline and the FFI kernel are built with the system compiler
    assert d["roofline_gb_per_s"]["2t_huge"] > 0
    assert d["step_tok_per_s"]["ffi-matvec"]["best"] > 0
