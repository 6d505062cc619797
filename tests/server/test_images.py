"""Images over the OpenAI API: the official openai client sends image_url parts (data: URLs, and an
http URL served from 127.0.0.1 with that host allowed) to a live server on a tiny random Qwen3.5
image-text model, and gets transformers' greedy tokens; bad images, hosts not allowed, too many
images and video parts get a 400 naming the content part, and leave no request or block behind."""

from __future__ import annotations

import base64
import http.server
import threading

import openai
import pytest
from live_server import Server
from vision_checkpoints import IMAGE_PAD, hf_chat_reply, image_bytes, make_vision_model, random_image

from fp4serve.config import EngineConfig
from fp4serve.engine.engine import LLMEngine
from fp4serve.errors import InvalidRequestError
from fp4serve.sampling_params import SamplingParams
from fp4serve.server.options import ServerOptions

IMAGE = random_image(40, 24, 1)
OTHER = random_image(24, 32, 2)


def data_url(image, fmt="PNG") -> str:
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(image_bytes(image, fmt)).decode()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl-server")
    return path, make_vision_model(path)


@pytest.fixture(scope="module")
def files():
    """A local http server with one PNG at /cat.png."""
    body = image_bytes(IMAGE)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def live(model):
    path, _ = model
    config = EngineConfig(model=str(path), dtype="float32", max_model_len=256, kv_cache_memory="8MiB",
                          limit_mm_per_prompt={"image": 2})  # fmt: skip
    server = Server(LLMEngine(config), ["vl"], None, ServerOptions(allowed_media_domains=("127.0.0.1",)))
    yield server
    server.stop()


@pytest.fixture
def client(live):
    yield openai.OpenAI(base_url=live.url, api_key="none", max_retries=0, timeout=60)
    live.wait_idle()


def ask(client, parts, max_tokens=8):
    messages = [{"role": "user", "content": parts}]
    return client.chat.completions.create(model="vl", messages=messages, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_data_url_image_gets_transformers_tokens(client, model):
    path, hf = model
    reply = ask(client, [image_part(data_url(IMAGE)), {"type": "text", "text": "w5 w17"}])
    assert reply.choices[0].message.content == hf_chat_reply(path, hf, [IMAGE], "w5 w17", 8)
    assert reply.usage.prompt_tokens > 15  # the image's 15 tokens are counted


def test_two_images_jpeg_and_webp(client, model):
    path, hf = model
    parts = [image_part(data_url(IMAGE, "WEBP")), image_part(data_url(OTHER, "JPEG")), {"type": "text", "text": "w9"}]
    from fp4serve.multimodal.image_processor import decode_image

    decoded = [decode_image(image_bytes(IMAGE, "WEBP")), decode_image(image_bytes(OTHER, "JPEG"))]
    assert ask(client, parts).choices[0].message.content == hf_chat_reply(path, hf, decoded, "w9", 8)


def test_other_image_other_reply(client):
    a = ask(client, [image_part(data_url(IMAGE)), {"type": "text", "text": "w5 w17"}])
    b = ask(client, [image_part(data_url(OTHER)), {"type": "text", "text": "w5 w17"}])
    assert a.choices[0].message.content != b.choices[0].message.content


def test_http_url_from_an_allowed_host(client, files):
    by_url = ask(client, [image_part(f"{files}/cat.png"), {"type": "text", "text": "w5 w17"}])
    inline = ask(client, [image_part(data_url(IMAGE)), {"type": "text", "text": "w5 w17"}])
    assert by_url.choices[0].message.content == inline.choices[0].message.content


def refused(client, parts) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, parts)
    return info.value.body


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://localhost:9/cat.png", "--allowed-media-domains lists (127.0.0.1), not 'localhost'"),
        ("file:///etc/passwd", "data: (base64) or http(s) URLs"),
        ("data:image/png;base64,!!!not-base64", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"GIF89a not a png").decode(), "is not a PNG, JPEG, WEBP file"),
        ("data:text/plain;base64,aGVsbG8=", "media type 'text/plain'"),
        ("data:image/png;base64," + base64.b64encode(image_bytes(IMAGE)[:60]).decode(), "cannot be decoded"),
    ],
)
def test_bad_image_is_a_400_naming_the_part(client, url, message):
    body = refused(client, [{"type": "text", "text": "w1"}, image_part(url)])
    assert message in body["message"]
    assert body["param"] == "messages[0].content[1]"


def test_missing_file_on_an_allowed_host(client, files):
    body = refused(client, [image_part(f"{files}/nothing.png")])
    assert "HTTP 404" in body["message"] and body["param"] == "messages[0].content[0]"


def test_too_many_images(client):
    body = refused(client, [image_part(data_url(IMAGE))] * 3)
    assert "3 images in one request; --limit-mm-per-prompt allows 2" in body["message"]
    assert body["param"] == "messages[0].content[2]"


def test_video_is_refused(client):
    body = refused(client, [{"type": "video_url", "video_url": {"url": "http://127.0.0.1/v.mp4"}}])
    assert "video input is not supported" in body["message"] and body["param"] == "messages[0].content[0]"


def test_language_model_only_builds_no_tower_and_refuses_images(model):
    path, _ = model
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_model_len=128, kv_cache_memory="2MiB",
                                    language_model_only=True))  # fmt: skip
    assert engine.model.visual is None and engine.images.preprocessor is None
    assert not any(name.startswith("visual.") for name, _ in engine.model.named_parameters())
    with pytest.raises(
        InvalidRequestError, match="images are not supported by this server: the server runs with --language-model-only"
    ):
        engine.add_request({"prompt_token_ids": [1, IMAGE_PAD, 2], "multi_modal_data": {"image": IMAGE}},
                           SamplingParams(max_tokens=1))  # fmt: skip
    assert not engine.requests


def test_streamed_reply_with_an_image(client, live):
    parts = [image_part(data_url(IMAGE)), {"type": "text", "text": "w5 w17"}]
    whole = ask(client, parts)
    chunks = client.chat.completions.create(
        model="vl", messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_tokenize_refuses_images(live):
    import httpx

    body = {"model": "vl", "messages": [{"role": "user", "content": [image_part(data_url(IMAGE))]}]}
    response = httpx.post(f"{live.base}/tokenize", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[0]"
