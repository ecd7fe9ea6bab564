"""The `mmdlm.demo` server's resource limits and input checks (issue 14, items 3 and 8), each bad input sent
through the real server on the tiny model folder: huge prompts and bodies, decompression-bomb images, text
that is not valid Unicode, foreign Host/Origin headers, and clients that stall. Every rejection is a 4xx
with a one-sentence JSON error, and none of them costs the server more than a moment.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_demo_limits.py
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import select
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
from PIL import Image

from mmdlm import demo
from mmdlm.pipeline import MMDLMPipeline

TIMEOUT = 1.0  # the server's socket timeout in these tests (seconds)


@pytest.fixture(scope="module")
def port(tiny_model_dir: str) -> Iterator[int]:
    """A real demo server on a free port, with a 1 s client timeout and one extra allowed host name."""
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    srv = demo.make_server(pipe, "127.0.0.1", 0, timeout=TIMEOUT, allow_hosts=["Demo.LAN"])
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def post(port: int, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, str, float]:
    """POST `body` (a dict is sent as JSON) -> (status, the reply's "error" or "", seconds taken)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    try:
        conn.request("POST", path, data, headers or {})
        r = conn.getresponse()
        reply = json.loads(r.read())
        return r.status, reply.get("error", ""), time.perf_counter() - start
    finally:
        conn.close()


def png_base64(image: Image.Image, **save_args) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save_args)
    return base64.b64encode(buf.getvalue()).decode()


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
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17: ihdr + 21] = zlib.crc32(bytes(data[ihdr: ihdr + 17])).to_bytes(4, "big")
    idat = data.index(b"IDAT")
    data[idat + 4: idat + 8] = b"\x00\x01\x02\x03"  # no decoder can read this: a 413 proves none ran
    return bytes(data)


TINY_PNG = png_base64(Image.new("RGB", (8, 8), "red"))


# ---- text: size before tokenizing, valid Unicode ---------------------------------------------------------
@pytest.mark.parametrize("path, field", [("/api/generate", "prompt"), ("/api/answer", "question")])
def test_huge_text_is_rejected_before_tokenizing(port, path, field):
    n = demo.MAX_BODY - 2**10  # just under the body limit: ~8 MiB of text (tokenizing it took 13 s, +2 GB)
    status, error, seconds = post(port, path, {"image": TINY_PNG, field: "a red circle " * (n // 13)})
    assert status == 400
    assert error == f"'{field}' is {n // 13 * 13} characters long; the demo accepts at most {demo.MAX_TEXT_CHARS}"
    assert seconds < 1.0


def test_text_at_the_character_limit_reaches_the_token_check(port):
    status, error, _ = post(port, "/api/generate", {"prompt": "a" * demo.MAX_TEXT_CHARS})
    assert status == 400 and "longer than the model's limit" in error


SURROGATE = "is not valid Unicode text (a lone surrogate at character"


@pytest.mark.parametrize("path, body, message", [
    ("/api/generate", {"prompt": "a red \ud800 circle"}, f"'prompt' {SURROGATE} 6)"),  # JSON: "\\ud800"
    ("/api/answer", {"image": TINY_PNG, "question": "\udfffwhat?"}, f"'question' {SURROGATE} 0)"),
    ("/api/answer", {"image": "\ud800", "question": "what?"}, f"'image' {SURROGATE} 0)"),
    ("/api/generate", b'{"prompt": "a red \xff circle"}', "the body is not valid UTF-8 (byte 0xff at offset 18)"),
    ("/api/generate", b'{"prompt": "\xed\xa0\x80"}', "the body is not valid UTF-8 (byte 0xed at offset 12)"),
    ("/api/generate", b"[" * 100_000, "the body is not valid JSON (nested too deeply)"),
    ("/api/generate", b'{"seed": ' + b"9" * 5000 + b"}", "the body is not valid JSON (a number has too many digits)"),
])
def test_text_that_is_not_valid_unicode_or_json_is_400(port, path, body, message):
    status, error, _ = post(port, path, body)
    assert status == 400
    assert error.startswith(message)


# ---- body and image size -----------------------------------------------------------------------------------
def test_body_over_the_limit_is_413_from_content_length_alone(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/api/generate")
    conn.putheader("Content-Length", str(100 * 2**20))
    conn.endheaders()  # and no body at all: the server must answer without waiting for it
    start = time.perf_counter()
    r = conn.getresponse()
    assert r.status == 413
    assert json.loads(r.read())["error"] == f"the body is {100 * 2**20} bytes; the demo accepts at most {demo.MAX_BODY}"
    assert time.perf_counter() - start < TIMEOUT / 2
    conn.close()


def test_100_megapixel_png_is_rejected_without_decoding(port):
    image = png_base64(Image.new("1", (10_000, 10_000)), optimize=True)  # ~12 KB; decoded: +1.3 GB
    assert len(image) < 50_000
    status, error, seconds = post(port, "/api/answer", {"image": image, "question": "what shape?"})
    assert status == 413
    assert error == f"'image' is 10000x10000 = 100000000 pixels; the demo accepts at most {demo.MAX_PIXELS}"
    assert seconds < 1.0


@pytest.mark.parametrize("data, message", [
    (sized_png(5000, 5000), "'image' is 5000x5000 = 25000000 pixels; the demo accepts at most"),
    (sized_jpeg(8000, 6000), "'image' is 8000x6000 = 48000000 pixels; the demo accepts at most"),
    (sized_png(20_000, 20_000), "'image' has too many pixels; the demo accepts at most"),  # PIL's hard limit
])
def test_header_size_decides_before_any_decoder_runs(port, data, message):
    """The pixel data behind these headers is unreadable: a 413 (not a 400) shows it was never decoded."""
    status, error, _ = post(port, "/api/answer", {"image": base64.b64encode(data).decode(), "question": "what?"})
    assert status == 413 and error.startswith(message)


def test_an_image_under_the_limit_with_a_corrupt_body_is_400(port):
    status, error, _ = post(port, "/api/answer", {"image": base64.b64encode(sized_png(64, 64)).decode(),
                                                  "question": "what?"})
    assert status == 400 and error.startswith("'image' is not a readable image")


def test_formats_beyond_the_common_ones_are_not_opened(port):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="TIFF")
    status, error, _ = post(port, "/api/answer", {"image": base64.b64encode(buf.getvalue()).decode(),
                                                  "question": "what?"})
    assert status == 400 and error.startswith("'image' is not a readable image (PNG, JPEG, GIF, BMP, WEBP)")


# ---- who may call ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("headers, message", [
    ({"Host": "evil.example"}, "the Host header 'evil.example' does not name this server; start the demo with "
                               "--allow-host evil.example if you reach it by that name"),
    ({"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}"},  # DNS rebinding
     "the Host header 'evil.example:{port}' does not name this server"),
    ({"Host": "127.0.0.1@evil.example"}, "the Host header '127.0.0.1@evil.example' does not name this server"),
    ({"Origin": "http://evil.example"}, "cross-origin requests are refused: Origin 'http://evil.example' is not "
                                        "this server ('127.0.0.1:{port}')"),
    ({"Origin": "null"}, "cross-origin requests are refused: Origin 'null'"),
    ({"Host": "localhost:{port}", "Origin": "http://127.0.0.1:{port}"}, "cross-origin requests are refused"),
])
def test_foreign_host_or_origin_is_403(port, headers, message):
    headers = {k: v.format(port=port) for k, v in headers.items()}
    status, error, _ = post(port, "/api/generate", {"prompt": "a red circle", "num": 1, "steps": 1}, headers)
    assert status == 403
    assert error.startswith(message.format(port=port))


def test_a_request_without_host_is_403(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": "a red circle", "num": 1, "steps": 1}).encode()
    conn.putrequest("POST", "/api/generate", skip_host=True)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    r = conn.getresponse()
    assert r.status == 403 and "has no Host header" in json.loads(r.read())["error"]
    conn.close()


@pytest.mark.parametrize("headers", [
    {},  # a non-browser client (curl, scripts): no Origin
    {"Origin": "http://127.0.0.1:{port}"},  # the demo's own page
    {"Host": "localhost:{port}", "Origin": "http://localhost:{port}"},
    {"Host": "DEMO.lan:{port}", "Origin": "http://demo.lan:{port}"},  # --allow-host demo.lan
])
def test_own_page_and_local_clients_are_served(port, headers):
    headers = {k: v.format(port=port) for k, v in headers.items()}
    status, error, _ = post(port, "/api/generate", {"prompt": "a red circle", "num": 1, "steps": 1}, headers)
    assert (status, error) == (200, "")


# ---- clients that stall ------------------------------------------------------------------------------------
def test_a_silent_client_is_dropped_after_the_timeout(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.perf_counter()
        assert sock.recv(1024) == b""  # the server closed the connection without a word
        assert TIMEOUT * 0.9 < time.perf_counter() - start < TIMEOUT + 2


def stalled_post(port: int, body: bytes, length: int, drip: float = 0.0) -> tuple[int, str, float]:
    """Send the headers claiming `length` bytes, then `body` (a byte every `drip` s if set), then wait."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        start = time.perf_counter()
        sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        if not drip:
            sock.sendall(body)
        for i in range(len(body) if drip else 0):
            if select.select([sock], [], [], 0)[0]:  # the server has answered: stop sending
                break
            sock.sendall(body[i: i + 1])
            time.sleep(drip)
        reply = sock.makefile("rb").read()
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)["error"], time.perf_counter() - start


def test_a_body_that_stops_arriving_is_408(port):
    status, error, seconds = stalled_post(port, b'{"prompt": ', 100)
    assert status == 408
    assert error == "the body stopped arriving after 11 of its 100 bytes (1 s without data)"
    assert seconds < TIMEOUT + 2


def test_a_body_that_drips_in_is_408_at_the_deadline(port):
    status, error, seconds = stalled_post(port, b'{"prompt": "' + b"a" * 40, 200, drip=TIMEOUT / 10)
    assert status == 408 and error.startswith("the body arrived too slowly")
    assert seconds < TIMEOUT + 2


def test_the_server_still_serves_after_all_that(port):
    status, error, _ = post(port, "/api/answer", {"image": TINY_PNG, "question": "what shape?", "steps": 1})
    assert (status, error) == (200, "")


def test_cli_rejects_a_timeout_that_is_not_positive(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--model", tiny_model_dir, "--timeout", "0"])
    assert exit_info.value.code == 2 and "expected a number of seconds > 0" in capsys.readouterr().err
