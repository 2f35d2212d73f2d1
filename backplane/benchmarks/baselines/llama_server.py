"""The llama.cpp baseline: the request set sent at once to a fresh `llama-server`.

llama-server is llama.cpp's engine with continuous batching (``-cb``) over
``-np`` slots: the closest llama.cpp has to an offline batch engine. Every
prompt goes as a token-id array to ``/completion`` (no tokenizer round trip),
with ``n_predict = output_len`` and ``ignore_eos`` so each request does the
same work as in Backplane, all requests concurrently, timed from the first
send to the last answer. A server is started per run (a fresh process, like
every engine of the comparison) and its peak RSS is read when it exits.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from backplane.benchmarks.baselines.procs import TreeRssSampler, kill_group, wait_with_rusage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def completion_body(request: dict, temperature: float, seed: int) -> dict:
    """The /completion request of one benchmark request (token ids in, exactly output_len out)."""
    return {
        "prompt": request["prompt_token_ids"],
        "n_predict": request["output_len"],
        "ignore_eos": True,
        "cache_prompt": True,
        "temperature": temperature,  # <= 0: greedy
        "seed": seed,
        "stream": False,
    }


def server_command(server: str, gguf: str, port: int, slots: int, ctx_per_slot: int,
                   threads: int, extra_args: str = "") -> list[str]:
    """llama-server's command line: ``slots`` slots of ``ctx_per_slot`` tokens each.

    ``-c`` is the whole context, split evenly over the slots, so it is slots x the
    longest request. ``--no-webui``: nothing but the API is needed."""
    return [server, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-cb", "-c", str(slots * ctx_per_slot),
            "-t", str(threads), "-tb", str(threads), "--no-webui",
            *shlex.split(extra_args)]


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll /health until the model is loaded (200); fail early if the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # still loading (503) or not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"llama-server at {base_url} was not healthy after {timeout_s:.0f} s")


def send_all(base_url: str, requests: list[dict], temperature: float, seed: int,
             timeout_s: float) -> tuple[float, int]:
    """Send every request at once; (seconds until the last answer, output tokens)."""
    url = base_url + "/completion"
    pool = ThreadPoolExecutor(max_workers=max(1, len(requests)))
    try:
        start = time.perf_counter()
        answers = list(pool.map(
            lambda r: _post(url, completion_body(r, temperature, seed), timeout_s), requests))
        seconds = time.perf_counter() - start
    finally:
        # Not `with`: its exit waits for every thread, and on Ctrl-C / SIGTERM the
        # threads wait on the server, which is only killed after this returns.
        pool.shutdown(wait=False, cancel_futures=True)
    produced = 0
    for request, answer in zip(requests, answers, strict=True):
        got = int(answer.get("tokens_predicted", 0))
        if got != request["output_len"]:
            raise RuntimeError(f"llama-server returned {got} tokens for {request['request_id']}, "
                               f"expected {request['output_len']} (is ignore_eos honoured?)")
        produced += got
    return seconds, produced


def run_llama_server(server: str, gguf: str, spec: dict, threads: int, slots: int,
                     extra_args: str = "", log_path: str = os.devnull,
                     timeout_s: float = 3600.0) -> dict:
    """One fresh server, untimed warm-up, the timed request set; result as the runners print it."""
    requests = spec["requests"]
    ctx = max(len(r["prompt_token_ids"]) + r["output_len"]
              for r in requests + spec.get("warmup_requests", []))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(server, gguf, port, slots, ctx, threads, extra_args)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    sampler = TreeRssSampler(proc.pid)
    try:
        wait_healthy(base_url, proc, timeout_s=min(timeout_s, 600.0))
        load_seconds = time.perf_counter() - start
        if spec.get("warmup_requests"):
            send_all(base_url, spec["warmup_requests"], spec.get("temperature", 0.0),
                     spec.get("seed", 0), timeout_s)
        seconds, produced = send_all(base_url, requests, spec.get("temperature", 0.0),
                                     spec.get("seed", 0), timeout_s)
    except BaseException:
        kill_group(proc)
        sampler.stop()
        raise
    proc.terminate()
    try:
        peak = wait_with_rusage(proc, timeout_s=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        peak = wait_with_rusage(proc)
    return {
        "engine": "llama.cpp",
        "command": cmd,
        "seconds": seconds,
        "load_seconds": load_seconds,
        "num_requests": len(requests),
        "prompt_tokens": sum(len(r["prompt_token_ids"]) for r in requests),
        "output_tokens": produced,
        "threads": threads,
        "slots": slots,
        "ctx_per_slot": ctx,
        "peak_rss_bytes": peak,
        "peak_tree_rss_bytes": sampler.stop(),
    }


# llama.cpp's converter refuses tokenizers whose pre-tokenizer hash it does not know
# (the bench models' tokenizers are trained locally); "default" is what it would use.
_CONVERT = """
import runpy, sys
script, model_dir, out_path, outtype = sys.argv[1:5]
src = __import__("os").path.dirname(script)
sys.path[:0] = [src, src + "/gguf-py"]
try:
    import conversion.base as base
    original = base.TextModel.get_vocab_base_pre
    def tolerant(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "default"
    base.TextModel.get_vocab_base_pre = tolerant
except ImportError:
    pass  # older converters keep everything in the script itself
sys.argv = [script, model_dir, "--outfile", out_path, "--outtype", outtype]
runpy.run_path(script, run_name="__main__")
"""


def convert_to_gguf(model_dir: str, out_path: str, script: str, python: str | None = None,
                    outtype: str = "bf16") -> str:
    """GGUF of the HF model at ``out_path`` via llama.cpp's convert_hf_to_gguf.py."""
    if not os.path.isfile(script):
        raise ValueError(f"--convert-script {script!r} is not a file (llama.cpp's "
                         "convert_hf_to_gguf.py)")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    subprocess.run([python or sys.executable, "-c", _CONVERT, script, model_dir, out_path,
                    outtype], check=True)
    return out_path
