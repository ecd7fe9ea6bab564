"""A local web demo on the standard library alone: text-to-image with a "watch it denoise" GIF, and VQA.

    python -m mmdlm.demo --model runs/quickstart/model --port 7860      # then open http://127.0.0.1:7860
    python -m mmdlm.demo --model DIR --device cpu --host 0.0.0.0 --port 8000

The page calls a small JSON API (bad requests get 400 and {"error": message}, unknown paths 404):

    POST /api/generate  {"prompt": str, "num"?: 1-16, "steps"?: 1-64, "guidance"?: 0-20, "seed"?: int}
                        -> {"grid": base64 PNG, "gif": base64 GIF (one frame per step), "nfe": int}
    POST /api/answer    {"image": base64 PNG/JPEG/... (a data: URL is fine), "question": str, "steps"?: 1-64}
                        -> {"answer": str, "nfe": int}
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from PIL import Image

from mmdlm.generate import make_grid, progress_frames, save_gif, to_pil
from mmdlm.vqa import InputError, load_pipeline

if TYPE_CHECKING:
    from mmdlm.pipeline import MMDLMPipeline

MAX_BODY = 8 * 2**20  # bytes; a 32x32 PNG is ~1 KB, so this only stops abuse

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>mmdlm demo</title>
<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}img{image-rendering:pixelated;margin:4px}
section{border:1px solid #ccc;padding:1em;margin:1em 0}.err{color:#b00}</style></head><body>
<h1>mmdlm: one masked-diffusion model for text and images</h1>
<section><h2>Text to image</h2>
<input id="prompt" size="50" value="a large red circle at the top left">
num <input id="num" type="number" value="4" min="1" max="16" style="width:4em">
steps <input id="steps" type="number" value="12" min="1" max="64" style="width:4em">
guidance <input id="guidance" type="number" value="2" min="0" max="20" step="0.5" style="width:4em">
<button onclick="generate()">Generate</button><p id="gen-info"></p>
<div><img id="grid"> <img id="gif" title="watch it denoise"></div></section>
<section><h2>Ask about an image</h2>
<input id="file" type="file" accept="image/*"> <input id="question" size="40" value="what color is the circle?">
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
  const reader = new FileReader();
  reader.onload = async () => {
    const j = await post("/api/answer", {image: reader.result,
      question: document.getElementById("question").value}, out);
    if (j) out.textContent = j.answer + "  (NFE " + j.nfe + ")";
  };
  reader.readAsDataURL(file);
}
</script></body></html>"""


class BadRequest(ValueError):
    """The client's fault: answered with 400 and this message."""


def get_field(body: dict, name: str, kind: type, default: object = None,
              bounds: tuple[float, float] | None = None):
    """`body[name]` checked to be a `kind` within `bounds` (inclusive), or `default` when absent."""
    value = body.get(name, default)
    if value is None:
        raise BadRequest(f"missing field '{name}'")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be of type {kind.__name__}")
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise BadRequest(f"'{name}' must be between {bounds[0]} and {bounds[1]}")
    return value


def decode_image(data: str) -> Image.Image:
    """Base64 (or a data: URL) -> an RGB image."""
    payload = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest("'image' is not valid base64") from err
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadRequest(f"'image' is not a readable image ({err})") from err


def encode_image(image: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Demo:
    """The two API calls on one pipeline; a lock serialises model calls from the server's threads."""

    def __init__(self, pipe: MMDLMPipeline) -> None:
        self.pipe, self.lock = pipe, threading.Lock()
        self.routes: dict[str, Callable[[dict], dict]] = {"/api/generate": self.generate, "/api/answer": self.answer}

    def generate(self, body: dict) -> dict:
        prompt = get_field(body, "prompt", str)
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
        image = decode_image(get_field(body, "image", str))
        question = get_field(body, "question", str)
        if not question.strip():
            raise BadRequest("the question is empty")
        steps = get_field(body, "steps", int, 8, (1, 64))
        with self.lock:
            out = self.pipe.answer([image], [question], steps=steps)
        return {"answer": out.texts[0], "nfe": out.nfe}


class Handler(BaseHTTPRequestHandler):
    demo: Demo  # bound by `make_server`

    def do_GET(self) -> None:
        if urlparse(self.path).path in ("/", "/index.html"):
            self.send(200, PAGE.encode(), "text/html; charset=utf-8")
        else:
            self.send_json(404, {"error": f"no page {self.path}"})

    def do_POST(self) -> None:
        route = self.demo.routes.get(urlparse(self.path).path)
        if route is None:
            self.send_json(404, {"error": f"no endpoint {self.path}; try {', '.join(self.demo.routes)}"})
            return
        try:
            self.send_json(200, route(self.read_json()))
        except ValueError as err:  # BadRequest, or the pipeline rejecting an input (a prompt too long)
            self.send_json(400, {"error": str(err)})
        except Exception as err:  # keep serving; the traceback goes to the server's log
            self.log_error("%s failed: %r", self.path, err)
            self.send_json(500, {"error": f"internal error: {err}"})

    def read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError as err:
            raise BadRequest("a JSON body with a Content-Length is required") from err
        if not 0 < length <= MAX_BODY:
            raise BadRequest(f"the body must be 1 to {MAX_BODY} bytes, got {length}")
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRequest(f"the body is not valid JSON ({err})") from err
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def send_json(self, status: int, payload: dict) -> None:
        self.send(status, json.dumps(payload).encode(), "application/json")

    def send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(pipe: MMDLMPipeline, host: str = "127.0.0.1", port: int = 7860) -> ThreadingHTTPServer:
    """A server for `pipe` (port 0 = any free port: read it from `server.server_address`)."""
    handler = type("DemoHandler", (Handler,), {"demo": Demo(pipe)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    """Serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m mmdlm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (written by mmdlm.export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        server = make_server(load_pipeline(args.model, args.device), args.host, args.port)
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
