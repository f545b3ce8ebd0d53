"""Command line: `kvjax generate | perplexity | bench` (also `python -m kvjax`).

With `--json` the last line on stdout is one JSON object; progress and streaming go elsewhere.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_MODEL = "smollm2-135m"


def _add_model(p):
  p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                 help="import MODULE (a module name, also from the current directory, or a .py "
                      "file) first, e.g. one that calls kvjax.register_kind; repeatable")
  p.add_argument("--model", default=DEFAULT_MODEL,
                 help="registered name (smollm2-135m, gemma3-270m, tiny, tiny-gemma3, "
                      "gpt2-small-shape) or a .gguf path")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="weights/compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
  p.add_argument("--cache", default="full",
                 help="cache spec, e.g. full, dynamic, none, int8, sink:4+window:1020, a "
                      "registered kind, or a layout such as 'int4@global; window:256@sliding' "
                      "(`kvjax specs` lists every term)")
  p.add_argument("--kernel", choices=["auto", "jnp", "pallas"], default="auto",
                 help="decode attention kernel of the full and paged kinds: auto (jnp on CPU, "
                      "JAX's Pallas kernels on GPU/TPU where they apply), jnp, or pallas (on CPU "
                      "in Pallas interpret mode: slow, for checking)")
  p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
  p.add_argument("--mesh", default=None, metavar="AXES",
                 help="run over a device mesh, e.g. data=2,model=4 (-1: the remaining devices)")
  p.add_argument("--mesh-rules", default=None, metavar="RULES",
                 help="logical axis rules, e.g. batch=data,kv_heads=model,slots= (kvjax.sharding)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="kvjax", description="KV-cache decoding in JAX")
  parser.add_argument("--plugin", action="append", default=[], dest="plugins_first",
                      metavar="MODULE", help="as a subcommand's --plugin (either place works)")
  sub = parser.add_subparsers(dest="command", required=True)

  g = sub.add_parser("generate", help="generate text from a prompt")
  g.add_argument("prompt")
  _add_model(g)
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--capacity", type=int, default=None)
  g.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
  g.add_argument("--temperature", type=float, default=None)
  g.add_argument("--top-k", type=int, default=0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
  g.add_argument("--no-stream", action="store_true", help="print the text only at the end")
  _add_draft(g)

  pp = sub.add_parser("perplexity", help="perplexity of the model on a text file")
  pp.add_argument("file")
  _add_model(pp)
  pp.add_argument("--max-tokens", type=int, default=1024)
  pp.add_argument("--chunk", type=int, default=None, help="tokens fed per step (default: spec-dependent)")

  b = sub.add_parser("bench", help="decode throughput of one configuration")
  _add_model(b)
  b.add_argument("--batch", type=int, default=1)
  b.add_argument("--prompt-len", type=int, default=32)
  b.add_argument("--new-tokens", type=int, default=128)
  b.add_argument("--capacity", type=int, default=None)
  b.add_argument("--repeats", type=int, default=2)
  _add_draft(b)

  s = sub.add_parser("specs", help="the cache-spec grammar: every term, and the registered kinds")
  s.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                 help="import MODULE first (its kinds and terms are listed too)")
  s.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
  return parser


def _cmd_specs(args) -> dict:
  from kvjax import layouts
  from kvjax import spec as spec_lib
  from kvjax.caches import registry

  print("A cache spec is terms joined by '+', e.g. int4+residual:64+window:512. The terms:")
  print(spec_lib.grammar())
  print(layouts.grammar_line())
  kinds = registry.registered_kinds()
  print("Kinds: " + ", ".join(kinds))
  return {"terms": spec_lib.grammar().splitlines(), "layouts": layouts.grammar_line(),
          "kinds": kinds}


def _add_draft(p):
  p.add_argument("--draft", default=None, metavar="SPEC",
                 help="self-speculative decoding: draft over this cheaper cache (e.g. "
                      "sink:4+window:252) and verify over --cache")
  p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                 help="tokens drafted per round (default 4)")


def _mesh(args):
  """(mesh, rules) from --mesh / --mesh-rules, or (None, None)."""
  if args.mesh is None:
    if args.mesh_rules:
      raise ValueError("--mesh-rules needs --mesh")
    return None, None
  from kvjax import sharding

  rules = sharding.AxisRules.parse(args.mesh_rules) if args.mesh_rules else None
  return sharding.make_mesh(args.mesh), rules


def _load(args):
  import jax.numpy as jnp

  from kvjax.loading import load

  dtype = getattr(jnp, args.dtype) if args.dtype else None
  return load(args.model, dtype=dtype)


def _cmd_generate(args) -> dict:
  from kvjax import decode
  from kvjax.sampling import Sampler

  if args.greedy and args.temperature:
    raise ValueError("--greedy and --temperature exclude each other")
  sampler = Sampler(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p)
  model = _load(args)
  text = args.prompt
  if args.chat:
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True)
  prompt_ids = model.tokenizer.encode(text)
  stream = not args.no_stream and not args.json and sys.stdout.isatty()
  decoder = model.tokenizer.stream_decoder(skip_special_tokens=True)

  def on_tokens(block):  # row 0 only; the decoder holds back half-finished UTF-8 characters
    sys.stdout.write(decoder.push_many(int(t) for t in block[0]))
    sys.stdout.flush()

  if stream:
    sys.stdout.write(text)
    sys.stdout.flush()
  mesh, rules = _mesh(args)
  result = decode.generate(model, [prompt_ids], max_new_tokens=args.max_new_tokens, cache=args.cache,
                           capacity=args.capacity, sampler=sampler, seed=args.seed,
                           on_tokens=on_tokens if stream else None, mesh=mesh, rules=rules,
                           draft=args.draft, draft_tokens=args.draft_tokens, kernel=args.kernel)
  ids = [int(t) for t in result.tokens[0, : result.n_generated[0]]]
  out_text = model.tokenizer.decode([t for t in ids if t != model.tokenizer.eos_id])
  if stream:
    sys.stdout.write(decoder.flush() + "\n")
  elif not args.json:
    print(text + out_text)
  cache_bytes, plan = result.cache_bytes, result.cache_plan  # plan: how kvjax.runtime sized it
  return {"model": model.name, "cache": result.spec, "prompt": text, "prompt_ids": prompt_ids,
          "capacity": plan.capacity if plan else None, "pages": plan.pages if plan else None,
          "ids": ids, "text": out_text, "prefill_s": result.prefill_s,
          "decode_s": result.decode_s, "decode_tok_per_s": result.decode_tok_per_s,
          "compile_s": result.compile_s, "n_compiles": result.n_compiles,
          "cache_bytes": sum(cache_bytes.values()), "cache_bytes_by_kind": cache_bytes,
          "sharding": result.sharding, "draft": result.draft_spec,
          "draft_tokens": args.draft_tokens if args.draft else None,
          "draft_acceptance": result.draft_acceptance}


def _cmd_perplexity(args) -> dict:
  from kvjax.perplexity import perplexity

  model = _load(args)
  try:
    with open(args.file, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise ValueError(f"cannot read {args.file}: {e.strerror}") from None
  ids = model.tokenizer.encode(text)[: args.max_tokens]
  mesh, rules = _mesh(args)
  result = perplexity(model, ids, cache=args.cache, chunk=args.chunk, mesh=mesh, rules=rules,
                      kernel=args.kernel)
  if not args.json:
    print(f"ppl {result.ppl:.4f}  nll {result.nll:.4f}  tokens {result.tokens}  "
          f"cache {sum(result.cache_bytes.values())} bytes  ({result.seconds:.1f}s)")
  return {"model": model.name, "cache": args.cache, "ppl": result.ppl, "nll": result.nll,
          "tokens": result.tokens, "cache_bytes": sum(result.cache_bytes.values()),
          "cache_bytes_by_kind": result.cache_bytes, "seconds": result.seconds}


def _cmd_bench(args) -> dict:
  from kvjax.bench import run_bench

  model = _load(args)
  mesh, rules = _mesh(args)
  out = run_bench(model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  capacity=args.capacity, cache=args.cache, repeats=args.repeats, mesh=mesh,
                  rules=rules, draft=args.draft, draft_tokens=args.draft_tokens,
                  kernel=args.kernel)
  if not args.json:
    if args.draft:
      print(f"draft {args.draft} x{args.draft_tokens}: acceptance {out['draft_acceptance']:.2f}")
    print(f"{out['decode_tok_per_s']:.1f} tok/s decode (batch {args.batch}), prefill "
          f"{out['prefill_s']*1e3:.0f} ms, compile {out['compile_s']:.1f} s in {out['n_compiles']} "
          f"compiles, cache {out['cache_bytes']/2**20:.1f} MiB, peak RSS {out['peak_rss_bytes']/2**20:.0f} MiB")
  return out


def _load_plugins(modules) -> None:
  """Imports each --plugin: a module name, found in the current directory too (as `python -m`
  would), or the path of a .py file. Any failure is one line naming the plugin."""
  import importlib
  import importlib.util
  import os

  if modules and os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())  # the console script's sys.path lacks it
  for name in modules:
    try:
      if name.endswith(".py") or os.sep in name or (os.altsep and os.altsep in name):
        if not os.path.isfile(name):
          raise ImportError(f"no such file {name!r}")
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
          spec.loader.exec_module(module)
        except BaseException:
          del sys.modules[module_name]
          raise
      else:
        importlib.import_module(name)
    except ImportError as e:
      raise ValueError(f"--plugin {name}: cannot import it ({e})") from None
    except Exception as e:  # the plugin's own code failed while importing
      raise ValueError(f"--plugin {name}: importing it raised {type(e).__name__}: {e}") from None


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  handler = {"generate": _cmd_generate, "perplexity": _cmd_perplexity, "bench": _cmd_bench,
             "specs": _cmd_specs}[args.command]
  try:
    _load_plugins(args.plugins_first + args.plugin)
    out = handler(args)
  except (ValueError, FileNotFoundError) as e:  # bad input (specs, capacities, files): a message
    print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(out, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
