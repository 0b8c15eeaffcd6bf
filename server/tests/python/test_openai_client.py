"""The official `openai` Python package against a running ouro server.

Run by the Rust test `the_openai_python_client_drives_the_server`, which
starts the server and sets OURO_BASE_URL and OURO_MODEL_NAME.
"""

import os

import openai
import pytest

BASE = os.environ["OURO_BASE_URL"]
MODEL = os.environ["OURO_MODEL_NAME"]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=f"{BASE}/v1", api_key="unused", max_retries=0)


def test_models_list_shows_the_served_model(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Explain why the sky is blue."}],
        max_tokens=24,
        temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert "sky" in r.choices[0].message.content.lower()
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_streamed_chat_equals_the_full_answer(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=20, temperature=0)
    full_response = client.chat.completions.create(**kwargs)
    full = full_response.choices[0].message.content
    parts, usage = [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                parts.append(c.delta.content)
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens == full_response.usage.completion_tokens


def test_completion_and_streamed_completion(client):
    full = client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=12, temperature=0)
    assert full.object == "text_completion"
    text = full.choices[0].text
    assert text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="The capital of Italy is", max_tokens=12, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == text


def test_bad_request_raises_with_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature"


def test_unknown_model_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
