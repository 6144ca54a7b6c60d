"""`python -m llava_san.serve`: the real server (uvicorn) over a real short training run, called over
real HTTP. Its answers equal `Assistant.answer` of an independently loaded model on the same
conversation; every bad request is a 4xx with an OpenAI-style error naming what is wrong, and the
server answers good requests afterwards."""
import base64
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llava_san.inference import Assistant, Turn

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 12  # answer length in these tests: long enough to end by "stop" or "length"
LIMIT = 64  # the server's --max-new-tokens-limit here


def _require(module: str):
    """A module of the ``serve``/``dev`` extras: skips these tests on a machine without it, fails on CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is not installed: pip install -e '.[dev]'", allow_module_level=True)


httpx = _require("httpx")
_require("fastapi")
_require("uvicorn")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def image(image_file):
    from llava_san.data.images import load_image

    return load_image(str(image_file))


@pytest.fixture(scope="module")
def data_url(image_file):
    return "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()


@pytest.fixture(scope="module")
def reference(trained_run):
    """The same run loaded on its own: what the server's answers must equal."""
    return Assistant.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def server(trained_run):
    from llava_san.serve import Engine, create_app
    from llava_san.serve.server import ServerThread

    engine = Engine(Assistant.load(trained_run, device="cpu"), max_new_tokens_limit=LIMIT)
    with ServerThread(create_app(engine)) as running:
        running.model_id = engine.model_id
        running.context_length = engine.context_length
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def _user(text, url=None):
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def _expected(reference, turns, image, max_new=MAX_NEW):
    """``(text, completion tokens, finish_reason)`` of the reference model."""
    from llava_san.generation import stream_tokens

    tok = reference.tokenizer
    ids = list(stream_tokens(reference.model, reference.encode(turns, image, max_new),
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    text = reference.answer(turns, image, max_new)
    return text, len(ids), "length" if len(ids) == max_new else "stop"


def _error(response, status, *needles):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    for needle in needles:
        assert needle in err["message"], err["message"]
    return err


# ------------------------------------------------------------------------------ answers
def test_models_lists_the_one_model(client, server):
    listed = client.get("/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [server.model_id] == ["run"]
    assert listed["data"][0]["object"] == "model"
    assert client.get(f"/v1/models/{server.model_id}").json()["id"] == server.model_id
    _error(client.get("/v1/models/gpt-4o"), 404, "gpt-4o", repr(server.model_id))


def test_data_url_image_answer_equals_assistant(client, server, reference, image, data_url):
    question = "What shape is in the image?"
    text, n_tokens, finish = _expected(reference, [Turn("user", question)], image)
    assert text, "the trained run should answer something for this comparison to mean anything"
    r = client.post("/v1/chat/completions", json={
        "model": server.model_id, "messages": [_user(question, data_url)], "max_tokens": MAX_NEW})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == server.model_id
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == finish
    prompt = reference.prompt_tokens([Turn("user", question)], image)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": n_tokens,
                             "total_tokens": prompt + n_tokens}


def test_finish_reason_length_and_stop(client, reference, image, data_url):
    question = "What color is it?"
    full, n_full, finish_full = _expected(reference, [Turn("user", question)], image, LIMIT)
    assert full  # so its first token is not the end of the answer
    # cut by the limit
    cut = client.post("/v1/chat/completions", json={"messages": [_user(question, data_url)],
                                                    "max_completion_tokens": 1}).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 1
    assert full.startswith(cut["choices"][0]["message"]["content"])
    # no max_tokens: the answer may use what the context and the server's limit leave
    whole = client.post("/v1/chat/completions", json={"messages": [_user(question, data_url)]}).json()
    assert whole["choices"][0]["message"]["content"] == full
    assert whole["choices"][0]["finish_reason"] == finish_full
    assert whole["usage"]["completion_tokens"] == n_full


def test_local_path_and_file_url_equal_data_url(client, reference, image, image_file):
    question = "Describe the image."
    text, _, _ = _expected(reference, [Turn("user", question)], image)
    for url in (str(image_file), image_file.as_uri()):
        r = client.post("/v1/chat/completions",
                        json={"messages": [_user(question, url)], "max_tokens": MAX_NEW})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == text, url


def _stream(client, body):
    """The ``data:`` payloads of a streamed completion, in order (``[DONE]`` as the string)."""
    out = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line
    return out


def test_stream_joins_to_the_answer_and_ends_with_done(client, server, reference, image, data_url):
    question = "What is in the picture?"
    text, n_tokens, finish = _expected(reference, [Turn("user", question)], image)
    events = _stream(client, {"messages": [_user(question, data_url)], "max_tokens": MAX_NEW,
                              "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == server.model_id for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == n_tokens
    last = chunks[-2]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == finish
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2]]
    assert all(pieces) and len(pieces) > 1
    assert "".join(pieces) == text


def test_two_turns_equal_assistant(client, reference, image, data_url):
    first = "What shape is it?"
    answer1 = reference.answer([Turn("user", first)], image, MAX_NEW)
    turns = [Turn("user", first), Turn("assistant", answer1), Turn("user", "And its color?")]
    text, _, _ = _expected(reference, turns, image)
    messages = [_user(first, data_url), {"role": "assistant", "content": answer1},
                {"role": "user", "content": "And its color?"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": MAX_NEW})
    assert r.json()["choices"][0]["message"]["content"] == text
    # the image attached to the second question is still seen in front of the first (LLaVA-1.5)
    moved = [_user(first), messages[1], _user("And its color?", data_url)]
    r = client.post("/v1/chat/completions", json={"messages": moved, "max_tokens": MAX_NEW})
    assert r.json()["choices"][0]["message"]["content"] == text


def test_text_only_and_the_templates_own_system_prompt(client, reference, server):
    from llava_san.conversation import VICUNA_V1_SYSTEM

    text, _, _ = _expected(reference, [Turn("user", "Hello")], None)
    for messages in ([{"role": "user", "content": "Hello"}],
                     [{"role": "system", "content": VICUNA_V1_SYSTEM}, {"role": "user", "content": "Hello"}]):
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": MAX_NEW,
                                                      "temperature": 0.7, "top_p": 0.9})
        assert r.json()["choices"][0]["message"]["content"] == text


def test_concurrent_requests_are_answered_one_at_a_time(client, reference, image, data_url):
    """Requests arriving together queue for the one model and each gets its own answer."""
    questions = ["What shape?", "What color?", "Is it big?", "Where is it?"]
    expected = [reference.answer([Turn("user", q)], image, MAX_NEW) for q in questions]

    def ask(q):
        r = client.post("/v1/chat/completions",
                        json={"messages": [_user(q, data_url)], "max_tokens": MAX_NEW})
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(ask, questions)) == expected


def test_a_client_leaving_a_stream_frees_the_model(client, reference, image, data_url):
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [_user("What is it?", data_url)], "max_tokens": LIMIT, "stream": True}) as r:
        next(r.iter_lines())  # the first chunk, then hang up
    text = reference.answer([Turn("user", "What shape?")], image, MAX_NEW)
    r = client.post("/v1/chat/completions", json={"messages": [_user("What shape?", data_url)],
                                                  "max_tokens": MAX_NEW})
    assert r.json()["choices"][0]["message"]["content"] == text


# ------------------------------------------------------------------------------ bad requests
def _bad_cases(tmp_dir, data_url):
    """``(id, body or raw bytes, status, needles)`` of requests that must be refused."""
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n but not really").decode()
    truncated = "data:image/png;base64," + data_url.split(",", 1)[1][:200]
    long_text = "word " * 2100
    user = {"role": "user", "content": "Hi"}
    return [
        ("malformed-json", b'{"messages": [', 400, ["not valid JSON"]),
        ("not-an-object", [user], 400, ["JSON object"]),
        ("unknown-model", {"model": "gpt-4o", "messages": [user]}, 404, ["'gpt-4o'", "'run'"]),
        ("no-messages", {"messages": []}, 400, ["'messages'"]),
        ("messages-missing", {"model": "run"}, 400, ["'messages'"]),
        ("bad-role", {"messages": [{"role": "tool", "content": "x"}]}, 400, ["messages[0].role", "'tool'"]),
        ("not-alternating", {"messages": [user, user]}, 400, ["messages[1].role", "alternate"]),
        ("starts-with-assistant", {"messages": [{"role": "assistant", "content": "x"}, user]}, 400,
         ["messages[0].role"]),
        ("ends-with-assistant", {"messages": [user, {"role": "assistant", "content": "x"}]}, 400,
         ["last message"]),
        ("content-not-text", {"messages": [{"role": "user", "content": 3}]}, 400, ["messages[0].content"]),
        ("unknown-part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
         ["messages[0].content[0]", "input_audio"]),
        ("placeholder-in-text", {"messages": [{"role": "user", "content": "<image> hi"}]}, 400, ["<image>"]),
        ("corrupt-image", {"messages": [_user("Hi", corrupt)]}, 400,
         ["messages[0].content[1]", "cannot read image"]),
        ("truncated-image", {"messages": [_user("Hi", truncated)]}, 400, ["cannot read image"]),
        ("not-base64", {"messages": [_user("Hi", "data:image/png;base64,@@@not base64@@@")]}, 400,
         ["base64"]),
        ("missing-path", {"messages": [_user("Hi", str(tmp_dir / "nope.png"))]}, 400,
         ["image file not found", "nope.png"]),
        ("missing-file-url", {"messages": [_user("Hi", (tmp_dir / "nope.png").as_uri())]}, 400,
         ["image file not found"]),
        ("remote-url", {"messages": [_user("Hi", "https://example.com/cat.png")]}, 400,
         ["'https'", "data URL"]),
        ("two-images", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "image_url", "image_url": {"url": data_url}}]}]}, 400, ["at most one image", "got 2"]),
        ("two-images-two-turns", {"messages": [_user("a", data_url), {"role": "assistant", "content": "b"},
                                               _user("c", data_url)]}, 400, ["at most one image"]),
        ("image-in-assistant", {"messages": [user, {"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}]}, user]}, 400, ["assistant message"]),
        ("other-system-prompt", {"messages": [{"role": "system", "content": "You are a pirate."}, user]}, 400,
         ["system messages are not supported"]),
        ("max-tokens-over-limit", {"messages": [user], "max_tokens": LIMIT + 1}, 400,
         [str(LIMIT + 1), f"limit of {LIMIT}"]),
        ("max-tokens-zero", {"messages": [user], "max_completion_tokens": 0}, 400, ["at least 1"]),
        ("max-tokens-not-int", {"messages": [user], "max_tokens": "12"}, 400, ["integer"]),
        ("max-tokens-disagree", {"messages": [user], "max_tokens": 3, "max_completion_tokens": 4}, 400,
         ["disagree"]),
        ("prompt-over-context", {"messages": [{"role": "user", "content": long_text}], "max_tokens": 4}, 400,
         ["maximum context length is 2048"]),
        ("prompt-and-answer-over-context", {"messages": [{"role": "user", "content": "word " * 1990}],
                                            "max_tokens": LIMIT}, 400,
         ["maximum context length is 2048", f"{LIMIT} in the completion"]),
        ("prompt-over-context-no-max", {"messages": [{"role": "user", "content": long_text}]}, 400,
         ["maximum context length"]),
        ("prompt-over-context-stream", {"messages": [{"role": "user", "content": long_text}],
                                        "stream": True}, 400, ["maximum context length"]),
        ("n-2", {"messages": [user], "n": 2}, 400, ["'n'"]),
        ("stop", {"messages": [user], "stop": ["\n"]}, 400, ["'stop'"]),
        ("stream-not-bool", {"messages": [user], "stream": "yes"}, 400, ["'stream'"]),
    ]


def test_bad_requests_are_4xx_with_a_message_and_the_server_goes_on(client, reference, tmp_path, data_url,
                                                                    image):
    for name, body, status, needles in _bad_cases(tmp_path, data_url):
        if isinstance(body, bytes):
            r = client.post("/v1/chat/completions", content=body,
                            headers={"Content-Type": "application/json"})
        else:
            r = client.post("/v1/chat/completions", json=body)
        try:
            _error(r, status, *needles)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from None
    _error(client.get("/v1/nothing-here"), 404, "/v1/nothing-here")
    _error(client.get("/v1/chat/completions"), 405)
    # the server still answers
    text = reference.answer([Turn("user", "What shape?")], image, MAX_NEW)
    r = client.post("/v1/chat/completions", json={"messages": [_user("What shape?", data_url)],
                                                  "max_tokens": MAX_NEW})
    assert r.json()["choices"][0]["message"]["content"] == text


def test_the_page_and_its_script_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script = client.get("/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert 'src="app.js"' in page.text and "http" not in page.text.split("<body>")[1]  # nothing from a CDN


# ------------------------------------------------------------------------------ clients and the command line
def test_openai_client(server, reference, image, data_url):
    openai = pytest.importorskip("openai",
                                 reason="the openai client is not installed: pip install -e '.[dev]'")
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    text = reference.answer([Turn("user", "What shape?")], image, MAX_NEW)
    messages = [_user("What shape?", data_url)]
    out = oa.chat.completions.create(model=server.model_id, messages=messages, max_tokens=MAX_NEW)
    assert out.choices[0].message.content == text
    stream = oa.chat.completions.create(model=server.model_id, messages=messages, max_tokens=MAX_NEW,
                                        stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oa.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError, match="at most one image"):
        oa.chat.completions.create(model=server.model_id, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}] * 2}])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_line_serves_a_merged_folder(trained_run, tmp_path):
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "llava_san.serve", str(trained_run / "merged"), "--port", str(port),
           "--model-id", "tiny-san", "--device", "cpu", "--max-new-tokens-limit", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.25)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny-san"]
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny-san", "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
        _error(httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 9}), 400, "limit of 8")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_command_line_refuses_a_bad_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llava_san.serve", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava_san.serve: error: cannot load"), r.stderr
    assert "nope" in lines[0]
