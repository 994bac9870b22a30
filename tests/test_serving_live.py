"""Live sessions over HTTP (videoxl/serving/live.py) against a running server on the tiny checkpoint: create,
append images or a video segment, status, questions through the `openai` client with `session://ID`, delete;
the caps and every refusal as a 4xx in OpenAI's error shape."""
import base64
import io
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("openai")

from tests.serving_helpers import LiveServer, messages, video_part  # noqa: E402
from tests.test_live import GEN, frames, write_ts  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_dir):
    s = LiveServer(tiny_dir, "--live-max-sessions", "2", "--live-max-frames", "16")
    yield s
    s.stop()


def png(a) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def call(server, method, path, body=None) -> httpx.Response:
    return httpx.request(method, server.url + path, json=body, timeout=120)


def ask(server, sid, question="What moves?", **kw):
    r = server.client().chat.completions.create(model="tiny", messages=messages(question, video_part(
        f"session://{sid}")), max_tokens=GEN["max_new_tokens"], temperature=0, **kw)
    return r.choices[0].message.content


def test_a_session_from_create_to_delete(server, tiny, tmp_path):
    model, tok = tiny
    video = frames(8)
    r = call(server, "POST", "/v1/live/sessions", {"sample_fps": 1})
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    assert r.json()["url"] == f"session://{sid}" and r.json()["frames"] == 0
    r = call(server, "POST", f"/v1/live/sessions/{sid}/frames", {"images": [png(f) for f in video[:6]]})
    assert r.status_code == 200 and r.json()["groups_added"] == 1 and r.json()["frames_pending"] == 2
    call(server, "POST", f"/v1/live/sessions/{sid}/frames", {"images": [png(f) for f in video[6:]]})
    assert ask(server, sid) == model.chat(list(video), tok, "What moves?", generation_config=GEN)
    # a video segment: its frames continue after the session's last (4 s at 10 fps, sampled at 1 fps)
    path = tmp_path / "seg.ts"
    write_ts(path, 0, 40)
    r = call(server, "POST", f"/v1/live/sessions/{sid}/frames",
             {"video": base64.b64encode(path.read_bytes()).decode()})
    assert r.status_code == 200, r.text
    assert r.json()["frames_received"] == 40 and r.json()["frames_sampled"] == 4
    status = call(server, "GET", f"/v1/live/sessions/{sid}").json()
    assert status["frames"] == 12 and status["covered_s"] == [0.0, 11.0]
    assert ask(server, sid)
    assert call(server, "DELETE", f"/v1/live/sessions/{sid}").json()["deleted"] is True
    assert call(server, "GET", f"/v1/live/sessions/{sid}").status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"sample_fps": 0}, 400, "sample_fps must be a positive number"),
    ({"fps": 1}, 400, "keys among"),
    ({"prefill_config": {"chunk_size": 3, "step_size": 2}}, 400, "step_size (2) must divide"),
    ({"max_frames": 100}, 413, "over the server's cap of 16"),
])
def test_bad_session_settings(server, body, status, words):
    r = call(server, "POST", "/v1/live/sessions", body)
    assert r.status_code == status and words in r.json()["error"]["message"], r.text


def test_refusals_are_4xx(server):
    sid = call(server, "POST", "/v1/live/sessions").json()["id"]
    try:
        for body, status, words in (
                ({"images": ["not base64!"]}, 400, "not valid base64"),
                ({"images": [base64.b64encode(b"hello").decode()]}, 400, "not an image"),
                ({"images": [], "video": "x"}, 400, "give {"),
                ({"video": base64.b64encode(b"\0" * 100).decode()}, 400, "cannot open live source"),
                ({"images": [png(frames(1)[0])], "timestamps": [1, 2]}, 400, "1 frames but 2 timestamps"),
                ({"images": [png(f) for f in frames(17)]}, 413, "limit of 16 (max_frames)")):
            r = call(server, "POST", f"/v1/live/sessions/{sid}/frames", body)
            assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": messages("q", video_part(f"session://{sid}"))})
        assert r.status_code == 400 and "nothing to ask about yet" in r.json()["error"]["message"]
        other = call(server, "POST", "/v1/live/sessions").json()["id"]
        r = call(server, "POST", "/v1/live/sessions")
        assert r.status_code == 429 and "cap" in r.json()["error"]["message"]
        call(server, "DELETE", f"/v1/live/sessions/{other}")
    finally:
        call(server, "DELETE", f"/v1/live/sessions/{sid}")
    for method, path in (("GET", "/v1/live/sessions/nope"), ("DELETE", "/v1/live/sessions/nope"),
                         ("POST", "/v1/live/sessions/nope/frames")):
        r = call(server, method, path, {"images": [png(frames(1)[0])]})
        assert r.status_code == 404 and "no live session 'nope'" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": messages("q", video_part("session://nope"))})
    assert r.status_code == 404
    assert server.healthy()


def test_idle_sessions_are_closed(server):
    sid = call(server, "POST", "/v1/live/sessions").json()["id"]
    live = server.app.state.live
    idle, live.limits.idle_s = live.limits.idle_s, 0.2
    try:
        time.sleep(0.3)
        r = call(server, "GET", f"/v1/live/sessions/{sid}")
        assert r.status_code == 404 and "idle" in r.json()["error"]["message"]
        assert sid not in live.sessions
    finally:
        live.limits.idle_s = idle
