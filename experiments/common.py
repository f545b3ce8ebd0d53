"""Small helpers the experiment scripts share: run metadata, optional tqdm/matplotlib, output files.

Nothing here knows about a particular experiment. Every script records `run_info(args)` (machine,
JAX backend and devices, date, exact command line, kvjax version) in its JSON, so a number in
docs/ can always be traced to how and where it was measured.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Errors that mean "this cache kind is not built (yet)": the scripts skip the spec with a note.
NOT_AVAILABLE_MARK = "not available yet"


def run_info(args=None) -> dict:
  """Where and how this run happened."""
  import jax

  import kvjax

  devices = jax.devices()
  return {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": shlex.join([sys.executable] + sys.argv),
      "cwd": os.getcwd(),
      "args": {k: v for k, v in vars(args).items()} if args is not None else {},
      "machine": {
          "platform": platform.platform(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(),
          "cpu_count": os.cpu_count(),
          "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
          "jax_version": jax.__version__,
          "jax_backend": jax.default_backend(),
          "devices": [str(d) for d in devices],
          "device_kind": devices[0].device_kind if devices else None,
      },
      "kvjax_version": kvjax.__version__,
  }


def on_accelerator() -> bool:
  import jax

  return jax.default_backend() != "cpu"


class _Counter:
  """progress_bar's stand-in without tqdm: prints every ~10% of `total`."""

  def __init__(self, total: int, desc: str):
    self.total, self.desc, self.n = total, desc, 0
    self.step = max(1, total // 10)

  def update(self, n: int = 1) -> None:
    for _ in range(n):
      self.n += 1
      if self.n % self.step == 0 or self.n == self.total:
        print(f"  {self.desc} {self.n}/{self.total}", flush=True)

  def close(self) -> None:
    pass


def progress_bar(total: int, desc: str = ""):
  """An object with update(n) and close(): tqdm if installed, else a plain counter."""
  try:
    from tqdm import tqdm
  except ImportError:
    return _Counter(total, desc)
  return tqdm(total=total, desc=desc, dynamic_ncols=True)


def progress(iterable, desc: str = "", total: int | None = None):
  """tqdm if installed, else a plain counter printed every ~10%."""
  try:
    from tqdm import tqdm
  except ImportError:
    items = list(iterable)
    n = len(items)
    step = max(1, n // 10)
    for i, item in enumerate(items):
      if i % step == 0 or i == n - 1:
        print(f"  {desc} {i + 1}/{n}", flush=True)
      yield item
    return
  yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)


def pyplot():
  """matplotlib.pyplot with a non-interactive backend, or None (plots are optional)."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("note: matplotlib is not installed; writing JSON/CSV only (pip install matplotlib for plots)")
    return None
  return plt


def out_dir(path) -> pathlib.Path:
  out = pathlib.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  return out


def write_json(path: pathlib.Path, payload: dict) -> None:
  path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
  print(f"wrote {path}")


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  import csv

  if not rows:
    path.write_text("")
    return
  fields = list(dict.fromkeys(k for row in rows for k in row))
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: _jsonable(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
  print(f"wrote {path}")


def _jsonable(x):
  import numpy as np

  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (dict, list)):
    return json.dumps(x)
  return str(x)


def classify_error(e: BaseException) -> str:
  """'skipped' when the cache kind is not built yet (or refuses this spec), else 'failed'."""
  import kvjax

  if isinstance(e, NotImplementedError):
    return "skipped"
  if isinstance(e, kvjax.SpecError) and NOT_AVAILABLE_MARK in str(e):
    return "skipped"
  return "failed"


class Outcomes:
  """Collects specs that were skipped (kind not built yet) or failed (an error: a bug to report).

  `guard(spec)` is a context manager: an exception inside it is recorded and printed instead of
  ending the whole experiment, unless `strict` (then failures propagate; skips never do).
  """

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.skipped: dict[str, str] = {}
    self.failed: dict[str, str] = {}

  def ok(self, spec: str) -> bool:
    return spec not in self.skipped and spec not in self.failed

  def guard(self, spec: str):
    import contextlib

    @contextlib.contextmanager
    def _guard():
      try:
        yield
      except Exception as e:  # noqa: BLE001  (recorded and reported, see class docstring)
        verdict = classify_error(e)
        message = f"{type(e).__name__}: {e}".strip()
        if verdict == "skipped":
          self.skipped.setdefault(spec, message)
          print(f"  skip {spec}: {message}", flush=True)
        else:
          if self.strict:
            raise
          self.failed.setdefault(spec, message)
          print(f"  FAILED {spec}: {message} (recorded; --strict to raise)", flush=True)
    return _guard()

  def skip(self, spec: str, reason: str) -> None:
    self.skipped.setdefault(spec, reason)
    print(f"  skip {spec}: {reason}", flush=True)

  def summary(self) -> dict:
    return {"skipped": self.skipped, "failed": self.failed}


def total_bytes(nbytes: dict) -> int:
  return int(sum(nbytes.values()))


def load_text(path=None, quick: bool = False) -> tuple[str, str]:
  """(text, source). The shared tinyshakespeare file, else the repo's own README as a stand-in."""
  candidates = [pathlib.Path(path)] if path else [DEFAULT_DATA]
  for p in candidates:
    if p.is_file():
      return p.read_text(encoding="utf-8"), str(p)
  fallback = REPO / "README.md"
  print(f"note: {candidates[0]} not found; using {fallback.name} as the text (numbers are not comparable)")
  text = fallback.read_text(encoding="utf-8")
  return (text * 8 if quick else text * 64), str(fallback)


def load_model(name: str):
  """kvjax.load, with a clear message when the real model's wheel is missing."""
  import kvjax

  try:
    return kvjax.load(name)
  except FileNotFoundError as e:
    raise SystemExit(f"cannot load {name!r}: {e}") from None


def fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n}"


def bytes_axis(axis) -> None:
  """Readable byte labels (KiB/MiB/GiB at powers of two) on a log-scaled matplotlib axis."""
  from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

  axis.set_major_locator(LogLocator(base=2))
  axis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
  axis.set_minor_formatter(NullFormatter())


def plain_log_axis(axis, ticks=None) -> None:
  """Plain numbers (not 2.3x10^2) at 1-2-5 steps, or at `ticks`, on a log-scaled matplotlib axis."""
  from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

  axis.set_major_locator(FixedLocator(ticks) if ticks is not None else LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  axis.set_minor_formatter(NullFormatter())
