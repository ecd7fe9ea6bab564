"""A local web demo on the standard library alone: text-to-image with a "watch it denoise" GIF, and VQA.

    python -m mmdlm.demo --model runs/quickstart/model --port 7860      # then open http://127.0.0.1:7860
    python -m mmdlm.demo --model DIR --device cpu --host 0.0.0.0 --port 8000

The page calls a small JSON API (bad requests get 4xx and {"error": one sentence}, unknown paths 404):

    POST /api/generate  {"prompt": str, "num"?: 1-16, "steps"?: 1-64, "guidance"?: 0-20, "seed"?: int}
                        -> {"grid": base64 PNG, "gif": base64 GIF (one frame per step), "nfe": int}
    POST /api/answer    {"image": base64 PNG/JPEG/... (a data: URL is fine), "question": str, "steps"?: 1-64}
                        -> {"answer": str, "nfe": int}

Limits (a bad request costs little and cannot crash, hang or exhaust the server):

- the body is at most 8 MiB (MAX_BODY), checked from Content-Length before anything is read (else 413);
  it must be UTF-8 JSON (else 400), and it must keep arriving (below);
- text fields must be valid Unicode (no lone surrogates) and at most 1000 characters (MAX_TEXT_CHARS),
  checked before tokenizing (else 400); the model's own token limit is checked after that (400);
- an image may have at most 4096 x 4096 pixels (MAX_PIXELS), read from its header before it is decoded
  (else 413), and must be PNG, JPEG, GIF, BMP or WebP; images are decoded one at a time, under the model lock;
- a client silent for `--timeout` seconds (default 10) is dropped (a body that stops arriving gets 408),
  and the body must arrive within `timeout * (1 + its size in MiB)` seconds in all (else 408);
- a POST must name this server in its Host header (localhost, the bound address, any IP address when bound
  to 0.0.0.0, or a name given with `--allow-host`), and an Origin header, when sent, must be this same
  server (so other web sites cannot use the demo, nor reach it by DNS rebinding); else 403.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from PIL import Image

from mmdlm.generate import make_grid, progress_frames, save_gif, to_pil
from mmdlm.vqa import InputError, load_pipeline

if TYPE_CHECKING:
    from mmdlm.pipeline import MMDLMPipeline

MAX_BODY = 8 * 2**20  # bytes; a 32x32 PNG is ~1 KB, so this only stops abuse
MAX_TEXT_CHARS = 1000  # a prompt or question; the model reads a few dozen tokens, so none that fits is longer
MAX_PIXELS = 4096 * 4096  # an image's width * height (16.8 Mpx: 50 MB as RGB), checked before decoding
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # what PIL may open; no EPS (Ghostscript) or the like
TIMEOUT = 10.0  # seconds a client may stay silent before it is dropped
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?")  # a Host header's value, lower case

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>mmdlm demo</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}img{image-rendering:pixelated;margin:4px}
section{border:1px solid #ccc;padding:1em;margin:1em 0}.err{color:#b00}</style></head><body>
<h1>mmdlm: one masked-diffusion model for text and images</h1>
<section><h2>Text to image</h2>
<input id="prompt" size="50" maxlength="__MAX_TEXT__" value="a large red circle at the top left">
num <input id="num" type="number" value="4" min="1" max="16" style="width:4em">
steps <input id="steps" type="number" value="12" min="1" max="64" style="width:4em">
guidance <input id="guidance" type="number" value="2" min="0" max="20" step="0.5" style="width:4em">
<button onclick="generate()">Generate</button><p id="gen-info"></p>
<div><img id="grid"> <img id="gif" title="watch it denoise"></div></section>
<section><h2>Ask about an image</h2>
<input id="file" type="file" accept="image/*">
<input id="question" size="40" maxlength="__MAX_TEXT__" value="what color is the circle?">
<button onclick="ask()">Answer</button><p id="answer"></p></section>
<script>
async function post(path, body, info) {
  info.textContent = "..."; info.className = "";
  const r = await fetch(path, {method: "POST", body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) { info.textContent = j.error; info.className = "err"; return null; }
  return j;
}
async function generate() {
  const info = document.getElementById("gen-info");
  const v = id => Number(document.getElementById(id).value);
  const j = await post("/api/generate", {prompt: document.getElementById("prompt").value,
    num: v("num"), steps: v("steps"), guidance: v("guidance")}, info);
  if (!j) return;
  document.getElementById("grid").src = "data:image/png;base64," + j.grid;
  document.getElementById("gif").src = "data:image/gif;base64," + j.gif;
  info.textContent = "NFE " + j.nfe;
}
function ask() {
  const out = document.getElementById("answer"), file = document.getElementById("file").files[0];
  if (!file) { out.textContent = "choose an image first"; out.className = "err"; return; }
  if (file.size > __MAX_FILE__) {
    out.textContent = "the image is " + file.size + " bytes; the demo accepts files up to __MAX_FILE__ bytes";
    out.className = "err"; return;
  }
  const reader = new FileReader();
  reader.onload = async () => {
    const j = await post("/api/answer", {image: reader.result,
      question: document.getElementById("question").value}, out);
    if (j) out.textContent = j.answer + "  (NFE " + j.nfe + ")";
  };
  reader.readAsDataURL(file);
}
</script></body></html>""".replace("__MAX_TEXT__", str(MAX_TEXT_CHARS)).replace(
    "__MAX_FILE__", str(MAX_BODY * 3 // 4 - 2**16))  # base64 makes a file 4/3 larger; leave room for the rest


class BadRequest(ValueError):
    """The client's fault: answered with `status` (400 unless a subclass says otherwise) and this message."""

    status = 400


class TooLarge(BadRequest):
    """A body or image over the demo's limits: 413."""

    status = 413


class Forbidden(BadRequest):
    """A request from elsewhere than this server's own page: 403."""

    status = 403


class BodyTimeout(BadRequest):
    """The body stopped arriving: 408."""

    status = 408


def get_field(body: dict, name: str, kind: type, default: object = None,
              bounds: tuple[float, float] | None = None):
    """`body[name]` checked to be a `kind` within `bounds` (inclusive), or `default` when absent.

    Strings must be valid Unicode (JSON can spell a lone surrogate, "\\ud800", that no encoder accepts).
    """
    value = body.get(name, default)
    if value is None:
        raise BadRequest(f"missing field '{name}'")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be of type {kind.__name__}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise BadRequest(f"'{name}' must be between {bounds[0]} and {bounds[1]}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise BadRequest(f"'{name}' is not valid Unicode text (a lone surrogate at character {err.start})"
                             ) from err
    return value


def get_text(body: dict, name: str) -> str:
    """A required text field of at most MAX_TEXT_CHARS characters, checked before anything tokenizes it."""
    text = get_field(body, name, str)
    if len(text) > MAX_TEXT_CHARS:
        raise BadRequest(f"'{name}' is {len(text)} characters long; the demo accepts at most {MAX_TEXT_CHARS}")
    return text


def decode_image(data: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Base64 (or a data: URL) -> an RGB image; its size is read from the header and checked before decoding."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest("'image' is not valid base64") from err
    try:
        with warnings.catch_warnings():  # PIL warns above ~89 Mpx; the check below decides instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # lazy: reads the header only
    except Image.DecompressionBombError as err:  # PIL's own hard limit (~179 Mpx) is reached at open
        raise TooLarge(f"'image' has too many pixels; the demo accepts at most {max_pixels}") from err
    except (OSError, ValueError) as err:
        raise BadRequest(f"'image' is not a readable image ({', '.join(IMAGE_FORMATS)}): {err}") from err
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooLarge(f"'image' is {width}x{height} = {width * height} pixels; "
                           f"the demo accepts at most {max_pixels}")
        try:
            return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # a truncated or corrupt body behind a valid header
            raise BadRequest(f"'image' is not a readable image ({', '.join(IMAGE_FORMATS)}): {err}") from err


def encode_image(image: Image.Image, fmt: str) -> str:
    """`image` saved as `fmt` and base64-encoded."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Demo:
    """The two API calls on one pipeline; a lock serialises model calls from the server's threads."""

    def __init__(self, pipe: MMDLMPipeline) -> None:
        self.pipe, self.lock = pipe, threading.Lock()
        self.routes: dict[str, Callable[[dict], dict]] = {"/api/generate": self.generate, "/api/answer": self.answer}

    def generate(self, body: dict) -> dict:
        """POST /api/generate."""
        prompt = get_text(body, "prompt")
        num = get_field(body, "num", int, 4, (1, 16))
        steps = get_field(body, "steps", int, 12, (1, 64))
        guidance = get_field(body, "guidance", float, 2.0, (0, 20))
        seed = get_field(body, "seed", int, 0, (0, 2**31 - 1))
        with self.lock:
            out = self.pipe.text_to_image([prompt] * num, guidance_scale=guidance, steps=steps, seed=seed,
                                          history=True)
            frames = progress_frames(self.pipe, out.history, num)
        gif = io.BytesIO()
        save_gif(frames, gif)
        return {"grid": encode_image(to_pil(make_grid(out.images, num)), "PNG"),
                "gif": base64.b64encode(gif.getvalue()).decode("ascii"), "nfe": out.nfe}

    def answer(self, body: dict) -> dict:
        """POST /api/answer; the image is decoded under the lock, so at most one decoded image is alive."""
        data = get_field(body, "image", str)
        question = get_text(body, "question")
        if not question.strip():
            raise BadRequest("the question is empty")
        steps = get_field(body, "steps", int, 8, (1, 64))
        with self.lock:
            image = decode_image(data)
            out = self.pipe.answer([image], [question], steps=steps)
        return {"answer": out.texts[0], "nfe": out.nfe}


def host_name(value: str) -> str | None:
    """The host name in a Host header's value ("Example.com:80" -> "example.com", "[::1]:7860" -> "::1"),
    or None when it is not a plain host[:port]."""
    match = HOST_HEADER.fullmatch(value.strip().lower())
    return match.group(1).strip("[]").rstrip(".") if match else None


def is_ip_address(name: str) -> bool:
    """True for an IPv4 or IPv6 address literal (which a DNS-rebinding web site cannot put in a Host header)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Handler(BaseHTTPRequestHandler):
    """The page on GET, the JSON API on POST; the limits are class attributes bound by `make_server`."""

    demo: Demo
    timeout: float | None = TIMEOUT  # seconds; StreamRequestHandler sets it on the socket (silent -> dropped)
    allowed_hosts: frozenset[str] = LOCAL_NAMES
    any_ip: bool = False  # bound to 0.0.0.0: a Host that is any IP address literal is this server too

    def handle(self) -> None:
        """Serve the connection; a client that stops reading or resets it is dropped with one log line."""
        try:
            super().handle()
        except (TimeoutError, ConnectionError) as err:
            self.log_error("dropped %s: %r", self.client_address[0], err)

    def do_GET(self) -> None:
        """The demo page."""
        if urlparse(self.path).path in ("/", "/index.html"):
            self.send(200, PAGE.encode(), "text/html; charset=utf-8")
        else:
            self.send_json(404, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:
        """One API call: every rejection is a JSON {"error": one sentence} with a 4xx status."""
        route = self.demo.routes.get(urlparse(self.path).path)
        if route is None:
            self.send_json(404, {"error": f"no endpoint {self.path}; try {', '.join(self.demo.routes)}"})
            return
        try:
            raw = self.read_body()
            self.check_origin()
            self.send_json(200, route(parse_json(raw)))
        except BadRequest as err:
            if err.status in (408, 413):  # the body was not (all) read: do not look for a next request in it
                self.close_connection = True
            self.send_json(err.status, {"error": str(err)})
        except ValueError as err:  # the pipeline rejecting an input (a prompt too many tokens long)
            self.send_json(400, {"error": str(err)})
        except Exception as err:  # keep serving; the traceback goes to the server's log
            self.log_error("%s failed: %r", self.path, err)
            self.send_json(500, {"error": f"internal error: {err}"})

    def read_body(self) -> bytes:
        """The body, its size checked from Content-Length before reading; it must keep arriving."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as err:
            raise BadRequest("a JSON body with a Content-Length is required") from err
        if length > MAX_BODY:
            raise TooLarge(f"the body is {length} bytes; the demo accepts at most {MAX_BODY}")
        if length <= 0:
            raise BadRequest(f"the body must be 1 to {MAX_BODY} bytes, got {length}")
        timeout = self.timeout if self.timeout is not None else float("inf")
        deadline = time.monotonic() + timeout * (1 + length / 2**20)
        chunks, left = [], length
        try:
            while left:
                chunk = self.rfile.read1(min(left, 2**16))
                if not chunk:
                    raise BadRequest(f"the body ended after {length - left} of its {length} bytes")
                chunks.append(chunk)
                left -= len(chunk)
                if left and time.monotonic() > deadline:
                    raise BodyTimeout(f"the body arrived too slowly ({length - left} of {length} bytes "
                                      f"in {timeout * (1 + length / 2**20):.0f} s)")
        except TimeoutError as err:
            raise BodyTimeout(f"the body stopped arriving after {length - left} of its {length} bytes "
                              f"({self.timeout:g} s without data)") from err
        return b"".join(chunks)

    def check_origin(self) -> None:
        """Only requests naming this server (Host) from its own page or a non-browser client (Origin)."""
        host = self.headers.get("Host")
        if host is None:
            raise Forbidden("the request has no Host header; the demo answers only requests that name it")
        name = host_name(host)
        if name is None or not (name in self.allowed_hosts or (self.any_ip and is_ip_address(name))):
            raise Forbidden(f"the Host header {host!r} does not name this server; start the demo with "
                            f"--allow-host {name or 'NAME'} if you reach it by that name")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() not in (f"http://{host.strip().lower()}",
                                                                  f"https://{host.strip().lower()}"):
            raise Forbidden(f"cross-origin requests are refused: Origin {origin!r} is not this server ({host!r})")

    def send_json(self, status: int, payload: dict) -> None:
        """Reply with `payload` as JSON."""
        self.send(status, json.dumps(payload).encode(), "application/json")

    def send(self, status: int, data: bytes, content_type: str) -> None:
        """Reply with `data`."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def parse_json(raw: bytes) -> dict:
    """A request body -> a JSON object; it must be UTF-8 (strictly: no encoded surrogates either)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRequest(f"the body is not valid UTF-8 (byte {raw[err.start]:#04x} at offset {err.start})"
                         ) from err
    try:
        body = json.loads(text)
    except RecursionError as err:
        raise BadRequest("the body is not valid JSON (nested too deeply)") from err
    except json.JSONDecodeError as err:
        raise BadRequest(f"the body is not valid JSON ({err})") from err
    except ValueError as err:  # int() refusing a number of more than sys.get_int_max_str_digits() digits
        raise BadRequest("the body is not valid JSON (a number has too many digits)") from err
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def make_server(pipe: MMDLMPipeline, host: str = "127.0.0.1", port: int = 7860, timeout: float = TIMEOUT,
                allow_hosts: Iterable[str] = ()) -> ThreadingHTTPServer:
    """A server for `pipe` (port 0 = any free port: read it from `server.server_address`).

    `timeout`: seconds a client may stay silent before it is dropped. `allow_hosts`: host names, beyond
    localhost and `host`, by which clients may reach the server (its Host header); binding to 0.0.0.0
    also allows any IP address and this machine's own names.
    """
    names = set(LOCAL_NAMES) | {h.strip().lower().strip("[]").rstrip(".") for h in allow_hosts}
    any_ip = host in ANY_ADDRESS
    if any_ip:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host.lower().strip("[]").rstrip("."))
    handler = type("DemoHandler", (Handler,), {"demo": Demo(pipe), "timeout": timeout,
                                               "allowed_hosts": frozenset(names), "any_ip": any_ip})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m mmdlm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (written by mmdlm.export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--timeout", type=positive_float, default=TIMEOUT,
                        help=f"seconds a client may stay silent before it is dropped (default {TIMEOUT:g})")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name by which browsers reach the demo, beyond localhost and --host "
                             "(repeatable; e.g. the machine's DNS name behind a proxy)")
    args = parser.parse_args(argv)
    try:
        server = make_server(load_pipeline(args.model, args.device), args.host, args.port, args.timeout,
                             args.allow_host)
    except (InputError, OSError) as err:  # OSError: the port is taken
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serving on http://{args.host}:{server.server_address[1]}  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
