"""Every option `backplane serve --help` accepts either changes behaviour (a named test
shows it) or is refused with a message. A new flag without either fails here."""

from __future__ import annotations

import argparse
import ast
from functools import cache
from pathlib import Path

import pytest

from backplane.config import EngineArgs
from backplane.config.resolve import problems
from backplane.entrypoints.cli.main import build_parser
from backplane.platforms import resolve_platform

ROOT = Path(__file__).resolve().parents[1]

# option -> the test (path::name) that shows its effect.
SHOWN_BY = {
    "model_tag": "tests/entrypoints/test_serving_defects.py::test_several_served_model_names",
    "model": "tests/config/test_sources.py::test_positional_model_and_flags",
    "config": "tests/entrypoints/test_cli.py::test_serve_process_yaml_api_key_startup_log_and_sigterm",
    "tokenizer": "tests/core/engine/test_engine_options.py::test_separate_tokenizer_directory_is_used",
    "dtype": "tests/test_demo_model.py::test_backplane_greedy_matches_transformers",
    "max_model_len": "tests/config/test_validation.py::test_max_model_len_above_model_limit",
    "seed": "tests/core/engine/test_engine_options.py::test_seed_makes_unseeded_sampling_repeatable",
    "served_model_name": "tests/entrypoints/test_serving_defects.py::test_several_served_model_names",
    "trust_remote_code": "tests/core/engine/test_engine_options.py::test_trust_remote_code_reaches_transformers",
    "tokenizer_mode": "tests/core/engine/test_engine_options.py::test_slow_tokenizer_mode_is_refused_when_there_is_none",
    "hf_overrides": "tests/core/engine/test_engine_options.py::test_hf_overrides_change_the_model_config",
    "max_logprobs": "tests/core/engine/test_engine_options.py::test_max_logprobs_bounds_requests",
    "runner": "tests/core/pooling/test_pooling_models.py::test_runner_refusals",
    "generation_config": "tests/core/engine/test_generation_defaults.py::test_generation_config_vllm_ignores_the_file",
    "override_generation_config": "tests/core/engine/test_generation_defaults.py::test_override_is_merged_over_the_file",
    "block_size": "tests/config/test_resolve.py::test_resolve_returns_a_frozen_config_with_the_model_spec",
    "enable_prefix_caching": "tests/core/kv/test_kv_cache_manager.py::test_prompt_logprob_requests_skip_the_cache_and_disabled_cache_never_hits",
    "memory_utilization": "tests/core/engine/test_engine_options.py::test_memory_utilization_sizes_the_cache_from_available_memory",
    "kv_cache_memory_bytes": "tests/core/engine/test_engine_options.py::test_kv_cache_memory_bytes_and_num_kv_blocks_size_the_cache",
    "num_kv_blocks": "tests/core/engine/test_engine_options.py::test_kv_cache_memory_bytes_and_num_kv_blocks_size_the_cache",
    "kv_cache_dtype": "tests/core/test_fp8_kv_cache.py::test_fp8_holds_twice_the_blocks_of_bf16_in_the_same_memory",
    "calculate_kv_scales": "tests/core/test_fp8_kv_cache.py::test_calculate_kv_scales_sets_scales_from_the_first_step",
    "max_num_seqs": "tests/core/scheduler/test_scheduler.py::test_max_num_seqs_caps_running",
    "max_num_batched_tokens": "tests/core/scheduler/test_scheduler.py::test_budget_and_chunked_prefill",
    "enable_chunked_prefill": "tests/core/scheduler/test_scheduler.py::test_without_chunking_a_prompt_waits_for_a_whole_budget",
    "scheduling_policy": "tests/core/engine/test_lifecycle.py::test_fcfs_order_with_one_slot_and_priority_order",
    "async_scheduling": "tests/core/engine/test_async_scheduling.py::test_greedy_seeded_stops_and_preemption_equal_the_synchronous_loop",
    "engine_process": "tests/core/engine/test_engine_process.py::test_child_runs_the_core_and_the_config_says_so",
    "data_parallel_size": "tests/entrypoints/test_data_parallel_server.py::test_64_concurrent_requests_equal_one_core_on_both_ranks",
    "device": "tests/platforms/test_plugin_template.py::test_device_acme_selects_it_and_fails_loudly_without_a_device",
    "attention_backend": "tests/core/engine/test_parity.py::test_each_cpu_attention_backend_matches_transformers",
    "load_format": "tests/core/engine/test_engine_options.py::test_load_format_auto_and_safetensors_load_others_are_refused",
    "optimization_level": "tests/config/test_levels.py::test_platform_defaults_graph_platform_o2_cpu_o0",
    "enforce_eager": "tests/config/test_levels.py::test_enforce_eager_means_o0_and_reports_conflict",
    "compilation_config": "tests/config/test_levels.py::test_explicit_settings_win_and_are_reported",
    "host": "tests/reliability/test_sigterm_under_load.py::test_sigterm_under_load_finishes_short_streams_errors_long_ones_and_exits_0",
    "port": "tests/entrypoints/test_cli.py::test_serve_process_yaml_api_key_startup_log_and_sigterm",
    "api_key": "tests/entrypoints/test_errors.py::test_api_key_required_except_health",
    "chat_template": "tests/entrypoints/test_serving_defects.py::test_trusted_request_template_is_rendered_and_bounded_in_time",
    "trust_request_chat_template": "tests/entrypoints/test_serving_defects.py::test_request_chat_template_needs_opt_in",
    "chat_template_timeout": "tests/entrypoints/test_serving_defects.py::test_trusted_request_template_is_rendered_and_bounded_in_time",
    "response_role": "tests/entrypoints/test_request_surface.py::test_response_role",
    "uvicorn_log_level": "tests/entrypoints/test_server_options_http.py::test_uvicorn_log_level_is_applied",
    "root_path": "tests/entrypoints/test_serving_defects.py::test_open_paths_stay_open_under_a_root_path",
    "graceful_shutdown_timeout": "tests/reliability/test_sigterm_under_load.py::test_sigterm_under_load_finishes_short_streams_errors_long_ones_and_exits_0",
    "max_n": "tests/entrypoints/test_request_surface.py::test_max_n_and_max_sequences_per_request",
    "max_sequences_per_request": "tests/entrypoints/test_request_surface.py::test_max_n_and_max_sequences_per_request",
    "max_request_body_bytes": "tests/reliability/test_http_limits.py::test_body_over_the_limit_gets_413_with_content_length_or_chunked",
    "limit_concurrency": "tests/entrypoints/test_server_options_http.py::test_limit_concurrency_reaches_uvicorn",
    "timeout_keep_alive": "tests/entrypoints/test_server_options_http.py::test_timeout_keep_alive_closes_idle_connections",
    "header_timeout": "tests/reliability/test_http_limits.py::test_partial_request_head_is_closed_after_header_timeout",
    "enable_request_id_headers": "tests/entrypoints/test_request_surface.py::test_request_id_headers",
    "expose_model_path": "tests/entrypoints/test_request_surface.py::test_expose_model_path",
    "ssl_keyfile": "tests/entrypoints/test_server_options_http.py::test_ssl_keyfile_and_certfile_serve_https",
    "ssl_certfile": "tests/entrypoints/test_server_options_http.py::test_ssl_keyfile_and_certfile_serve_https",
    "allowed_origins": "tests/entrypoints/test_request_surface.py::test_cors",
    "allowed_methods": "tests/entrypoints/test_server_options_http.py::test_cors_methods_headers_and_credentials",
    "allowed_headers": "tests/entrypoints/test_server_options_http.py::test_cors_methods_headers_and_credentials",
    "allow_credentials": "tests/entrypoints/test_server_options_http.py::test_cors_methods_headers_and_credentials",
    "enable_log_requests": "tests/entrypoints/test_request_surface.py::test_enable_log_requests",
    "disable_log_stats": "tests/entrypoints/test_server_options_http.py::test_disable_log_stats_turns_the_stats_task_off",
    "disable_fastapi_docs": "tests/entrypoints/test_request_surface.py::test_disable_fastapi_docs",
    "middleware": "tests/entrypoints/test_request_surface.py::test_middleware_option",
    "stream_interval": "tests/entrypoints/test_request_surface.py::test_stream_interval",
    "enable_auto_tool_choice": "tests/entrypoints/test_tool_calling.py::test_auto_tool_choice_needs_the_flag",
    "tool_call_parser": "tests/entrypoints/test_tool_calling.py::test_tool_calls_non_streaming",
    "reasoning_parser": "tests/entrypoints/test_tool_calling.py::test_reasoning_then_tool_calls_non_streaming",
    "structured_outputs_config": "tests/entrypoints/test_structured_outputs.py::test_structured_outputs_config_sets_the_default_backend",
    "quantization": "tests/platforms/test_cpu_int8.py::test_engine_int8_tracks_bf16",
    "speculative_config": "tests/entrypoints/test_speculative_serving.py::test_speculative_config_serves_the_same_text_and_reports_acceptance",
    "enable_lora": "tests/entrypoints/test_lora_serving.py::test_each_adapter_serves_what_the_offline_engine_generates",
    "max_loras": "tests/entrypoints/test_lora_serving.py::test_each_adapter_serves_what_the_offline_engine_generates",
    "lora_modules": "tests/entrypoints/test_lora_serving.py::test_each_adapter_serves_what_the_offline_engine_generates",
    "allow_runtime_lora_updating": "tests/entrypoints/test_lora_serving.py::test_load_routes_need_the_switch_and_modules_need_enable_lora",
    "max_lora_rank": "tests/entrypoints/test_lora_serving.py::test_max_lora_rank_refuses_a_larger_adapter_at_load",
    "max_cpu_loras": "tests/entrypoints/test_lora_serving.py::test_max_cpu_loras_bounds_the_adapters_kept_in_host_memory",
    "tensor_parallel_size": "tests/entrypoints/test_parallel_server.py::test_tp2_server_matches_tp1_and_sigterm_leaves_nothing",
    "pipeline_parallel_size": "tests/core/distributed/test_model_parallel.py::test_split_model_matches_unsplit",
    "distributed_executor_backend": "tests/core/distributed/test_external_launcher.py::test_torchrun_ranks_agree_with_each_other_and_with_one_rank",
}

# option -> EngineArgs keywords whose use must be refused with a message naming it.
REFUSED = {
    "revision": {"revision": "main"},
    "max_seq_len_to_capture": {"max_seq_len_to_capture": 8192},
    "download_dir": {"download_dir": "/tmp/models"},
}


def _serve_options() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    return sorted({
        a.dest for a in serve._actions
        if a.help != argparse.SUPPRESS and a.dest != "help"
    })


@cache
def _test_names(path: str) -> frozenset[str]:
    tree = ast.parse((ROOT / path).read_text())
    return frozenset(
        node.name for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    )


def test_every_serve_option_is_shown_to_work_or_refused():
    missing = [o for o in _serve_options() if o not in SHOWN_BY and o not in REFUSED]
    assert not missing, f"options with neither a test of their effect nor a refusal: {missing}"


@pytest.mark.parametrize("option", sorted(SHOWN_BY))
def test_the_named_test_exists(option):
    path, _, name = SHOWN_BY[option].partition("::")
    assert name in _test_names(path), f"{option}: {SHOWN_BY[option]} does not exist"


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_refused_options_say_so(option, llama_model_dir):
    found = problems(EngineArgs(model=llama_model_dir, **REFUSED[option]), resolve_platform("cpu"))
    assert any(option in p for p in found), found
