"""Which lane a test runs in, beyond its own `@pytest.mark.slow`, and in what order.

The fast lane (`python -m pytest -q`) must stay under 5 minutes on a 2-core CPU with a cold
compilation cache, and nearly all of a test's time there is XLA compiling its programs. So the
fast lane keeps, for every module of `kvjax/`, the tests that check its contract against an
oracle, plus the quick conformance kit on every kind and the broken kinds; `FULL_LANE` sends the
rest here: larger variants of a check the fast lane already makes, model-level runs of a kind on
the tiny model, and tests whose cost is mostly compiling one more spec. They are marked `slow`
at collection, so `-m slow` (the full lane, and CI) runs every one of them.

Entries are node-id prefixes ("path::test" takes every parametrization, "path::test[id]" one).
The figures are wall seconds of one cold one-process run before the move (2026-12-06; later
groups were measured with the earlier ones already moved).
"""

from __future__ import annotations

FULL_LANE = {
    # presses/: each press keeps its NumPy-oracle tests in the fast lane; end-to-end runs through
    # the model (the kit on tiny, Gemma's hybrid layout, the decoding loop) are full-lane, where
    # the kit also runs on every press (measured cold, one process, loaded box).
    "tests/presses/test_compress.py::test_kit_end_to_end_on_tiny": 20.2,
    "tests/presses/test_compress.py::test_hybrid_model_presses_its_global_layers_only": 14.5,
    "tests/presses/test_decoding.py::test_a_target_that_never_binds_generates_like_a_full_cache": 10.2,
    "tests/presses/test_more.py::test_compactor_blends_leverage_and_non_causal_attention_between_sinks": 5.9,
    "tests/presses/test_more.py::test_kit": 7.8,
    "tests/presses/test_decoding.py::test_streaming_llm_keeps_the_sinks_and_the_most_recent": 15.9,
    "tests/presses/test_more.py::test_merging_changes_only_the_stored_values": 12.1,
    "tests/presses/test_rerotation.py::test_equals_a_full_cache_of_the_kept_tokens[key_rerotation(knorm)]": 9.2,
    "tests/presses/test_kvzip.py::test_ratio_zero_keeps_the_context_and_decodes_like_a_full_cache": 8.6,
    # (2026-12-07, the suite at 318 s on a fresh clone: cold, -n 2, 2 idle cores; wall seconds
    # of that run) kvzip's given-scores path; the kit's end_to_end checks budget-above-prompt
    # generation for every press; Gemma-layout sharing; the leaderboard script (full-lane
    # test_experiments.py runs its --quick mode).
    "tests/presses/test_kvzip.py::test_scored_once_it_compresses_a_plain_prefill": 10.6,
    "tests/presses/test_kvzip.py::test_hybrid_window_layers_hold_the_context_not_its_repetition[ids]": 7.6,
    "tests/presses/test_compress.py::test_budget_above_prompt_generates_as_the_full_cache": 8.3,
    "tests/caches/test_hybrid.py::test_share_cal_with_identity_maps_equals_share_on_gemma3": 12.8,
    "tests/experiments/test_leaderboard.py::test_leaderboard_quick_structure": 23.7,
    "tests/presses/test_compress.py::test_pyramid_budgets_make_a_layered_cache": 4.6,
    # (2026-12-07, the suite at 310 s on a fresh clone after chunked kvzip's tests) the one-pass
    # equivalence of a single chunk and the hybrid variant of the chunked reference check (the
    # tiny variant and the compress checks stay; the kvpress oracle checks both paths).
    "tests/presses/test_kvzip.py::test_one_chunk_is_the_one_pass_extension": 7.2,
    "tests/presses/test_kvzip.py::test_chunked_scores_equal_a_causal_run_of_each_repetition[tiny_gemma3]": 4.8,
    "tests/presses/test_compress.py::test_a_user_press_end_to_end": 10.0,
    "tests/test_research_doc.py::test_a_press_compresses_the_pages_own_model": 15.0,
    "tests/presses/test_compress.py::test_a_prefilled_refuses_what_it_cannot_replay": 6.0,
    # caches/: model-level equivalences and extra oracle variants; each kind keeps its quick
    # conformance run and its own policy-vs-oracle test in the fast lane.
    "tests/caches/test_adakv.py::test_bytes_and_full_equivalence": 4.1,
    "tests/caches/test_adakv.py::test_snapkv_prompt_shares_the_budget_by_score": 3.8,
    "tests/caches/test_h2o.py::test_budget_above_sequence_equals_full": 18.1,
    "tests/caches/test_h2o.py::test_attend_matches_oracle": 16.7,
    "tests/caches/test_h2o.py::test_generate_tiny_constant_memory": 7.3,
    "tests/caches/test_h2o.py::test_jit_equals_no_jit": 2.7,
    "tests/caches/test_layered.py::test_equal_layers_decode_as_the_stacked_cache": 11.9,
    "tests/caches/test_layered.py::test_pyramid_bytes_and_budgets": 5.8,
    "tests/caches/test_lowrank.py::test_full_rank_equals_full_cache": 11.2,
    "tests/caches/test_lowrank.py::test_prefill_and_decode_export_for_gpu_and_tpu": 6.8,
    "tests/caches/test_lowrank.py::test_full_rank_generation_equals_full_cache": 4.4,
    "tests/caches/test_lowrank.py::test_quantized_latents_within_their_bound": 3.2,
    "tests/caches/test_lowrank.py::test_perplexity_with_maps": 2.8,
    "tests/caches/test_offload.py::test_logits_equal_full_cache": 12.2,
    "tests/caches/test_offload.py::test_ragged_prefill_equals_full": 7.3,
    "tests/caches/test_offload.py::test_generate_equals_full": 5.8,
    "tests/caches/test_packing.py::test_jit_matches_eager": 3.9,
    "tests/caches/test_packing.py::test_constant_groups_and_zeros_survive": 2.2,
    "tests/caches/test_paged.py::test_generate_matches_full": 9.6,
    "tests/caches/test_paged.py::test_quantized_pages_within_bound": 5.0,
    "tests/caches/test_paged.py::test_memory_follows_tokens_held": 2.8,
    "tests/caches/test_quantized.py::test_generate_tiny_dynamic_grows": 15.7,
    "tests/caches/test_quantized.py::test_attend_sees_quantized_prefix_and_exact_chunk": 12.7,
    "tests/caches/test_quantized.py::test_chunking_never_changes_contents": 12.3,
    "tests/caches/test_quantized.py::test_generate_tiny": 11.1,
    "tests/caches/test_quantized.py::test_reorder_reset_grow": 10.7,
    "tests/caches/test_quantized.py::test_quantize_full_cache_equals_feeding_it": 9.9,
    "tests/caches/test_quantized.py::test_keys_are_stored_rotated": 9.3,
    "tests/caches/test_quantized.py::test_crop_keeps_what_attention_saw_then_continues": 8.8,
    "tests/caches/test_quantized.py::test_chunked_prefill_close_to_token_by_token": 8.2,
    "tests/caches/test_quantized.py::test_tiny_logits_close_to_full": 7.4,
    "tests/caches/test_shared.py::test_logits_match_numpy_oracle": 16.4,
    "tests/caches/test_shared.py::test_token_by_token_equals_chunked_and_identity_maps_equal_plain": 4.0,
    "tests/caches/test_shared.py::test_generate_end_to_end": 4.0,
    "tests/caches/test_shared.py::test_generic_inner_kind_equals_full_inner": 3.7,
    "tests/caches/test_snapkv.py::test_long_prompt_is_attended_in_full": 5.7,
    "tests/caches/test_snapkv.py::test_keeps_what_the_question_attends_to": 4.1,
    "tests/caches/test_tiered.py::test_generate_tiny_constant_memory": 12.0,
    "tests/caches/test_tiered.py::test_attend_matches_oracle": 11.8,
    "tests/caches/test_tiered.py::test_all_fp32_budget_above_sequence_equals_full": 7.1,
    "tests/caches/test_tiered.py::test_jit_equals_no_jit": 4.9,
    "tests/caches/test_tiered.py::test_memory_per_tier": 3.4,
    "tests/caches/test_window.py::test_chunked_prefill_equals_token_by_token": 5.6,
    "tests/caches/test_window.py::test_window_longer_than_sequence_equals_full": 5.2,
    "tests/caches/test_window.py::test_generate_ragged_batch_rows_independent": 4.9,
    "tests/caches/test_window.py::test_generate_streams_in_constant_memory": 4.5,
    "tests/caches/test_window.py::test_jit_equals_eager_model": 3.8,
    "tests/caches/test_window.py::test_bounded_rope_long_stream": 3.4,
    "tests/caches/test_window.py::test_perplexity_tiny": 2.6,
    # the engine, prefix caching, speculative decoding: one end-to-end check each stayed fast (the
    # speculative one moved in the fourth pass below; its argument checks stay)
    "tests/test_engine.py::test_outputs_equal_running_each_request_alone": 11.5,
    "tests/test_engine.py::test_warm_engine_compiles_nothing": 5.7,
    "tests/test_engine.py::test_parallel_samples_share_the_prompt_pages": 4.7,
    "tests/test_engine.py::test_shared_prefix_adopts_pages_and_equals_alone": 4.2,
    "tests/test_prefix.py::test_store_keys_on_weights_and_dtype_not_on_config": 6.0,
    "tests/test_prefix.py::test_paged_prefix_is_stored_once_and_shared": 5.5,
    "tests/test_prefix.py::test_other_kinds": 3.2,
    "tests/test_speculative.py::test_sampling_matches_the_exact_distribution": 25.0,
    "tests/test_speculative.py::test_greedy_equals_plain[int4-4]": 7.2,
    "tests/test_speculative.py::test_greedy_equals_plain[snapkv:8+window:8-2]": 6.3,
    "tests/test_speculative.py::test_greedy_equals_plain[window:16-1]": 3.0,
    "tests/test_speculative.py::test_greedy_equals_plain[full-2]": 3.5,
    # one spec per family stays: full, a window, a quantized one
    "tests/test_perplexity.py::test_chunked_equals_token_by_token[h2o:8+window:8-2e-05]": 2.3,
    "tests/test_perplexity.py::test_chunked_equals_token_by_token[share:2-2e-05]": 1.8,
    "tests/test_perplexity.py::test_chunked_equals_token_by_token[share:2+sink:2+window:16-2e-05]": 2.3,
    "tests/test_perplexity.py::test_chunked_equals_token_by_token[int4+residual:32+h2o:8+window:32-0.005]": 4.5,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[tier:8:bf16,16:int8,16:int2]": 2.3,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[int4+residual:32+h2o:8+window:32]": 1.2,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[int4+residual:32]": 1.2,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[share:2+int8]": 1.0,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[paged:16+int4]": 1.0,
    # second passes: each module keeps a first one in the fast lane
    "tests/test_beam.py::test_one_beam_is_greedy": 3.5,
    "tests/test_engine.py::test_prefix_sharing_saves_pages": 3.2,
    "tests/test_prefix.py::test_store_hit_equals_miss_and_leaves_stored_cache_alone": 5.5,
    "tests/test_prefix.py::test_stored_cache_grows_when_a_request_needs_more": 4.0,
    "tests/test_perplexity.py::test_chunked_equals_token_by_token[tier:8:fp32,16:int8,24:int2-0.005]": 3.6,
    "tests/test_plan.py::test_estimate_equals_real_nbytes": 3.9,
    "tests/test_speculative.py::test_second_call_compiles_nothing": 2.6,
    "tests/test_sharding.py::test_single_device_mesh_equals_no_mesh": 4.4,
    "tests/caches/test_window.py::test_slide_equals_append_and_jit_equals_eager": 3.1,
    "tests/caches/test_window.py::test_nothing_mutated": 2.1,
    # third pass (a clean-clone one-process run took 298 s): the kind keeps its quick kit run
    "tests/caches/test_paged.py::test_fork_shares_pages_and_copies_on_write": 5.7,
    "tests/caches/test_tiered.py::test_append_matches_tier_oracle": 5.5,
    "tests/caches/test_quantized.py::test_contents_match_oracle": 4.7,
    # the kit: the bug-free twins are the thorough side (issue 22 brought every bug's
    # one-invariant run back to the fast lane, 12.6 s for all nine, and sent the three remaining
    # whole quick suites here: every seeded bug is now caught in both lanes)
    "tests/testing/test_broken_kinds.py::test_the_same_kinds_without_bugs_pass": 13.1,
    # fourth pass (issue 21 added tests; a one-process run took 356 s, then 312 s): second checks
    # of a module whose first stays, kit bugs whose thorough runs catch them in this lane too, and
    # the speculative and beam end-to-end runs (their argument checks stay fast)
    "tests/caches/test_packing.py::test_quantize_matches_oracle_and_error_bound": 9.1,
    "tests/test_engine.py::test_pools_of_exactly_the_pages_requests_take": 6.4,
    "tests/test_engine.py::test_eos_stops_a_request": 4.8,
    "tests/test_beam.py::test_beam_search_shares_pages_and_matches_full": 4.5,
    "tests/caches/test_offload.py::test_ring_and_host_follow_appends": 3.3,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[int2]": 1.3,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[int8]": 1.3,
    "tests/test_export.py::test_prefill_and_decode_export_for_gpu_and_tpu[offload]": 1.1,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-ring[off-by-one]-contents]": 5.1,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-full[row-leak]-rows-independent]": 4.9,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-ring[positions]-positions]": 2.8,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-full[mutates-input]-inputs-unchanged]": 2.6,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-ring[writes-padding]-n_valid]": 7.0,
    # issue 22 (one-process cold fast lane 386 s after the refactor's new tests; seconds from that
    # run): the codec keeps its oracle and byte tests in the fast lane, every kind's fp8 attention
    # moves here; the engine keeps its soak, the admission property moves; beam and knorm keep
    # their own tests and kit runs there.
    "tests/caches/test_codec.py::test_every_kind_with_fp8_attends_close_to_full_attention": 15.6,
    "tests/test_engine_admission.py::test_need_is_exactly_the_pages_a_request_takes": 8.6,
    "tests/test_runtime.py::test_beam_search_sizes_a_paged_pool_from_its_beams": 4.7,
    "tests/caches/test_knorm.py::test_budget_above_sequence_equals_full": 3.4,
    # second pass (346 s): pyramid and adakv are modifiers of the scored kinds, whose quick kit
    # runs stay (h2o, snapkv, knorm); their own oracle tests stay too
    "tests/caches/test_layered.py::test_conformance[quick-snapkv:4+window:4+pyramid]": 14.8,
    "tests/caches/test_adakv.py::test_conformance[quick-snapkv:2+window:4+adakv]": 12.5,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-full[jit-differs]-jit-equals-eager]": 7.7,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-full[ignores-scale]-attention]": 5.0,
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-full[nbytes]-nbytes]": 4.6,
    "tests/test_engine.py::test_text_prompts_and_refused_ids": 4.9,
    "tests/test_registry_kinds.py::test_generate_while_it_holds_everything_equals_full": 3.4,
    "tests/test_registry_kinds.py::test_cli_with_plugin": 3.3,
    "tests/caches/test_page_table.py::test_forks_writing_at_once_each_copy_and_free_the_original": 2.9,
    "tests/test_engine_admission.py::test_audit_names_an_idle_row_that_holds_tokens": 2.6,
    # third pass (314 s): end-to-end second checks whose module keeps its oracle test here
    "tests/test_speculative.py::test_eos_and_streaming": 7.3,
    "tests/test_engine.py::test_default_pool_runs_requests_that_fit_together": 4.8,
    "tests/caches/test_quantized.py::test_spec_wiring": 4.2,
    "tests/test_perplexity.py::test_accepts_a_cache_object_and_leaves_it_alone": 3.7,
    "tests/caches/test_page_table.py::test_pinned_pages_outlive_their_rows": 2.8,
    "tests/test_registry_kinds.py::test_perplexity_chunked_equals_stepwise_and_evicts": 2.6,
    # fourth pass (the same run took 296 s, then 307 s on the final tree: too close to 300):
    # second checks whose first stays (runtime's pool sizing from rows, the soak's EOS, the
    # kit's overflow invariant)
    "tests/test_runtime.py::test_perplexity_sizes_a_paged_pool_from_its_documents": 4.9,
    "tests/test_engine.py::test_eos_defaults_to_the_tokenizers": 4.6,
    "tests/caches/test_quantized.py::test_capacity_checks_and_overflow": 4.3,
    # issue 22: the fast lane checks the over-claiming wrapper with the protocol invariant alone
    # (tests/testing/test_broken_kinds.py::test_a_wrapper_claiming_a_verb_is_caught, 1.5 s)
    "tests/testing/test_broken_kinds.py::test_each_bug_is_caught_and_named_by_the_whole_suite[quick-ring[claims-crop]-protocol]": 6.7,
    "tests/test_speculative.py::test_greedy_equals_plain[sink:2+window:8-3]": 5.9,
    "tests/test_beam.py::test_capacity_is_the_kinds_own_choice": 3.4,
    "tests/test_decode.py::test_dynamic_cache_grows_and_equals_full": 3.3,
    # fifth pass (303 s): second oracle checks of kinds whose quick kit run stays
    "tests/caches/test_window.py::test_attend_matches_oracle": 4.7,
    "tests/caches/test_packing.py::test_pack_round_trip_is_bit_exact": 3.7,
    "tests/caches/test_quantized.py::test_newest_tokens_stay_exact": 3.5,
    "tests/caches/test_offload.py::test_crop_refills_ring_from_host": 3.0,
    "tests/caches/test_snapkv.py::test_prompt_then_decode_matches_oracle[heavy4-window4-observe4-kernel5-poolingavg]": 2.0,
    "tests/test_perplexity.py::test_default_chunk[tier:8:fp32,16:int8,24:int2-256]": 1.9,
    "tests/test_attention.py::test_blockwise_arbitrary_positions": 1.3,
    # issue 23 (Gemma 3 and layouts; a cold one-process run took 497 s on a box where the tests
    # that predate it took 399 s, 295 s the day before; after these moves the lane measured 301 s,
    # its 144 new tests 36 s of it): the new tests keep their oracles fast
    # (tiny-gemma3 against the NumPy forward, cached decoding against the forward, each layout
    # kind against the sliding-window oracle, the kit on a ring beside a full group) and send
    # their second checks here, with four older second checks to pay for the rest
    "tests/caches/test_hybrid.py::test_conformance_of_a_window_group_beside_a_full_group[quick-int8+group:16-3-groups1]": 14.3,
    "tests/caches/test_hybrid.py::test_conformance_of_a_hybrid[quick-dynamic@0; full]": 6.9,
    "tests/test_gemma3.py::test_uncached_generation_keeps_the_window": 8.3,
    "tests/test_cli.py::test_generate_gemma3_with_a_layout": 7.4,
    "tests/test_gemma3_kinds.py::test_every_builtin_kind_generates_on_tiny_gemma3": 4.6,
    "tests/test_gemma3.py::test_cached_decoding_equals_the_forward[full-8]": 2.3,
    "tests/test_gemma3.py::test_cached_decoding_equals_the_forward[full@all-1]": 2.0,
    "tests/test_gemma3.py::test_cached_decoding_equals_the_forward[full@all-256]": 1.7,
    "tests/caches/test_hybrid.py::test_blocks_below_the_window_are_skipped_exactly[int8]": 2.4,
    "tests/caches/test_hybrid.py::test_blocks_below_the_window_are_skipped_exactly[paged]": 2.1,
    "tests/caches/test_hybrid.py::test_matches_the_sliding_window_oracle[paged:4@all-PagedCache-1e-05]": 2.0,
    "tests/test_engine_soak.py::test_soak_audits_clean_and_equals_alone": 7.9,
    "tests/test_decode.py::test_greedy_identical_across_cache_modes[ragged]": 7.6,
    "tests/caches/test_offload.py::test_unexpected_backend_errors_are_not_swallowed": 5.1,
    # documentation pages run end to end
    "tests/test_research_doc.py::test_research_page_runs": 9.9,
    "tests/testing/test_docs_example.py::test_testing_page_example_passes_the_kit": 8.6,
    # issue 25 (Pallas kernels, interpret mode; cold one-process seconds on the loaded box): the
    # fast lane keeps one small case per kernel (GPU paged, GPU contiguous with a window, TPU
    # paged), one cache-level route (paged), the resolver and the cuda/tpu lowering of the paged
    # step; these second checks go here (the MQA/bf16/generate variants are marked slow)
    "tests/kernels/test_gpu.py::test_paged_fp8_pages_with_token_scales_equal_jnp_over_decoded_pages": 2.2,
    "tests/kernels/test_route.py::test_a_tpu_route_runs_the_tpu_kernel_interpreted": 2.6,
    "tests/kernels/test_route.py::test_full_window_decode_steps_equal_jnp": 2.1,
    "tests/test_export.py::test_pallas_decode_lowers_through_triton_for_cuda[full]": 2.7,
}

# Run first, so that under xdist no worker is left alone with one of them at the end: each
# starts subprocesses or runs for minutes. Module paths, most expensive first.
HEAVY_FIRST = (
    "tests/test_sharding.py",
    "tests/test_experiments.py",
    "tests/caches/test_tiered.py::test_smollm2_tiered",
    "tests/caches/test_h2o.py::test_smollm2_h2o",
    "tests/caches/test_offload.py::test_smollm2_offload_matches_full",
    "tests/caches/test_quantized.py::test_smollm2",
)


def in_full_lane(nodeid: str) -> bool:
  return nodeid in FULL_LANE or nodeid.split("[", 1)[0] in FULL_LANE


def rank(nodeid: str) -> int:
  """Sort key: HEAVY_FIRST entries in their order, then everything else as collected."""
  for i, prefix in enumerate(HEAVY_FIRST):
    if nodeid.startswith(prefix):
      return i
  return len(HEAVY_FIRST)
