"""Schemathesis over the server's own /openapi.json: no generated request gets a 5xx.

For each request-taking operation, Hypothesis draws bodies that fit the schema
(positive) and bodies that break it (negative), derandomized so every run sends
the same requests, and each goes to the live server over HTTP. Every answer
must be below 500, and every 4xx must carry OpenAI's error body. Afterwards the
server must serve exactly as before (see support.assert_serving_as_before).
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.reliability.support import assert_serving_as_before

OPERATIONS = [
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
]
# Per operation and generation mode; 5 operations x 2 modes x 30 = 300 requests.
MAX_EXAMPLES = 30


@pytest.fixture
def builtin_constants_only(monkeypatch):
    """Make what Hypothesis generates depend on the schema and the seed alone.

    Hypothesis also draws (in about 5% of draws) constants it finds in the local
    modules loaded so far, so the requests sent would change with every edit of
    backplane's code and with which tests ran first. This uses private names, so
    it is skipped if they are gone (generation then stays deterministic per run).
    """
    from hypothesis.internal.conjecture import providers

    if hasattr(providers, "_get_local_constants") and hasattr(providers, "CONSTANTS_CACHE"):
        empty = type(providers._local_constants)()
        monkeypatch.setattr(providers, "_get_local_constants", lambda: empty)
        monkeypatch.setattr(providers, "CONSTANTS_CACHE", type(providers.CONSTANTS_CACHE)(1024))


@pytest.fixture(scope="module")
def api_schema(server):
    with server.client() as c:
        raw = c.get("/openapi.json").json()
    return schemathesis.openapi.from_dict(raw)


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
@pytest.mark.parametrize("path", OPERATIONS)
def test_schema_fuzzing_gets_no_server_error(
    server, api_schema, greedy_reference, builtin_constants_only, path, mode
):
    operation = api_schema[path]["POST"]
    problems: list[str] = []
    statuses: dict[int, int] = {}

    with requests.Session() as session:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            # explicit examples and generation only: a failure is reported as found
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case) -> None:
            resp = case.call(
                base_url=server.url, session=session, headers=server.headers, timeout=60
            )
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if resp.status_code >= 500 or not _openai_error_if_4xx(resp):
                problems.append(
                    f"{case.method} {case.path} body={case.body!r} -> "
                    f"{resp.status_code} {resp.text[:300]}"
                )

        send()
    print(f"{path} {mode.value}: statuses {dict(sorted(statuses.items()))}")
    assert not problems, "\n".join(problems[:10])
    assert_serving_as_before(server, greedy_reference)


def _openai_error_if_4xx(resp) -> bool:
    if not 400 <= resp.status_code < 500:
        return True
    try:
        body = resp.json()
    except ValueError:
        return False
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
