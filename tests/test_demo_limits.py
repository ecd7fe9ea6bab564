"""The web demo's input limits, on its handlers and its request guard (no server, no browser; fast).

Text too long or not valid Unicode, decompression-bomb images, formats beyond the common ones, images whose
header lies about a body that cannot be decoded, the model's own token limit, foreign Host/Origin headers
and oversized request bodies: each gets one sentence (an `InputError`, which the app shows as a `gr.Error`,
or a 4xx from `RequestGuard`), and none costs more than a moment. tests/test_demo.py drives the same
limits through the real server.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_demo_limits.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from mmdlm.demo import guard as demo_guard
from mmdlm.demo import handlers as demo_handlers
from mmdlm.demo import limits as demo_limits
from mmdlm.inputs import InputError
from mmdlm.pipeline import MMDLMPipeline


@pytest.fixture(scope="module")
def handlers(tiny_model_dir: str) -> demo_handlers.Demo:
    return demo_handlers.Demo(MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu"))


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def png_bytes(image: Image.Image, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_args)
    return buf.getvalue()


def sized_jpeg(width: int, height: int) -> bytes:
    """A real 8x8 JPEG whose header (SOF0) claims `width` x `height`: what PIL's lazy open reports."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5: sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def sized_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` but whose pixel data is garbage: only a decoder notices."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17: ihdr + 21] = zlib.crc32(bytes(data[ihdr: ihdr + 17])).to_bytes(4, "big")
    idat = data.index(b"IDAT")
    data[idat + 4: idat + 8] = b"\x00\x01\x02\x03"  # no decoder can read this: a size error proves none ran
    return bytes(data)


# ---- text: length before tokenizing, valid Unicode ----------------------------------------------------------
def test_huge_text_is_rejected_before_tokenizing(handlers):
    prompt = "a red circle " * (8 * 2**20 // 13)  # ~8 MiB (tokenizing it took 13 s and 2 GB)
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        next(handlers.text_to_image(prompt))
    assert str(err.value) == f"the prompt is {len(prompt)} characters long; the demo accepts at most 1000"
    assert time.perf_counter() - start < 1.0
    with pytest.raises(InputError, match="the question is 1001 characters long"):
        handlers.answer(Image.new("RGB", (8, 8)), "a" * 1001)


def test_text_at_the_character_limit_reaches_the_token_check(handlers):
    with pytest.raises(ValueError, match="longer than the model's limit"):
        next(handlers.text_to_image("a" * demo_limits.MAX_TEXT_CHARS))


@pytest.mark.parametrize("text, message", [
    ("a red \ud800 circle", "the prompt is not valid UTF-8 text (character 7 is the lone surrogate U+D800)"),
    ("\udfffwhat?", "the prompt is not valid UTF-8 text (character 1 is the lone surrogate U+DFFF)"),
    ("   ", "the prompt is empty"),
    (None, "the prompt is empty"),
    (12, "the prompt must be text, got int"),
])
def test_text_that_is_not_valid_unicode_is_refused(text, message):
    with pytest.raises(InputError) as err:
        demo_limits.check_text(text, "prompt")
    assert str(err.value) == message


@pytest.mark.parametrize("value, message", [
    (0, "steps must be between 1 and 64, got 0"),
    (65, "steps must be between 1 and 64, got 65"),
    (2.5, "steps must be a whole number, got 2.5"),
    ("many", "steps must be a number, got 'many'"),
    (None, "steps must be a number, got NoneType"),
    (True, "steps must be a number, got bool"),
    (float("nan"), "steps must be a number, got float"),
])
def test_controls_out_of_range_are_refused(value, message):
    with pytest.raises(InputError) as err:
        demo_limits.check_number(value, "steps", 1, 64, integer=True)
    assert str(err.value) == message


def test_controls_map_to_the_sampler():
    from mmdlm.pipeline import DEFAULT_SAMPLERS
    from mmdlm.sampling import SelfCorrection

    config = demo_handlers.sampler_config("text_to_image", 8, 0.5, 0.9, True, 3)
    assert config == dataclasses.replace(DEFAULT_SAMPLERS["text_to_image"], steps=8, temperature=0.5, threshold=0.9,
                             guidance_scale=3, self_correction=SelfCorrection())
    config = demo_handlers.sampler_config("caption", 8.0, 0, 0, False, block_length=None)  # threshold 0: the schedule
    assert config == dataclasses.replace(DEFAULT_SAMPLERS["caption"], steps=8, temperature=0, block_length=None,
                                         threshold=None)


# ---- images: size from the header, common formats ---------------------------------------------------------
def test_100_megapixel_png_is_rejected_without_decoding(tmp_path):
    data = png_bytes(Image.new("1", (10_000, 10_000)), optimize=True)  # ~12 KB; decoded: +300 MB as RGB
    assert len(data) < 50_000
    start = time.perf_counter()
    with pytest.raises(demo_limits.TooLarge) as err:
        demo_limits.open_image({"path": write(tmp_path, "big.png", data)})
    assert str(err.value) == ("the image is 10000 x 10000 = 100000000 pixels; the demo accepts at most 16777216 "
                              "(4096 x 4096)")
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("data, message", [
    (sized_png(5000, 5000), "the image is 5000 x 5000 = 25000000 pixels; the demo accepts at most"),
    (sized_jpeg(8000, 6000), "the image is 8000 x 6000 = 48000000 pixels; the demo accepts at most"),
    (sized_png(20_000, 20_000), "the image has 400000000 pixels; the demo accepts at most 16777216"),  # PIL's
])
def test_header_size_decides_before_any_decoder_runs(tmp_path, data, message):
    """The pixel data behind these headers is unreadable: a size error (not a decode error) shows it was
    never decoded."""
    with pytest.raises(demo_limits.TooLarge) as err:
        demo_limits.open_image(write(tmp_path, "x.img", data))
    assert str(err.value).startswith(message)


def test_an_image_under_the_limit_with_a_corrupt_body_is_refused(tmp_path):
    with pytest.raises(InputError, match="^the image is not a readable image: "):
        demo_limits.open_image(write(tmp_path, "x.png", sized_png(64, 64)))


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO"])
def test_formats_beyond_the_common_ones_are_not_opened(tmp_path, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format=fmt)
    with pytest.raises(InputError) as err:
        demo_limits.open_image(write(tmp_path, "x", buf.getvalue()))
    assert str(err.value) == "the image is not a readable image (the demo reads PNG, JPEG, GIF, BMP, WEBP)"


@pytest.mark.parametrize("value, message", [
    (None, "there is no image: upload one first"),
    ({}, "there is no image: upload one first"),
    (42, "the image must be an uploaded file, got int"),
])
def test_a_missing_image_is_one_sentence(value, message):
    with pytest.raises(InputError) as err:
        demo_limits.open_image(value)
    assert str(err.value) == message


def test_the_handlers_check_images_the_same_way(handlers, tmp_path):
    big = write(tmp_path, "big.png", png_bytes(Image.new("1", (10_000, 10_000)), optimize=True))
    for call in (lambda: handlers.caption(big), lambda: handlers.answer({"path": big}, "what shape?"),
                 lambda: handlers.inpaint_canvas(big)):
        with pytest.raises(demo_limits.TooLarge, match="10000 x 10000"):
            call()


# ---- who may call, and how much ----------------------------------------------------------------------------
NAMES, ANY_IP = demo_guard.allowed_names("127.0.0.1", ["Demo.LAN"])


@pytest.mark.parametrize("host, origin, message", [
    ("evil.example", None, "the Host header 'evil.example' does not name this server; start the demo with "
                           "--allow-host evil.example if you reach it by that name"),
    ("evil.example:7860", "http://evil.example:7860", "the Host header 'evil.example:7860' does not name"),  # DNS
    ("127.0.0.1@evil.example", None, "the Host header '127.0.0.1@evil.example' does not name this server"),
    ("10.0.0.5:7860", None, "the Host header '10.0.0.5:7860' does not name this server"),
    ("127.0.0.1:7860", "http://evil.example", "cross-origin requests are refused: Origin 'http://evil.example' "
                                              "is not this server ('127.0.0.1:7860')"),
    ("127.0.0.1:7860", "null", "cross-origin requests are refused: Origin 'null'"),
    ("localhost:7860", "http://127.0.0.1:7860", "cross-origin requests are refused"),
    (None, None, "the request has no Host header"),
])
def test_foreign_host_or_origin_is_refused(host, origin, message):
    assert demo_guard.check_request(host, origin, NAMES, ANY_IP).startswith(message)


@pytest.mark.parametrize("host, origin", [
    ("127.0.0.1:7860", None),  # a non-browser client (curl, gradio_client): no Origin
    ("127.0.0.1:7860", "http://127.0.0.1:7860"),  # the demo's own page
    ("localhost:7860", "http://localhost:7860"),
    ("[::1]:7860", None),
    ("DEMO.lan:7860", "http://demo.lan:7860"),  # --allow-host demo.lan
])
def test_own_page_and_local_clients_are_served(host, origin):
    assert demo_guard.check_request(host, origin, NAMES, ANY_IP) is None


def test_bound_to_any_address_any_ip_literal_names_it():
    names, any_ip = demo_guard.allowed_names("0.0.0.0")
    assert any_ip and demo_guard.check_request("10.0.0.5:7860", None, names, any_ip) is None
    assert demo_guard.check_request("evil.example", None, names, any_ip) is not None


def guard(headers: dict[str, str], kind: str = "http") -> tuple[list[dict], bool]:
    """Run one request's headers through RequestGuard -> (what it sent, whether the app was reached)."""
    reached, sent = [], []

    async def app(scope, receive, send):
        reached.append(scope)

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(demo_guard.RequestGuard(app, NAMES, ANY_IP)(scope, receive, send))
    return sent, bool(reached)


@pytest.mark.parametrize("headers, status, message", [
    ({"Host": "127.0.0.1:7860", "Content-Length": str(100 * 2**20)}, 413,
     f"the body is {100 * 2**20} bytes; the demo accepts at most {demo_guard.MAX_BODY}"),
    ({"Host": "127.0.0.1:7860", "Transfer-Encoding": "chunked"}, 411, "a request body needs a Content-Length"),
    ({"Host": "127.0.0.1:7860", "Content-Length": "lots"}, 400, "the Content-Length 'lots' is not a number"),
    ({"Host": "evil.example"}, 403, "the Host header 'evil.example' does not name this server"),
])
def test_the_guard_answers_before_the_app_reads_anything(headers, status, message):
    sent, reached = guard(headers)
    assert not reached
    assert sent[0]["status"] == status and sent[1]["body"].decode().startswith(message)


def test_the_guard_passes_good_requests_and_closes_foreign_websockets():
    assert guard({"Host": "127.0.0.1:7860", "Content-Length": "100"})[1]
    sent, reached = guard({"Host": "127.0.0.1:7860", "Origin": "http://evil.example"}, kind="websocket")
    assert not reached and sent[0]["type"] == "websocket.close"
