"""`bench throughput --baseline vllm | llama.cpp`, run once on the tiny model against fakes.

CI has neither vLLM nor llama.cpp. The vLLM side runs the real runner script
(backplane/benchmarks/baselines/vllm_runner.py) in a child interpreter whose
`vllm` is the stand-in under fakes/; the llama.cpp side starts fakes/fake_llama_server.py
as its llama-server. Backplane itself runs for real, in its own child process.
No timing assertions: the plumbing (same requests, flags, env, RSS, ratios) is tested.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time

import pytest

from backplane.benchmarks.baselines.procs import parse_result, tree_rss_bytes
from backplane.benchmarks.external import ExternalOptions
from backplane.benchmarks.workload import WorkloadSpec, resolve_workload_args
from backplane.entrypoints.cli.main import main

FAKES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fakes")


def _script(path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def fake_vllm_python(tmp_path) -> str:
    """A "python" whose `import vllm` finds the fake (the runner script itself is real)."""
    return _script(tmp_path / "python",
                   f'#!/bin/sh\nPYTHONPATH={FAKES} exec {sys.executable} "$@"\n')


@pytest.fixture
def fake_llama_server(tmp_path) -> str:
    return _script(tmp_path / "llama-server", f'#!/bin/sh\nexec {sys.executable} '
                   f'{os.path.join(FAKES, "fake_llama_server.py")} "$@"\n')


def test_both_baselines_against_fakes(bench_tiny_model, fake_vllm_python, fake_llama_server,
                                      tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "vllm.json"))
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(tmp_path / "llama.json"))
    out = tmp_path / "result.json"
    code = main([
        "bench", "throughput", "--model", bench_tiny_model, "--workload", "w3",
        # Small overrides of the preset: flags win over --workload.
        "--num-prompts", "3", "--prefix-len", "8", "--input-len", "4", "--output-len", "5",
        "--baseline", "vllm", "--baseline", "llama.cpp",
        "--baseline-python", fake_vllm_python, "--vllm-kv-cache-gib", "2",
        "--llama-server", fake_llama_server, "--gguf", str(gguf),
        "--llama-server-args", "--extra-flag 1",
        "--baseline-log-dir", str(tmp_path / "logs"),
        "--num-kv-blocks", "64", "--max-model-len", "256", "--no-progress", "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["workload"]["num_prompts"] == 3 and result["workload"]["prefix_len"] == 8
    assert set(result["baselines"]) == {"vllm", "llama.cpp"}
    assert [r["engine"] for r in result["runs"]] == ["backplane", "vllm", "llama.cpp"]
    for run in result["runs"]:
        assert run["output_tokens"] == 3 * 5  # every engine produced exactly output_len each
        assert run["prompt_tokens"] == 3 * 12  # and saw the same prompts
        assert run["output_tokens_per_s"] > 0 and run["peak_rss_bytes"] > 0
        assert len(run["load_avg_at_start"]) == 3
    for name in ("vllm", "llama.cpp"):
        assert result["ratios"][name]["output_tokens_per_s"]["median"] > 0
        assert result["ratios"][name]["peak_rss_bytes"]["median"] > 0
    threads = result["threads"]
    assert threads >= 1 and result["dtype"] == "float32"

    # vLLM got Backplane's settings, thread count and the KV cache size.
    seen = json.loads((tmp_path / "vllm.json").read_text())
    assert seen["kwargs"]["model"] == bench_tiny_model
    assert seen["kwargs"]["dtype"] == "float32" and seen["kwargs"]["max_model_len"] == 256
    assert seen["kwargs"]["enable_prefix_caching"] is True
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert seen["env"]["OMP_NUM_THREADS"] == str(threads)

    # llama-server: continuous batching over one slot per request, our threads, extra args.
    argv = json.loads((tmp_path / "llama.json").read_text())["argv"]
    assert argv[argv.index("-np") + 1] == "3" and "-cb" in argv
    assert argv[argv.index("-t") + 1] == str(threads)
    assert argv[-2:] == ["--extra-flag", "1"]
    # Each engine's request file is kept, with the same prompts for every engine.
    with open(tmp_path / "logs" / "backplane-1.json") as f:
        bp_requests = json.load(f)["requests"]
    with open(tmp_path / "logs" / "vllm-1.json") as f:
        assert json.load(f)["requests"] == bp_requests


def test_repeats_interleave_and_reverse(bench_tiny_model, fake_vllm_python, tmp_path):
    """Engine order alternates (A B, B A) and every repeat uses its own prompts."""
    from backplane.benchmarks import external

    calls = []

    def fake_run(self, engine, label, spec):
        calls.append((engine, spec["requests"][0]["prompt_token_ids"]))
        self.threads, self.dtype = 2, "float32"
        n = len(spec["requests"])
        return {"seconds": 1.0 if engine == "backplane" else 2.0, "num_requests": n,
                "prompt_tokens": 10, "output_tokens": 10 * n, "output_tokens_per_s": 10.0 * n
                if engine == "backplane" else 5.0 * n, "requests_per_s": 1.0,
                "total_tokens_per_s": 1.0, "peak_rss_bytes": 100 if engine == "backplane"
                else 200}

    from backplane.config.engine_args import EngineArgs

    opts = ExternalOptions(engine_args=EngineArgs(model=bench_tiny_model),
                           workload=WorkloadSpec(num_prompts=2, output_len=3, input_len=4),
                           baselines=("vllm",), repeat=3, baseline_python=fake_vllm_python,
                           log_dir=str(tmp_path))
    original = external._Runner.run
    external._Runner.run = fake_run
    try:
        result = external.run_external(opts)
    finally:
        external._Runner.run = original
    assert [c[0] for c in calls] == ["backplane", "vllm", "vllm", "backplane",
                                     "backplane", "vllm"]
    assert calls[0][1] == calls[1][1] and calls[0][1] != calls[2][1]
    assert result["ratios"]["vllm"]["output_tokens_per_s"]["median"] == pytest.approx(2.0)
    assert result["ratios"]["vllm"]["peak_rss_bytes"]["median"] == pytest.approx(0.5)
    assert len(result["backplane"]["load_avg_1m_at_start"]["runs"]) == 3


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "vllm"], "--baseline-python"),
    (["--baseline", "vllm", "--baseline-python", "/nonexistent/python"], "/nonexistent/python"),
    (["--baseline", "llama.cpp", "--llama-server", "/bin/sh"], "--gguf"),
    (["--baseline", "llama.cpp"], "--llama-server"),
    (["--baseline", "llama.cpp", "--llama-server", "/bin/sh", "--convert-gguf"],
     "--convert-script"),
    (["--baseline", "vllm", "--baseline", "transformers"], "--baseline transformers"),
    (["--baseline", "vllm", "--ceiling"], "--ceiling"),
])
def test_missing_or_conflicting_flags_name_the_flag(bench_tiny_model, argv, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        main(["bench", "throughput", "--model", bench_tiny_model, *argv, "--no-progress"])


def test_workload_presets_and_overrides():
    def resolved(**given):
        args = argparse.Namespace(workload=None, num_prompts=None, input_len=None,
                                  input_len_range=None, output_len=None, prefix_len=None)
        vars(args).update(given)
        resolve_workload_args(args)
        return (args.num_prompts, args.input_len, args.input_len_range, args.output_len,
                args.prefix_len)

    assert resolved() == (64, 128, None, 128, 0)  # the old defaults
    assert resolved(workload="w1") == (1, 128, None, 128, 0)
    assert resolved(workload="w2") == (64, None, [64, 512], 128, 0)
    assert resolved(workload="w3") == (64, 32, None, 128, 400)
    # A prompt length by flag replaces the preset's, in either form.
    assert resolved(workload="w2", input_len=100) == (64, 100, None, 128, 0)
    assert resolved(workload="w3", input_len_range=[5, 9], num_prompts=2) == (2, None, [5, 9],
                                                                               128, 400)


def test_result_line_and_tree_rss():
    assert parse_result("log\nBACKPLANE_BASELINE_RESULT {\"a\": 1}\nmore log\n") == {"a": 1}
    assert parse_result("no result here") is None
    if os.path.isdir("/proc"):
        assert tree_rss_bytes(os.getpid()) > 0


def test_runner_timeout_kills_the_whole_group(tmp_path):
    """A hung engine (here a shell whose child sleeps) is killed with its children."""
    import subprocess

    from backplane.benchmarks.baselines.procs import run_runner

    pid_file = tmp_path / "child.pid"
    cmd = ["/bin/sh", "-c", f"sleep 30 & echo $! > {pid_file}; wait"]
    with pytest.raises(subprocess.TimeoutExpired):
        run_runner(cmd, dict(os.environ), str(tmp_path), "hung", timeout_s=1.0)
    child = int(pid_file.read_text())

    def alive() -> bool:  # a zombie waiting for init to reap it counts as dead
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    for _ in range(50):
        if not alive():
            break
        time.sleep(0.05)
    assert not alive()


def test_runner_failure_shows_the_log(tmp_path):
    from backplane.benchmarks.baselines.procs import run_runner

    cmd = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exited with 3.*boom"):
        run_runner(cmd, dict(os.environ), str(tmp_path), "broken")
