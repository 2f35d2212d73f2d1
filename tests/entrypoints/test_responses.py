"""/v1/responses, GET /v1/models/{id} and /ping, through the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.entrypoints.conftest import SERVED_NAME
from tests.entrypoints.server_utils import MAX_MODEL_LEN, metric, wait_until_idle

INSTRUCTIONS = "You are terse."
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
# Inputs among which the tiny model's greedy reply ends with EOS (not at the length limit).
EOS_CANDIDATES = ["in", "does.", "said", "the market opens", "settled", "king"]


def _chat(client, messages, max_tokens):
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=messages, max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0], reply.usage


def test_response_equals_greedy_chat_completion(client):
    choice, usage = _chat(client, MESSAGES, 8)
    resp = client.responses.create(
        model=SERVED_NAME,
        instructions=INSTRUCTIONS,
        input=QUESTION,
        max_output_tokens=8,
        temperature=0,
        metadata={"case": "equality"},
        user="tester",
    )
    assert resp.output_text == choice.message.content
    assert resp.object == "response" and resp.id.startswith("resp_") and resp.model == SERVED_NAME
    [message] = resp.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.content[0].type == "output_text"
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert resp.usage.total_tokens == usage.total_tokens
    expected = "incomplete" if choice.finish_reason == "length" else "completed"
    assert resp.status == message.status == expected
    assert resp.metadata == {"case": "equality"} and resp.user == "tester"
    assert resp.instructions == INSTRUCTIONS and resp.max_output_tokens == 8
    assert resp.temperature == 0 and resp.tools == [] and resp.text.format.type == "text"
    # the same conversation as a list of items, content as input_text parts
    listed = client.responses.create(
        model=SERVED_NAME,
        input=[
            {"role": "developer", "content": INSTRUCTIONS},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": QUESTION}],
            },
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert listed.output_text == choice.message.content


def test_plain_create_and_neutral_fields(client):
    resp = client.responses.create(model=SERVED_NAME, input="Hello")
    assert resp.status in ("completed", "incomplete") and resp.usage.output_tokens >= 1
    assert resp.usage.input_tokens + resp.usage.output_tokens <= MAX_MODEL_LEN
    # fields given their "nothing to do" value are accepted
    again = client.responses.create(
        model=SERVED_NAME,
        input="Hello",
        max_output_tokens=2,
        store=False,
        tools=[],
        tool_choice="none",
        text={"format": {"type": "text"}},
        truncation="disabled",
    )
    assert again.usage.output_tokens <= 2 and again.tool_choice == "none"


def test_max_output_tokens_gives_incomplete(client):
    resp = client.responses.create(
        model=SERVED_NAME, input="Tell me a story", max_output_tokens=3, temperature=0
    )
    assert resp.status == "incomplete" and resp.output[0].status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage.output_tokens == 3 and resp.completed_at is None
    events = list(
        client.responses.create(
            model=SERVED_NAME,
            input="Tell me a story",
            max_output_tokens=3,
            temperature=0,
            stream=True,
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == resp.output_text
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_streaming_events_in_order(client):
    for text in EOS_CANDIDATES:
        messages = [{"role": "user", "content": text}]
        choice, _ = _chat(client, messages, 60)
        if choice.finish_reason == "stop":
            break
    else:
        pytest.fail("no candidate input ends with EOS within 60 tokens")
    events = list(
        client.responses.create(
            model=SERVED_NAME, input=text, max_output_tokens=60, temperature=0, stream=True
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert done.status == "completed" and done.incomplete_details is None
    assert deltas == done.output_text == events[-4].text == choice.message.content
    assert done.usage.output_tokens >= 1 and done.completed_at is not None
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {done.output[0].id}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"text": {"format": {"type": "json_object"}}}, "text"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input",
        ),
        ({"input": []}, "input"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": MAX_MODEL_LEN}, "max_output_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"priority": 2**64}, "priority"),
    ],
)
def test_unsupported_or_invalid_fields_are_400(server, body, param):
    with server.client() as c:
        resp = c.post("/v1/responses", json={"input": "hi", **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"]
    assert err["type"] == "invalid_request_error"


def test_too_long_input_is_400_naming_input(server):
    with server.client() as c:
        resp = c.post("/v1/responses", json={"input": "hello " * MAX_MODEL_LEN})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


def test_unsupported_field_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=SERVED_NAME, input="hi", previous_response_id="resp_1")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-9", input="hi")


def _aborts(metrics_text: str) -> float:
    try:
        return metric(metrics_text, "backplane:request_success_total", finished_reason="abort")
    except KeyError:  # nothing aborted yet
        return 0.0


def test_streaming_disconnect_aborts(server, monkeypatch):
    real_step = server.engine.engine.step
    monkeypatch.setattr(server.engine.engine, "step", lambda: time.sleep(0.02) or real_step())
    with server.client() as c:
        aborts = _aborts(c.get("/metrics").text)
        with c.stream("POST", "/v1/responses", json={"input": "hi", "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(lines) == "event: response.created"
            while next(lines) != "event: response.output_text.delta":
                pass
            assert server.engine.get_stats().num_running == 1
        # leaving the block closes the connection mid-stream
    text = wait_until_idle(server)
    assert metric(text, "backplane:kv_cache_usage_perc") == 0
    assert _aborts(text) == aborts + 1
    assert server.engine.num_unfinished_requests == 0


def test_models_retrieve(client, server):
    card = client.models.retrieve(SERVED_NAME)
    assert card.id == SERVED_NAME and card.object == "model"
    assert card.max_model_len == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    with server.client() as c:
        err = c.get("/v1/models/org/gpt-9").json()["error"]
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_ping_without_key(server, monkeypatch):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/ping").status_code == 200
        assert c.post("/ping").status_code == 200

        def dead():
            raise RuntimeError("engine loop died")

        monkeypatch.setattr(server.engine, "check_health", dead)
        resp = c.get("/ping")
    assert resp.status_code == 503 and "died" in resp.json()["error"]["message"]
