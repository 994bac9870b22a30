"""`videoxl serve` against a live server on the tiny checkpoint, driven by the official `openai` client."""
import os
import shutil
import threading

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.serving_helpers import LiveServer, data_url, held_generation, messages, request, video_part  # noqa: E402
from videoxl.checkpoint.tiny import make_demo_video  # noqa: E402

FRAMES = {"max_num_frames": 8}


@pytest.fixture(scope="module")
def media(tmp_path_factory, clip_path):
    root = tmp_path_factory.mktemp("media")
    shutil.copy(clip_path, root / "clip.mp4")
    make_demo_video(str(root / "other.mp4"), seconds=4.0, size=(64, 96))
    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(os.urandom(4096))
    return root


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kv"))


@pytest.fixture(scope="module")
def server(tiny_dir, media, kv_dir):
    s = LiveServer(tiny_dir, "--allowed-local-media-path", str(media), "--kv-cache-dir", kv_dir,
                   "--allowed-media-domains", "localhost", "videos.example.com", "--max-base64-mb", "0.25",
                   "--max-queue", "4", "--devices", "cpu,cpu")
    yield s
    s.stop()


def ask(client, question, url, stream=False, **extra):
    kw = dict(model="tiny", messages=messages(question, video_part(url)), max_tokens=10, temperature=0,
              extra_body=dict(FRAMES, **extra))
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.usage
    text, usage = [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return "".join(text), usage


def test_models_health_and_answers_streamed_or_not(server, media, tiny):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert server.healthy()
    url = f"file://{media}/clip.mp4"
    text, usage = ask(client, "What happens?", url)
    model, tok = tiny  # the Python API gives the same answer
    assert text == model.chat(str(media / "clip.mp4"), tok, "What happens?", max_num_frames=8,
                              generation_config={"max_new_tokens": 10})
    assert usage.prompt_tokens > 300 and usage.completion_tokens == 10
    assert usage.prompt_tokens_details.cached_tokens == 0  # a video this server had not seen
    streamed, usage2 = ask(client, "What happens?", url, stream=True)
    assert streamed == text
    assert usage2.prompt_tokens_details.cached_tokens > 300  # the repeat reused the video's prefill
    assert usage2.prompt_tokens == usage.prompt_tokens and usage2.completion_tokens == 10
    # the same bytes as a data: URL are the same video (content hash): cached too
    again, usage3 = ask(client, "What happens?", data_url(str(media / "clip.mp4")))
    assert again == text and usage3.prompt_tokens_details.cached_tokens > 300
    # multi-turn: the video in the first user message, history after it
    r = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, extra_body=FRAMES, messages=[
        *messages("What happens?", video_part(url)), {"role": "assistant", "content": text},
        {"role": "user", "content": "And then?"}])
    assert r.choices[0].message.content == model.chat(
        str(media / "clip.mp4"), tok, "And then?", chat_history=[("What happens?", text)], max_num_frames=8,
        generation_config={"max_new_tokens": 6})
    # stop strings end the answer early
    stop = text[3:6]
    r = client.chat.completions.create(model="tiny", messages=messages("What happens?", video_part(url)),
                                       max_tokens=10, temperature=0, stop=[stop], extra_body=FRAMES)
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_frames_as_image_parts_as_lmms_eval_sends_them(server, tiny):
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(5)]

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            buf.getvalue()).decode()}}

    body = {"model": "tiny", "max_tokens": 8, "temperature": 0,  # the text first, then the frames
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What happens?"},
                                                      *map(png, frames)]}]}
    first, again = server.post(body).json(), server.post(body).json()
    model, tok = tiny
    assert first["choices"][0]["message"]["content"] == model.chat(frames, tok, "What happens?",
                                                                   generation_config={"max_new_tokens": 8})
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 300  # the same frames: the same video


def test_32_concurrent_clients_answered_or_429_never_mixed(server, media):
    client = server.client()
    cases = [(q, f"file://{media}/{v}") for v in ("clip.mp4", "other.mp4")
             for q in ("What happens?", "Describe the scene.", "How many people are in the video?")]
    alone = {c: ask(client, *c)[0] for c in cases}
    assert len(set(alone.values())) >= 3  # different questions give different answers: mixing would show
    results, lock = [], threading.Lock()

    def one(i):
        case = cases[i % len(cases)]
        try:
            got = ("ok", ask(client, *case, stream=i % 2 == 1)[0])
        except openai.RateLimitError as e:
            got = ("429", str(e))
        except Exception as e:  # recorded, and fails the test below
            got = ("error", repr(e))
        with lock:
            results.append((case, got))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 32
    assert not [r for r in results if r[1][0] == "error"]
    answered = [(case, text) for case, (kind, text) in results if kind == "ok"]
    assert answered and all(text == alone[case] for case, text in answered)
    print(f"{len(answered)} answered, {32 - len(answered)} refused with 429")
    assert server.metrics().get('videoxl_requests_total{status="429"}', 0) == 32 - len(answered)
    assert server.healthy() and ask(client, *cases[0])[0] == alone[cases[0]]


BAD = [  # (what, body or raw bytes, status, words in the message)
    ("malformed JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
    ("no video part", {"model": "tiny", "messages": [{"role": "user", "content": "Hi?"}]}, 400, "no video"),
    ("path outside the folder", request("Q?", video_part("file:///etc/passwd")), 403, "outside the allowed"),
    ("unsupported scheme", request("Q?", video_part("ftp://videos.example.com/a.mp4")), 400, "scheme 'ftp://'"),
    ("data URL over the cap", request("Q?", video_part("data:video/mp4;base64," + "A" * 400_000)), 413,
     "base64 cap"),
    ("data URL not base64", request("Q?", video_part("data:video/mp4;base64,@@@@")), 400, "not valid base64"),
    ("zero-length video", request("Q?", video_part("file://{media}/empty.mp4")), 400, "empty"),
    ("empty data URL", request("Q?", video_part("data:video/mp4;base64,")), 400, "empty"),
    ("corrupt video", request("Q?", video_part("file://{media}/corrupt.mp4")), 400, "not a readable video"),
    ("disallowed domain", request("Q?", video_part("https://evil.example.org/a.mp4")), 403, "not allowed"),
    ("loopback host", request("Q?", video_part("http://localhost:1/a.mp4")), 403, "private or loopback"),
    ("unknown uuid", request("Q?", video_part(None, uuid="never-seen")), 400, "unknown uuid"),
    ("temperature", request("Q?", video_part("file://{media}/clip.mp4"), temperature=5), 400, "temperature"),
    ("top_p", request("Q?", video_part("file://{media}/clip.mp4"), top_p=0), 400, "top_p"),
    ("max_tokens", request("Q?", video_part("file://{media}/clip.mp4"), max_tokens=0), 400, "max_tokens"),
    ("max_tokens type", request("Q?", video_part("file://{media}/clip.mp4"), max_tokens="9"), 400, "max_tokens"),
    ("frames", request("Q?", video_part("file://{media}/clip.mp4"), max_num_frames=100000), 400, "num_frames"),
    ("fps", request("Q?", video_part("file://{media}/clip.mp4"), media_io_kwargs={"video": {"fps": -1}}), 400,
     "fps"),
    ("seed", request("Q?", video_part("file://{media}/clip.mp4"), seed="x"), 400, "seed"),
    ("stop", request("Q?", video_part("file://{media}/clip.mp4"), stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("n", request("Q?", video_part("file://{media}/clip.mp4"), n=2), 400, "n must be 1"),
    ("model", request("Q?", video_part("file://{media}/clip.mp4"), model="gpt-4"), 404, "does not exist"),
    ("two videos", request("Q?", video_part("file://{media}/clip.mp4"), video_part("file://{media}/other.mp4")),
     400, "one video_url"),
    ("video in a later turn", {"model": "tiny", "messages": [
        {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [video_part("file:///x.mp4"), {"type": "text", "text": "Q?"}]}]}, 400,
     "first user message"),
    ("system message not first", {"model": "tiny", "messages": [*messages("Q?", video_part("file:///x.mp4")),
                                                               {"role": "system", "content": "Be a pirate."}]},
     400, "system message must be the first"),
]


def fill(body, media):
    if isinstance(body, bytes):
        return body
    import json

    return json.dumps(body).replace("{media}", str(media)).encode()


@pytest.mark.parametrize("what,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_in_openai_format(server, media, what, body, status, words):
    r = httpx.post(server.url + "/v1/chat/completions", content=fill(body, media),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] and "\n" not in error["message"]
    assert server.healthy()


def test_the_server_keeps_serving_after_bad_requests(server, media):
    assert server.metrics().get('videoxl_requests_total{status="500"}', 0) == 0
    text, _ = ask(server.client(), "What happens?", f"file://{media}/clip.mp4")
    assert text


def test_a_client_that_goes_away_stops_its_generation(server, media):
    before = server.metrics().get('videoxl_requests_total{status="499"}', 0)
    body = request("What happens?", video_part(f"file://{media}/clip.mp4"), max_tokens=4000, stream=True)
    with held_generation(server, after=2) as release:  # the answer cannot end before the client leaves
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 2:
                    break  # leave after a few events: closing the stream drops the connection
        release.set()
        wait_until_stopped(server, before + 1)
    # the same without streaming: the client gives up waiting
    body["stream"] = False
    with held_generation(server, after=2) as release:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=1.5))
        release.set()
        wait_until_stopped(server, before + 2)


def wait_until_stopped(server, gone):
    """The server counted `gone` requests whose client left, and the worker stopped generating (at most a few
    tokens later: the answer asked for 4000)."""
    import time

    deadline = time.time() + 20
    while True:
        m = server.metrics()
        if m.get('videoxl_requests_total{status="499"}', 0) >= gone and m["videoxl_running_requests"] == 0:
            return
        assert time.time() < deadline, f"the generation did not stop: {gone} expected, {m}"
        time.sleep(0.05)


def test_restart_answers_known_videos_from_disk_without_vision(server, tiny_dir, media, kv_dir):
    client = server.client()
    url = f"file://{media}/other.mp4"
    r = client.chat.completions.create(model="tiny", max_tokens=10, temperature=0, extra_body=FRAMES,
                                       messages=messages("Describe the scene.", video_part(url, uuid="other-1")))
    first = r.choices[0].message.content
    server.stop()  # writes what is pending to disk
    # a new process: here a new server and model on the same folder, without file:// access this time
    again = LiveServer(tiny_dir, "--kv-cache-dir", kv_dir, "--request-timeout", "3")
    try:
        c2 = again.client()
        r = c2.chat.completions.create(model="tiny", max_tokens=10, temperature=0, extra_body=FRAMES,
                                       messages=messages("Describe the scene.", video_part(None, uuid="other-1")))
        assert r.choices[0].message.content == first
        assert r.usage.prompt_tokens_details.cached_tokens > 150  # the whole video prefix (one group)
        m = again.metrics()
        assert m["videoxl_kv_cache_disk_hits"] == 1 and m["videoxl_kv_cache_vision_runs"] == 0
        # other sampling settings are not cached: a uuid alone cannot rebuild them
        r = again.post(request("Q?", video_part(None, uuid="other-1"), max_num_frames=4))
        assert r.status_code == 400 and "not cached" in r.json()["error"]["message"]
        r = again.post(request("Q?", video_part(url)))  # file:// is off on this server
        assert r.status_code == 403 and "file:// URLs are off" in r.json()["error"]["message"]
        with held_generation(again):  # held open: the 504 cannot race the machine's speed
            r = again.post(request("What happens?", video_part(None, uuid="other-1"), max_tokens=4000))
        assert r.status_code == 504 and "time limit" in r.json()["error"]["message"]  # --request-timeout 3
        assert again.healthy()
    finally:
        again.stop()


@pytest.mark.parametrize("argv,words", [
    (["--model", "/no/such/folder"], "--model must be a checkpoint folder"),
    (["--kv-cache-gb", "-1"], "--kv-cache-gb must be a number >= 0"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--allowed-local-media-path", "/no/such/folder"], "not a folder"),
    (["--chunk-prefill", "mask", "--chunk-size", "3", "--step-size", "2"], "step_size"),
])
def test_serve_option_errors_are_one_line_exit_2(tiny_dir, capsys, argv, words):
    from videoxl.cli.main import main

    args = ["serve", "--model", tiny_dir, *argv] if argv[0] != "--model" else ["serve", *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
