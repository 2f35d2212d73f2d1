"""`backplane bench serve`: online load against any OpenAI-compatible server.

Requests arrive by a Poisson process at ``request_rate`` per second (or a
gamma process when ``burstiness`` != 1, or all at once with rate ``inf``),
each one streamed over SSE with httpx. Per request it records the time to
the first token (TTFT), the gaps between streamed chunks (ITL), the time per
output token after the first (TPOT) and end-to-end latency (E2EL); the run
reports their mean/median/p90/p99, request and token throughput, and goodput:
completed requests per second that met every given SLO.

Prompts are random (``input_len`` tokens decoded from random ids when a
tokenizer is given, else ``input_len`` random words) or the first human turn
of each conversation in a ShareGPT-style JSON file. Output token counts come
from the server's usage report (``stream_options.include_usage``) when it
gives one, else from the number of streamed chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from backplane.benchmarks.report import dump_json, print_table, summarize

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
SLO_METRICS = ("ttft", "tpot", "e2el")

# Words for tokenizer-free random prompts: short and common, roughly one token each.
_WORDS = (
    "the of and to in is was for on are with as at be by this have from or one had not but "
    "what all were when we there can an your which their said if do will each about how up out "
    "them then she many some so these would other into has more her two like him see time could "
    "no make than first been its who now people my made over did down only way find use may "
    "water long little very after words called just where most know get through back much go "
    "good new write our used me man too any day same right look think also around another came"
).split()


@dataclass
class ServeRequest:
    """One prompt to send: text, its token count (estimated without a tokenizer), output length."""

    prompt: str
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """What happened to one streamed request (times in seconds)."""

    success: bool
    prompt_len: int
    output_tokens: int = 0
    ttft: float = math.nan
    e2el: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        if self.output_tokens <= 1 or math.isnan(self.ttft):
            return math.nan
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 0.5, "tpot": 0.05} (SLOs given in ms)."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"goodput SLO {item!r} must look like NAME:MILLISECONDS with NAME one of "
                f"{', '.join(SLO_METRICS)}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of ms") from None
        if ms <= 0:
            raise ValueError(f"goodput SLO {item!r}: the limit must be positive")
        slos[name] = ms / 1000.0
    return slos


def random_prompts(num: int, input_len: int, output_len: int, seed: int,
                   tokenizer=None) -> list[ServeRequest]:
    """``num`` random prompts of about ``input_len`` tokens each."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError(
            f"num_prompts ({num}), input_len ({input_len}) and output_len ({output_len}) "
            "must all be at least 1"
        )
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        if tokenizer is not None:
            special = set(tokenizer.all_special_ids)
            ids = []
            while len(ids) < input_len:
                tid = rng.randrange(len(tokenizer))
                if tid not in special:
                    ids.append(tid)
            text = tokenizer.decode(ids)
            length = len(tokenizer.encode(text, add_special_tokens=False))
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(input_len))
            length = input_len
        out.append(ServeRequest(text, length, output_len))
    return out


def sharegpt_prompts(path: str, num: int, seed: int, output_len: int | None = None,
                     tokenizer=None) -> list[ServeRequest]:
    """Prompts from a ShareGPT-style file: the first human turn, the reply's length as output.

    Conversations with fewer than two turns are skipped; the rest are shuffled with
    ``seed`` and the first ``num`` taken. Lengths are counted in tokens with a tokenizer,
    else in words.
    """
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"dataset {path!r} must hold a JSON list of conversations")

    def count(text: str) -> int:
        if tokenizer is not None:
            return len(tokenizer.encode(text, add_special_tokens=False))
        return len(text.split())

    pairs = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt = turns[0].get("value") or turns[0].get("content") or ""
        reply = turns[1].get("value") or turns[1].get("content") or ""
        if prompt and reply:
            pairs.append((prompt, reply))
    if not pairs:
        raise ValueError(f"dataset {path!r} has no conversation with a prompt and a reply")
    random.Random(seed).shuffle(pairs)
    out = []
    for prompt, reply in pairs[:num]:
        out.append(ServeRequest(prompt, count(prompt), output_len or max(count(reply), 1)))
    return out


def _payload(req: ServeRequest, endpoint: str, model: str, ignore_eos: bool,
             temperature: float, json_schema: dict | None = None) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.output_len,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        # Not OpenAI's, but vLLM-compatible servers honour it (exact output lengths).
        body["ignore_eos"] = True
    if endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if json_schema is not None:
        # OpenAI's shape; vLLM-compatible servers take it on completions too.
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "records", "schema": json_schema}}
    return body


def _chunk_text(chunk: dict) -> str | None:
    """The text a streamed chunk carries (None for role-only or usage-only chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if "text" in choice:
        return choice["text"]
    delta = choice.get("delta") or {}
    return delta.get("content")


async def send_request(client, url: str, body: dict, prompt_len: int,
                       headers: dict[str, str]) -> RequestResult:
    """Stream one request; never raises (failures come back with success=False)."""
    result = RequestResult(success=False, prompt_len=prompt_len)
    start = time.perf_counter()
    last = start
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:300]}"
                return result
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_len = int(usage["prompt_tokens"])
                if _chunk_text(chunk) is None:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
        result.e2el = time.perf_counter() - start
        result.output_tokens = usage_tokens if usage_tokens is not None else chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "the stream carried no tokens"
    except Exception as exc:  # network errors, bad JSON: counted, reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    return result


def arrival_gaps(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma(burstiness) gaps with mean 1/rate.

    burstiness 1 is a Poisson process; below 1 is burstier, above 1 more regular.
    An infinite rate sends everything at once.
    """
    if request_rate <= 0:
        raise ValueError(f"request_rate ({request_rate}) must be positive or inf")
    if burstiness <= 0:
        raise ValueError(f"burstiness ({burstiness}) must be positive")
    if math.isinf(request_rate):
        return [0.0] * num
    rng = random.Random(seed)
    theta = 1.0 / (request_rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]


@dataclass
class ServeOptions:
    """What `bench serve` sends, where, and how fast."""

    base_url: str
    model: str
    requests: list[ServeRequest]
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    goodput: dict[str, float] = field(default_factory=dict)
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0
    progress: bool = True
    # A JSON schema every request must follow (response_format json_schema), or None.
    json_schema: dict | None = None


async def run_serve_async(opts: ServeOptions) -> dict:
    """Send every request on its arrival schedule; returns the result dictionary."""
    import httpx
    from tqdm import tqdm

    if opts.endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint {opts.endpoint!r} is not one of {', '.join(ENDPOINTS)}")
    url = opts.base_url.rstrip("/") + opts.endpoint
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    gaps = arrival_gaps(len(opts.requests), opts.request_rate, opts.burstiness, opts.seed)
    limit = asyncio.Semaphore(opts.max_concurrency or len(opts.requests))
    bar = tqdm(total=len(opts.requests), desc="requests", disable=not opts.progress, leave=False)
    limits = httpx.Limits(max_connections=opts.max_concurrency or len(opts.requests) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(opts.timeout_s), limits=limits) as client:

        async def one(req: ServeRequest) -> RequestResult:
            async with limit:
                body = _payload(req, opts.endpoint, opts.model, opts.ignore_eos, opts.temperature,
                                opts.json_schema)
                res = await send_request(client, url, body, req.prompt_len, headers)
            bar.update(1)
            return res

        tasks = []
        start = time.perf_counter()
        for req, gap in zip(opts.requests, gaps, strict=True):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return summarize_results(results, duration, opts)


def _meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot, "e2el": r.e2el}
    # A one-token answer has no TPOT; it cannot break a TPOT SLO.
    return all(not (values[k] > limit) for k, limit in slos.items())


def summarize_results(results: list[RequestResult], duration: float, opts: ServeOptions) -> dict:
    """Latency percentiles (ms), throughput and goodput of a finished run."""
    ok = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)

    def ms(values: list[float]) -> dict:
        return {k: v * 1000.0 for k, v in summarize([v for v in values if not math.isnan(v)]).items()}

    result: dict[str, Any] = {
        "base_url": opts.base_url,
        "endpoint": opts.endpoint,
        "model": opts.model,
        "num_prompts": len(results),
        "request_rate": opts.request_rate if not math.isinf(opts.request_rate) else "inf",
        "burstiness": opts.burstiness,
        "max_concurrency": opts.max_concurrency,
        "completed": len(ok),
        "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": ms([r.ttft for r in ok]),
        "tpot_ms": ms([r.tpot for r in ok]),
        "itl_ms": ms([gap for r in ok for gap in r.itl]),
        "e2el_ms": ms([r.e2el for r in ok]),
    }
    if opts.goodput:
        good = sum(_meets_slos(r, opts.goodput) for r in ok)
        result["goodput_slos_ms"] = {k: v * 1000.0 for k, v in opts.goodput.items()}
        result["good_requests"] = good
        result["goodput"] = good / duration
    return result


def run_serve(opts: ServeOptions) -> dict:
    """Synchronous wrapper of `run_serve_async`."""
    return asyncio.run(run_serve_async(opts))


def result_rows(result: dict) -> list[tuple[str, Any]]:
    """Table rows of a serve result."""
    rows: list[tuple[str, Any]] = [
        ("endpoint", result["base_url"].rstrip("/") + result["endpoint"]),
        ("request rate (req/s)", result["request_rate"]),
        ("successful requests", result["completed"]),
        ("failed requests", result["failed"]),
        ("benchmark duration (s)", result["duration_s"]),
        ("total input tokens", result["total_input_tokens"]),
        ("total output tokens", result["total_output_tokens"]),
        ("request throughput (req/s)", result["request_throughput"]),
        ("output token throughput (tok/s)", result["output_throughput"]),
        ("total token throughput (tok/s)", result["total_token_throughput"]),
    ]
    if "goodput" in result:
        rows.append(("goodput (req/s)", result["goodput"]))
    for metric, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                          ("e2el_ms", "E2E latency")):
        for stat in ("mean", "median", "p90", "p99"):
            rows.append((f"{label} {stat} (ms)", result[metric][stat]))
    return rows


def _structured_schema(args, requests: list[ServeRequest]) -> dict | None:
    """--structured-json: bench throughput's schema, unable to end before the longest output."""
    if not getattr(args, "structured_json", False):
        return None
    from backplane.benchmarks.throughput import structured_json_schema

    return structured_json_schema(max(r.output_len for r in requests))


def main(args) -> int:
    """Entry point of `backplane bench serve`."""
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.dataset:
        requests = sharegpt_prompts(args.dataset, args.num_prompts, args.seed,
                                    args.output_len_override, tokenizer)
    else:
        requests = random_prompts(args.num_prompts, args.input_len, args.output_len, args.seed,
                                  tokenizer)
    rate = math.inf if args.burst else args.request_rate
    opts = ServeOptions(
        base_url=args.base_url,
        model=args.model,
        requests=requests,
        endpoint=args.endpoint,
        request_rate=rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        goodput=parse_goodput(args.goodput),
        api_key=args.api_key,
        seed=args.seed,
        progress=not args.no_progress,
        json_schema=_structured_schema(args, requests),
    )
    result = run_serve(opts)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    print_table("backplane bench serve", result_rows(result), out=table_out)
    if result["failed"]:
        print(f"{result['failed']} requests failed; first errors: {result['errors']}",
              file=sys.stderr)
    if args.json:
        dump_json(result, args.json)
    return 0 if result["completed"] else 1

