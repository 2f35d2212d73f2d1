"""Bad requests get the right status and an OpenAI error body; the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import API_KEY, MAX_MODEL_LEN


def _post(server, path, json=None, content=None, headers=None):
    hdrs = dict(server.headers) if headers is None else headers
    with httpx.Client(base_url=server.url, timeout=30) as c:
        if content is not None:
            hdrs["content-type"] = "application/json"
            return c.post(path, content=content, headers=hdrs)
        return c.post(path, json=json, headers=hdrs)


def _error(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"max_tokens": 4}, "prompt", ["prompt", "required"]),
        ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", ["max_tokens", "integer"]),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens", ["max_tokens", ">= 1", "-3"]),
        ({"prompt": "hi", "temperature": -1}, "temperature", ["temperature", "in [0,", "-1"]),
        ({"prompt": "hi", "top_p": 1.5}, "top_p", ["top_p"]),
        ({"prompt": "hi", "n": 0}, "n", ["n", "greater than or equal to 1"]),
        ({"prompt": "hi", "logprobs": 99}, "logprobs", ["logprobs", "20"]),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias", ["logit_bias"]),
        ({"prompt": [1, 2, 100000]}, "prompt", ["100000", "vocabulary"]),
        ({"prompt": []}, "prompt", ["empty"]),
        ({"prompt": "hi", "suffix": "!"}, "suffix", ["suffix"]),
    ],
)
def test_invalid_completion_params_are_400(server, body, param, words):
    err = _error(_post(server, "/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    for w in words:
        assert w in err["message"], err["message"]


def test_length_limits_name_the_numbers(server):
    long_prompt = list(range(10, 10 + MAX_MODEL_LEN))
    err = _error(_post(server, "/v1/completions", json={"prompt": long_prompt}), 400)
    assert f"prompt ({MAX_MODEL_LEN} tokens)" in err["message"]
    assert f"max_model_len is {MAX_MODEL_LEN}" in err["message"]
    err = _error(
        _post(server, "/v1/completions", json={"prompt": [5] * 100, "max_tokens": 50}), 400
    )
    assert (
        "max_tokens (50) + prompt (100 tokens) = 150 exceeds max_model_len (128)" in err["message"]
    )
    err = _error(
        _post(
            server,
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "max_completion_tokens": 500,
            },
        ),
        400,
    )
    assert (
        err["param"] == "max_completion_tokens" and "exceeds max_model_len (128)" in err["message"]
    )


def test_chat_validation(server):
    err = _error(_post(server, "/v1/chat/completions", json={"max_tokens": 3}), 400)
    assert err["param"] == "messages" and "required" in err["message"]
    err = _error(_post(server, "/v1/chat/completions", json={"messages": []}), 400)
    assert err["param"] == "messages"
    err = _error(
        _post(
            server,
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "hi"}],
                "top_logprobs": 2,
            },
        ),
        400,
    )
    assert err["param"] == "top_logprobs"


def test_invalid_json_is_400(server):
    err = _error(_post(server, "/v1/completions", content=b'{"prompt": "hi", '), 400)
    assert "not valid JSON" in err["message"]
    err = _error(_post(server, "/v1/completions", content=b"[1, 2]"), 400)
    assert "invalid request" in err["message"]


def test_unknown_model_is_404(server, client):
    err = _error(_post(server, "/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["param"] == "model" and "gpt-9" in err["message"] and SERVED_NAME in err["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert _error(_post(server, "/v1/nothing-here", json={}), 404)["type"] == "not_found_error"


def test_api_key_required_except_health(server):
    body = {"prompt": "hi", "max_tokens": 2}
    err = _error(_post(server, "/v1/completions", json=body, headers={}), 401)
    assert err["code"] == "invalid_api_key" and "missing" in err["message"]
    bad = {"Authorization": "Bearer wrong"}
    assert _error(_post(server, "/v1/completions", json=body, headers=bad), 401)["message"] == (
        "invalid API key"
    )
    # the key is checked before the body is parsed
    _error(_post(server, "/v1/completions", content=b"{oops", headers={}), 401)
    with httpx.Client(base_url=server.url) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert (
            c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        )
    bad_client = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


def test_bad_requests_do_not_disturb_others(server):
    """Good streams run while bad requests arrive; all good ones finish intact."""

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as c:

            async def good(i):
                text = []
                async with c.stream(
                    "POST",
                    "/v1/completions",
                    json={
                        "prompt": f"Hello {i}",
                        "max_tokens": 12,
                        "temperature": 0,
                        "stream": True,
                        "ignore_eos": True,
                    },
                ) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            text.append(json.loads(line[6:])["choices"][0]["text"])
                return "".join(text)

            async def bad(i):
                resp = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": -i - 1})
                return resp.status_code

            results = await asyncio.gather(
                *[good(i) for i in range(4)], *[bad(i) for i in range(4)]
            )
            return results

    results = asyncio.run(main())
    assert results[4:] == [400] * 4
    with server.client() as c:
        for i in range(4):
            alone = c.post(
                "/v1/completions",
                json={
                    "prompt": f"Hello {i}",
                    "max_tokens": 12,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            assert alone.status_code == 200
            assert alone.json()["choices"][0]["text"] == results[i]
