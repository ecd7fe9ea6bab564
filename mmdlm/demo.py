"""The web demo: a Gradio Blocks app with one tab per task, on a model folder, on this machine only by default.

    python -m mmdlm.demo --model runs/quickstart/model                  # then open http://127.0.0.1:7860
    python -m mmdlm.demo --model DIR --device cpu --host 0.0.0.0 --port 8000 --allow-host demo.lan

Tabs (the layout of the MMaDA / Show-o demos): Caption (image -> caption), VQA (image + question -> answer),
Text to image (prompt -> images), Joint (image + caption pairs from nothing), Inpainting (upload an image,
paint over the part to regenerate, optionally say what should be there), Edit (an image and an instruction,
"make the red circle blue" -> the edited image; for a model trained on edits, configs/mdm-edits.yaml), Text
infilling (text with `[MASK]` blanks -> the completed text). Each tab has the sampler's controls where they
apply: steps, guidance, temperature, the Fast-dLLM confidence threshold (0 = the fixed step schedule),
ReMDM-style self-correction (`mmdlm.sampling.SelfCorrection`) and the seed: each tab's controls become the
`SamplerConfig` of the call, the task's default (`mmdlm.pipeline.DEFAULT_SAMPLERS`) with the controls' values.
Text to image, Joint and Inpainting show the denoising live: the canvas after every step, still-masked
token cells grey (a forward pre-hook on the model sees the canvas each step; nothing in the sampler
changes). An autoregressive model folder (config `causal: true`) runs Caption, VQA, Text to image and
Joint left to right (only temperature and seed apply); its Inpainting and Text infilling tabs say that
they need the masked-diffusion model.

Limits (a bad input gets one sentence in the page's error toast, never a traceback, and costs a moment):

- text (prompt, question, text to infill) at most 1000 characters (MAX_TEXT_CHARS) and valid Unicode (no
  lone surrogates), checked before anything tokenizes it (the text box also stops typing at 1000); the
  model's own token limit is the pipeline's one-sentence error;
- an image at most 4096 x 4096 pixels (MAX_PIXELS), its size read from the header before it is decoded,
  in PNG, JPEG, GIF, BMP or WebP (IMAGE_FORMATS). The events that take an uploaded image skip Gradio's
  preprocessing (`preprocess=False`), so the demo opens the file itself, one at a time under the model
  lock. The inpainting canvas (256 x 256, filled by the demo from a checked upload) is decoded by Gradio;
  `main` lowers PIL's own decompression-bomb limit to MAX_PIXELS, so in the server any PIL open of an
  image over twice that fails from the header;
- an upload at most 8 MiB (Gradio's `max_file_size`, checked in the page and by the server); any request
  body at most MAX_BODY bytes by its Content-Length (413 before it is read; a chunked body without a
  length gets 411);
- one generation at a time (all model events share one Gradio concurrency slot, and a lock), at most
  MAX_QUEUE waiting in Gradio's queue (more are told the queue is full);
- the server binds 127.0.0.1 unless `--host` says otherwise.

Who may call: Gradio's strict CORS refuses cross-origin requests to a server reached as localhost, but not
to one reached by any other name, and Gradio does not check the Host header, so another web site could
reach the demo through DNS rebinding. So the demo keeps its own check (`check_request`, in the ASGI
middleware `RequestGuard`): every request must name this server in its Host header (localhost, the bound
address, any IP address when bound to 0.0.0.0, or a name given with `--allow-host`), and an Origin
header, when sent, must be this same server; else 403 with one sentence. Gradio serves with uvicorn on
an event loop: a client that stalls holds a socket, not a thread, so it cannot block other users (but
uvicorn does not drop a connection that never sends a request; nothing in Gradio sets a timeout for it).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import ipaddress
import queue
import re
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mmdlm import inputs
from mmdlm.commands.generate import captioned_grid, decode_canvas, make_grid, paint_masked, printable, to_pil
from mmdlm.inputs import InputError, load_pipeline

if TYPE_CHECKING:
    import gradio as gr

    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig

MAX_TEXT_CHARS = 1000  # a prompt or question; the model reads a few dozen tokens, so none that fits is longer
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # an image's width * height (16.8 Mpx: 50 MB as RGB), checked before decoding
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # what PIL may open; no EPS (Ghostscript) or the like
MAX_UPLOAD = 8 * 2**20  # bytes of an uploaded file (Gradio's max_file_size); a 32x32 PNG is ~1 KB
MAX_BODY = MAX_UPLOAD + 2**20  # bytes of any request body: an upload and its multipart framing
MAX_QUEUE = 16  # requests waiting for the model
MAX_IMAGES = 16  # images per text-to-image request
MAX_JOINT = 8  # image+caption pairs per request
MAX_VARIATIONS = 4  # inpainting results per request
MAX_STEPS = 64
MAX_SEED = 2**31 - 1
CANVAS = 256  # pixels of the inpainting canvas (the model's image, upscaled with nearest neighbour)
BLANK_MARK = "[MASK]"  # the pipeline's blank (mmdlm.pipeline.BLANK)
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?")  # a Host header's value, lower case
CSS = ".pixelated img {image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%}"
NO_TEXT = "(nothing: the model produced only end-of-text)"
TABS = ("caption", "vqa", "text-to-image", "joint", "inpainting", "edit", "infilling")  # elem_id "tab-<name>"


class TooLarge(InputError):
    """An image over the demo's pixel limit."""


# ---- input checks (each raises InputError with one sentence) ------------------------------------------------
def check_text(value: object, what: str, allow_empty: bool = False) -> str:
    """`value` as text of at most MAX_TEXT_CHARS characters of valid Unicode (`mmdlm.inputs.check_text`, the
    commands' own check), checked before tokenizing."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"the {what} must be text, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise InputError(f"the {what} is {len(value)} characters long; the demo accepts at most {MAX_TEXT_CHARS}")
    inputs.check_text(value, what)
    if not allow_empty and not value.strip():
        raise InputError(f"the {what} is empty")
    return value


def check_number(value: object, what: str, low: float, high: float, integer: bool = False) -> Any:
    """`value` as a number in [low, high] (an int when `integer`)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{what} must be a number, got {value[:20]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InputError(f"{what} must be a number, got {type(value).__name__}")
    if integer:
        if value != int(value):
            raise InputError(f"{what} must be a whole number, got {value}")
        value = int(value)
    if not low <= value <= high:
        raise InputError(f"{what} must be between {low} and {high}, got {value}")
    return value


def image_path(value: object) -> str | None:
    """The file behind an image input: a path, or Gradio's file payload ({"path": ...}) when the event
    skips preprocessing."""
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, str | Path):
        return str(value)
    return None


def open_image(value: object, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image as RGB: its format and size are read from the header and checked before decoding."""
    if value is None or value == {}:
        raise InputError(f"there is no {what}: upload one first")
    if isinstance(value, Image.Image):
        im: Image.Image = value
    else:
        path = image_path(value)
        if path is None:
            raise InputError(f"the {what} must be an uploaded file, got {type(value).__name__}")
        try:
            with warnings.catch_warnings():  # PIL warns above its own limit; the check below decides instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path, formats=IMAGE_FORMATS)  # lazy: reads the header only
        except Image.DecompressionBombError as err:  # PIL's hard limit (2x its own) is reached at open
            count = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds limit of ..."
            raise TooLarge(f"the {what} has {count.group(1) + ' pixels' if count else 'too many pixels'}; "
                           f"the demo accepts at most {max_pixels} ({MAX_SIDE} x {MAX_SIDE})") from err
        except (OSError, ValueError) as err:
            raise InputError(f"the {what} is not a readable image (the demo reads {', '.join(IMAGE_FORMATS)})"
                             ) from err
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooLarge(f"the {what} is {width} x {height} = {width * height} pixels; "
                           f"the demo accepts at most {max_pixels} ({MAX_SIDE} x {MAX_SIDE})")
        try:
            return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # a truncated or corrupt body behind a valid header
            raise InputError(f"the {what} is not a readable image: {str(err).splitlines()[0] if str(err) else err}"
                             ) from err


# ---- who may call -------------------------------------------------------------------------------------------
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


def allowed_names(host: str, allow_hosts: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """(host names that name this server, whether any IP address does): localhost, the bound address (or,
    bound to 0.0.0.0, this machine's names and any IP address), and `allow_hosts`."""
    names = set(LOCAL_NAMES) | {h.strip().lower().strip("[]").rstrip(".") for h in allow_hosts}
    any_ip = host in ANY_ADDRESS
    if any_ip:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    else:
        names.add(host.lower().strip("[]").rstrip("."))
    return frozenset(names), any_ip


def check_request(host: str | None, origin: str | None, names: frozenset[str], any_ip: bool = False
                  ) -> str | None:
    """Why a request with these Host and Origin headers is refused (one sentence), or None to serve it."""
    if host is None:
        return "the request has no Host header; the demo answers only requests that name it"
    name = host_name(host)
    if name is None or not (name in names or (any_ip and is_ip_address(name))):
        return (f"the Host header {host!r} does not name this server; start the demo with "
                f"--allow-host {name or 'NAME'} if you reach it by that name")
    if origin is not None and origin.strip().lower() not in (f"http://{host.strip().lower()}",
                                                              f"https://{host.strip().lower()}"):
        return f"cross-origin requests are refused: Origin {origin!r} is not this server ({host!r})"
    return None


class RequestGuard:
    """ASGI middleware in front of Gradio: `check_request` on every request and websocket, and request
    bodies over `max_body` bytes refused from their Content-Length before they are read."""

    def __init__(self, app: Callable, names: frozenset[str], any_ip: bool = False, max_body: int = MAX_BODY
                 ) -> None:
        self.app, self.names, self.any_ip, self.max_body = app, names, any_ip, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        status, problem = 403, check_request(headers.get("host"), headers.get("origin"), self.names, self.any_ip)
        if problem is None and scope["type"] == "http":
            status, problem = self.body_problem(headers)
        if problem is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": problem[:120]})
        else:
            body = (problem + "\n").encode()
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

    def body_problem(self, headers: dict[str, str]) -> tuple[int, str | None]:
        """(status, why) for a body over the limit or of unknown length; (200, None) when it may be read."""
        length = headers.get("content-length")
        if length is None:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return 411, "a request body needs a Content-Length"
            return 200, None
        try:
            n = int(length)
        except ValueError:
            return 400, f"the Content-Length {length[:40]!r} is not a number"
        if n > self.max_body:
            return 413, f"the body is {n} bytes; the demo accepts at most {self.max_body}"
        return 200, None


# ---- the model side ---------------------------------------------------------------------------------------
def sampler_config(task: str, steps: object, temperature: object, threshold: object, self_correction: object,
                   guidance: object = None, **fields: Any) -> SamplerConfig:
    """The controls of a tab -> the `SamplerConfig` of the call: the task's default with the controls'
    (checked) values; `fields`: more `SamplerConfig` fields, already checked."""
    from mmdlm.pipeline import DEFAULT_SAMPLERS
    from mmdlm.sampling import SelfCorrection

    t = check_number(threshold if threshold is not None else 0, "threshold", 0, 1)
    chosen: dict[str, Any] = {"steps": check_number(steps, "steps", 1, MAX_STEPS, integer=True),
                              "temperature": check_number(temperature, "temperature", 0, 5),
                              "threshold": float(t) if t > 0 else None,
                              "self_correction": SelfCorrection() if bool(self_correction) else None}
    if guidance is not None:
        chosen["guidance_scale"] = check_number(guidance, "guidance", 0, 20)
    return replace(DEFAULT_SAMPLERS[task], **chosen, **fields)


def user_errors(fn: Callable) -> Callable:
    """Turn a handler's InputError / ValueError (bad input, the model's token limit) into a one-sentence
    `gr.Error`; anything else is logged with its traceback and shown as one line. Generators stay generators."""
    import gradio as gr

    def translate(err: Exception) -> gr.Error:
        if isinstance(err, gr.Error):
            return err
        if isinstance(err, ValueError):  # InputError is one; the pipeline's are too
            return gr.Error(str(err), print_exception=False)
        traceback.print_exc()
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return gr.Error(f"internal error: {type(err).__name__}{': ' + first if first else ''}", print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except Exception as err:
                raise translate(err) from err
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise translate(err) from err
    return wrapper


_DONE = object()


class Demo:
    """The handlers of the app on one pipeline; each can be called directly (the tests do). A lock
    serialises model calls, so at most one generation (and one decoded upload) is in memory at a time."""

    def __init__(self, pipe: MMDLMPipeline) -> None:
        self.pipe, self.lock = pipe, threading.Lock()

    # ---- helpers ------------------------------------------------------------------------------------
    @property
    def autoregressive(self) -> bool:
        return self.pipe.is_autoregressive

    def needs_mdm(self, task: str) -> None:
        if self.autoregressive:
            raise InputError(f"{task} needs the masked-diffusion model; this model folder is the autoregressive "
                             f"baseline (config causal: true), which only continues left to right")

    def canvas_codes(self, ids: torch.Tensor, image_index: torch.Tensor, rows: int) -> torch.Tensor:
        """Canvas rows Long[R, T] -> their image codes Long[rows, h, w], -1 where still masked."""
        h, w = self.pipe.vq.grid
        vocab = self.pipe.vocab
        ids, index = ids[:rows].cpu(), image_index[:rows].cpu()
        out = torch.full((rows, h * w), -1, dtype=torch.long)
        for r in range(rows):
            at = index[r] >= 0
            tok = ids[r][at]
            out[r, index[r][at]] = torch.where(vocab.is_image(tok), tok - vocab.image_offset, -1)
        return out.view(rows, h, w)

    def live(self, run: Callable[[], Any], rows: int) -> Iterator[tuple[torch.Tensor | None, Any]]:
        """Run `run()` (a pipeline call on `rows` sequences) in a worker thread and yield (codes, None) with
        the canvas's image codes before every denoising step, then (None, its result). The masked-diffusion
        sampler calls the model once per step with the canvas in the first rows of `ids`; a forward
        pre-hook reads it. The autoregressive baseline is not watched (its calls are one token each)."""
        frames: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}
        watch = not self.autoregressive

        def hook(_module: object, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs.get("ids")
            index = kwargs.get("image_index", args[2] if len(args) > 2 else None)
            if ids is not None and index is not None and ids.dim() == 2:
                frames.put(self.canvas_codes(ids, index, rows))

        def work() -> None:
            handle = self.pipe.model.register_forward_pre_hook(hook, with_kwargs=True) if watch else None
            try:
                result["out"] = run()
            except BaseException as err:  # handed to the caller's thread
                result["err"] = err
            finally:
                if handle is not None:
                    handle.remove()
                frames.put(_DONE)

        with self.lock:
            worker = threading.Thread(target=work, name="mmdlm-demo-sampler", daemon=True)
            worker.start()
            try:
                while (item := frames.get()) is not _DONE:
                    yield item, None
            finally:  # also when the page goes away mid-run: keep the lock until the model is free
                worker.join()
        if "err" in result:
            raise result["err"]
        yield None, result["out"]

    def picture(self, codes: torch.Tensor, nrow: int) -> Image.Image:
        """Image codes Long[B, h, w] (-1 = masked) -> one grid picture, masked token cells grey."""
        return to_pil(make_grid(decode_canvas(self.pipe, codes), nrow, scale(codes.shape[0])))

    # ---- tasks ----------------------------------------------------------------------------------------
    def caption(self, image: object, block_length: object = 4, steps: object = None, guidance: object = 0.0,
                temperature: object = 0.0, threshold: object = 0.0, self_correction: object = False,
                seed: object = 0) -> tuple[str, str]:
        """Caption tab: (caption, info). `steps` None: one token per step (the pipeline's default);
        `block_length`: semi-autoregressive blocks of that many tokens (0 = one block)."""
        steps = self.pipe.layout.caption_len if steps is None else steps
        block = check_number(block_length, "block length", 0, MAX_STEPS, integer=True)
        sampler = sampler_config("caption", steps, temperature, threshold, self_correction, guidance,
                                 block_length=block or None)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        with self.lock:
            picture = open_image(image)
            start = time.perf_counter()
            out = self.pipe.caption([picture], sampler, seed=seed)
        caption = printable(out.texts[0])
        return (caption if caption.strip() else NO_TEXT), info(out.nfe, start)

    def answer(self, image: object, question: object, steps: object = 8, guidance: object = 0.0,
               temperature: object = 0.0, threshold: object = 0.0, self_correction: object = False,
               seed: object = 0) -> tuple[str, str]:
        """VQA tab: (answer, info)."""
        question = check_text(question, "question")
        sampler = sampler_config("answer", steps, temperature, threshold, self_correction, guidance)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        with self.lock:
            picture = open_image(image)
            start = time.perf_counter()
            out = self.pipe.answer([picture], [question], sampler, seed=seed)
        answer = printable(out.texts[0])
        return (answer if answer.strip() else NO_TEXT), info(out.nfe, start)

    def text_to_image(self, prompt: object, num: object = 4, steps: object = 12, guidance: object = 2.0,
                      temperature: object = 1.0, threshold: object = 0.0, self_correction: object = False,
                      seed: object = 0) -> Iterator[tuple[Image.Image, str]]:
        """Text-to-image tab: yields (the canvas so far, progress) every step, then (the images, info)."""
        prompt = check_text(prompt, "prompt")
        n = check_number(num, "number of images", 1, MAX_IMAGES, integer=True)
        sampler = sampler_config("text_to_image", steps, temperature, threshold, self_correction, guidance)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        start, step = time.perf_counter(), 0
        for codes, out in self.live(lambda: self.pipe.text_to_image([prompt] * n, sampler, seed=seed), n):
            if out is None:
                step += 1
                yield self.picture(codes, grid_columns(n)), f"step {step}: {int((codes < 0).sum())} tokens masked"
            else:
                yield self.picture(out.codes, grid_columns(n)), info(out.nfe, start)

    def joint(self, num: object = 4, steps: object = 16, temperature: object = 1.0, threshold: object = 0.0,
              self_correction: object = False, seed: object = 0) -> Iterator[tuple[Image.Image, str, str]]:
        """Joint tab: yields (the canvas so far, "", progress) every step, then (captioned images, captions,
        info)."""
        n = check_number(num, "number of pairs", 1, MAX_JOINT, integer=True)
        sampler = sampler_config("joint", steps, temperature, threshold, self_correction)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        start, step = time.perf_counter(), 0
        for codes, out in self.live(lambda: self.pipe.generate_joint(n, sampler, seed=seed), n):
            if out is None:
                step += 1
                masked = int((codes < 0).sum())
                yield self.picture(codes, grid_columns(n)), "", f"step {step}: {masked} image tokens masked"
            else:
                captions = [printable(c) for c in out.captions]
                sheet = captioned_grid(out.images, captions, grid_columns(n), scale(n))
                yield sheet, "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions)), info(out.nfe, start)

    def inpaint_canvas(self, image: object) -> dict | None:
        """Inpainting tab, on upload: the image as the model sees it (its size, centre-cropped), upscaled
        to the canvas for painting the mask on."""
        if image is None:
            return None
        with self.lock:
            picture = open_image(image)
            tensor = self.pipe.image_tensor([picture]).cpu()
        side = self.pipe.vq.image_size
        big = to_pil(tensor[0]).resize((side * canvas_scale(side),) * 2, Image.NEAREST)
        return {"background": big, "layers": [], "composite": big}

    def inpaint(self, editor: object, prompt: object = "", num: object = 1, steps: object = 12,
                guidance: object = 0.0, temperature: object = 1.0, threshold: object = 0.0,
                self_correction: object = False, seed: object = 0) -> Iterator[tuple[Image.Image, str]]:
        """Inpainting tab: `editor` is the ImageEditor's value (background + painted layer). Yields
        (original | masked | results so far, progress) every step, then the results and info."""
        self.needs_mdm("inpainting")
        prompt = check_text(prompt, "prompt", allow_empty=True).strip()
        n = check_number(num, "number of results", 1, MAX_VARIATIONS, integer=True)
        sampler = sampler_config("inpaint", steps, temperature, threshold, self_correction, guidance)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        background, mask = editor_image_and_mask(editor)
        side = self.pipe.vq.image_size
        region = mask_to_size(mask, side)  # Bool[side, side]
        if not bool(region.any()):
            raise InputError("nothing is painted: paint over the part of the image to regenerate")
        with self.lock:
            original = self.pipe.image_tensor([background]).cpu()  # (1, 3, S, S)
            token_mask = self.pipe.token_mask(region[None]).cpu()  # (1, h, w)
        shown = torch.cat([original, paint_masked(original, token_mask)])  # original | what is regenerated

        def strip(results: torch.Tensor) -> Image.Image:
            return to_pil(make_grid(torch.cat([shown, results.cpu().clamp(0, 1)]), 2 + n, scale(2 + n)))

        def run() -> Any:
            return self.pipe.inpaint(original.repeat(n, 1, 1, 1), region[None].repeat(n, 1, 1),
                                     [prompt] * n if prompt else None, sampler, seed=seed)

        start, step = time.perf_counter(), 0
        for codes, out in self.live(run, n):
            if out is None:
                step += 1
                yield strip(decode_canvas(self.pipe, codes)), f"step {step}: {int((codes < 0).sum())} tokens masked"
            else:
                yield strip(out.images), info(out.nfe, start)

    def edit(self, image: object, instruction: object, num: object = 2, image_guidance: object = 0.0,
             steps: object = 7, guidance: object = 2.0, temperature: object = 1.0, threshold: object = 0.0,
             self_correction: object = False, seed: object = 0) -> tuple[Image.Image, str]:
        """Edit tab: (original | results, info). `guidance` guides on the instruction, `image_guidance` on the
        source image apart (InstructPix2Pix; 0 = one scale for both)."""
        instruction = check_text(instruction, "instruction")
        n = check_number(num, "number of results", 1, MAX_VARIATIONS, integer=True)
        w_image = check_number(image_guidance, "image guidance", 0, 20)
        sampler = sampler_config("edit", steps, temperature, threshold, self_correction, guidance,
                                 image_guidance_scale=float(w_image) if w_image > 0 else None)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        with self.lock:
            original = self.pipe.image_tensor([open_image(image)]).cpu()  # (1, 3, S, S)
            start = time.perf_counter()
            out = self.pipe.edit(original.repeat(n, 1, 1, 1), [instruction] * n, sampler, seed=seed)
        row = torch.cat([original, out.images.cpu().clamp(0, 1)])
        return to_pil(make_grid(row, 1 + n, scale(1 + n))), info(out.nfe, start)

    def infill(self, text: object, tokens_per_blank: object = 1, steps: object = 8, temperature: object = 0.0,
               threshold: object = 0.0, self_correction: object = False, seed: object = 0) -> tuple[str, str]:
        """Text infilling tab: (the text with every [MASK] filled, info)."""
        self.needs_mdm("text infilling")
        text = check_text(text, "text")
        if BLANK_MARK not in text:
            raise InputError(f"the text has no blank: write {BLANK_MARK} where words should be filled in")
        per_blank = check_number(tokens_per_blank, "tokens per blank", 1, 8, integer=True)
        sampler = sampler_config("infill", steps, temperature, threshold, self_correction)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        with self.lock:
            start = time.perf_counter()
            out = self.pipe.infill([text], tokens_per_blank=per_blank, sampler=sampler, seed=seed)
        return printable(out.texts[0]), info(out.nfe, start)


def info(nfe: int, start: float) -> str:
    return f"done: {nfe} forward passes, {time.perf_counter() - start:.2f} s"


def grid_columns(n: int) -> int:
    return min(n, 4)


def scale(n: int) -> int:
    """Upscaling of 32-pixel images for display: large for a few, smaller for a grid."""
    return 8 if n <= 2 else 4


def canvas_scale(side: int) -> int:
    return max(1, CANVAS // side)


def editor_image_and_mask(editor: object) -> tuple[Image.Image, np.ndarray]:
    """An ImageEditor value (numpy RGBA arrays) -> (the background as RGB, Bool[H, W] painted pixels)."""
    if not isinstance(editor, dict) or editor.get("background") is None:
        raise InputError("there is no image to inpaint: upload one first")
    background = np.asarray(editor["background"])
    if background.ndim != 3 or background.shape[0] * background.shape[1] > MAX_PIXELS:
        raise InputError("the inpainting canvas is not an image of at most "
                         f"{MAX_SIDE} x {MAX_SIDE} pixels")
    h, w = background.shape[:2]
    mask = np.zeros((h, w), dtype=bool)
    for layer in editor.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim == 3 and layer.shape[:2] == (h, w):
            mask |= (layer[..., 3] > 0) if layer.shape[2] == 4 else layer.any(-1)
    return Image.fromarray(background[..., :3].astype(np.uint8)), mask


def mask_to_size(mask: np.ndarray, side: int) -> torch.Tensor:
    """Bool[H, W] painted pixels -> Bool[side, side] at the model's image size, resized (shorter side to
    `side`) and centre-cropped as `MMDLMPipeline.image_tensor` does the image; a pixel is masked when any
    painted pixel falls in it (max pooling, so a stroke never spreads into the next token cell)."""
    from torchvision.transforms import v2

    m = torch.from_numpy(np.ascontiguousarray(mask))[None, None].float()  # (1, 1, H, W)
    h, w = m.shape[-2:]
    size = (side, max(side, round(side * w / h))) if h <= w else (max(side, round(side * h / w)), side)
    pooled = torch.nn.functional.adaptive_max_pool2d(m, size)[0]  # (1, h', w')
    return v2.CenterCrop(side)(pooled)[0] > 0


# ---- the app ----------------------------------------------------------------------------------------------
def sampling_controls(task: str, region: int, guidance: bool, ar: bool) -> list[gr.components.Component]:
    """A tab's sampler controls, one row: [steps, (guidance,) temperature, threshold, self-correction, seed],
    set to the task's default sampler (`DEFAULT_SAMPLERS`; steps None = one per token of the `region`)."""
    import gradio as gr

    from mmdlm.pipeline import DEFAULT_SAMPLERS

    default = DEFAULT_SAMPLERS[task]
    steps, temperature = default.steps or region, default.temperature
    guidance = default.guidance_scale if guidance else None
    mdm = not ar
    unused = "not used by the autoregressive baseline"
    with gr.Accordion("sampling", open=True), gr.Row(equal_height=True):
        controls = [gr.Slider(1, MAX_STEPS, value=steps, step=1, label="steps", interactive=mdm,
                              info="denoising steps" if mdm else unused)]
        if guidance is not None:
            controls.append(gr.Slider(0, 10, value=guidance, step=0.5, label="guidance", interactive=mdm,
                                      info="classifier-free guidance scale" if mdm else unused))
        controls.append(gr.Slider(0, 2, value=temperature, step=0.1, label="temperature", info="0 = argmax"))
        controls.append(gr.Slider(0, 1, value=default.threshold or 0, step=0.05, label="threshold", interactive=mdm,
                                  info="commit all this sure (Fast-dLLM); 0 = the schedule" if mdm else unused))
        controls.append(gr.Checkbox(value=False, label="self-correction", interactive=mdm,
                                    info="re-mask what the model changes its mind on (ReMDM)" if mdm else unused))
        controls.append(gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed",
                                  info="same seed, same result"))
    return controls


def build_app(pipe: MMDLMPipeline, title: str | None = None) -> gr.Blocks:
    """The Gradio Blocks app on `pipe`: one tab per task (see the module docstring)."""
    import gradio as gr

    from mmdlm.pipeline import DEFAULT_SAMPLERS

    demo = Demo(pipe)
    caption_block = DEFAULT_SAMPLERS["caption"].block_length or 0
    ar = demo.autoregressive
    kind = "autoregressive baseline" if ar else "masked-diffusion model"
    side, (gh, gw) = pipe.vq.image_size, pipe.vq.grid
    model_events = {"concurrency_limit": 1, "concurrency_id": "model"}
    text_box = {"max_length": MAX_TEXT_CHARS, "lines": 1}
    image_in = {"type": "filepath", "image_mode": None, "sources": ["upload", "clipboard"], "height": 240,
                "elem_classes": "pixelated"}
    image_out = {"type": "pil", "format": "png", "interactive": False, "height": 400, "elem_classes": "pixelated"}
    needs_mdm = ("**{} needs the masked-diffusion model**: this model folder is the autoregressive baseline "
                 "(config `causal: true`), which only continues left to right.")

    with gr.Blocks(title="mmdlm demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## mmdlm: one {kind} for text and images\n{title + ' ' if title else ''}Images are "
                    f"{side} x {side} pixels, {gh} x {gw} tokens; grey cells are still masked. The demo takes text "
                    f"of at most {MAX_TEXT_CHARS} characters and images of at most {MAX_SIDE} x {MAX_SIDE} pixels.")
        with gr.Tabs():
            with gr.Tab("Caption", id="caption", elem_id="tab-caption"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(label="image", elem_id="caption-image", **image_in)
                        block = gr.Slider(0, pipe.layout.caption_len, value=caption_block, step=1, label="block length",
                                          info="decode left to right in blocks of this many tokens (LLaDA's "
                                               "semi-autoregressive decoding); 0 = one block", interactive=not ar)
                        button = gr.Button("Caption", variant="primary", elem_id="caption-run")
                    with gr.Column():
                        out = gr.Textbox(label="caption", elem_id="caption-out", interactive=False)
                        status = gr.Markdown(elem_id="caption-info")
                controls = sampling_controls("caption", pipe.layout.caption_len, True, ar)
                button.click(user_errors(demo.caption), [image, block, *controls], [out, status], api_name="caption",
                             preprocess=False, **model_events)

            with gr.Tab("VQA", id="vqa", elem_id="tab-vqa"):
                with gr.Row():
                    with gr.Column():
                        image = gr.Image(label="image", elem_id="vqa-image", **image_in)
                        question = gr.Textbox(label="question", value="what color is the circle?",
                                              elem_id="vqa-question", **text_box)
                        button = gr.Button("Answer", variant="primary", elem_id="vqa-run")
                    with gr.Column():
                        out = gr.Textbox(label="answer", elem_id="vqa-out", interactive=False)
                        status = gr.Markdown(elem_id="vqa-info")
                controls = sampling_controls("answer", pipe.layout.answer_len, True, ar)
                gr.on([button.click, question.submit], user_errors(demo.answer), [image, question, *controls],
                      [out, status], api_name="answer", preprocess=False, **model_events)

            with gr.Tab("Text to image", id="text-to-image", elem_id="tab-text-to-image"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="prompt", value="a large red circle at the top left",
                                            elem_id="t2i-prompt", **text_box)
                        num = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images")
                        button = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                    with gr.Column():
                        out = gr.Image(label="images (live: the canvas after each step)", elem_id="t2i-out",
                                       **image_out)
                        status = gr.Markdown(elem_id="t2i-info")
                controls = sampling_controls("text_to_image", 16, True, ar)
                gr.on([button.click, prompt.submit], user_errors(demo.text_to_image), [prompt, num, *controls],
                      [out, status], api_name="text_to_image", **model_events)

            with gr.Tab("Joint", id="joint", elem_id="tab-joint"):
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("Images and their captions, generated together from nothing.")
                        num = gr.Slider(1, MAX_JOINT, value=4, step=1, label="pairs")
                        button = gr.Button("Generate pairs", variant="primary", elem_id="joint-run")
                        captions = gr.Textbox(label="captions", elem_id="joint-captions", interactive=False, lines=4)
                    with gr.Column():
                        out = gr.Image(label="images and captions (live)", elem_id="joint-out", **image_out)
                        status = gr.Markdown(elem_id="joint-info")
                controls = sampling_controls("joint", 16, False, ar)
                button.click(user_errors(demo.joint), [num, *controls], [out, captions, status], api_name="joint",
                             **model_events)

            with gr.Tab("Inpainting", id="inpainting", elem_id="tab-inpainting"):
                if ar:
                    gr.Markdown(needs_mdm.format("Inpainting"))
                with gr.Row():
                    with gr.Column(scale=2):
                        source = gr.Image(label="1. upload an image", elem_id="inpaint-image", **image_in)
                        prompt = gr.Textbox(label="what should be there (optional)", elem_id="inpaint-prompt",
                                            placeholder="a small blue square in the middle", **text_box)
                        num = gr.Slider(1, MAX_VARIATIONS, value=2, step=1, label="results")
                        button = gr.Button("Inpaint", variant="primary", elem_id="inpaint-run", interactive=not ar)
                    with gr.Column(scale=3):
                        editor = gr.ImageEditor(
                            label="2. paint over the part to regenerate", elem_id="inpaint-canvas", type="numpy",
                            image_mode="RGBA", sources=(), transforms=(), layers=False,
                            brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=CANVAS // 16),
                            eraser=gr.Eraser(default_size=CANVAS // 16), canvas_size=(CANVAS, CANVAS),
                            fixed_canvas=True, height=CANVAS + 120)
                    with gr.Column(scale=3):
                        out = gr.Image(label="original | regenerated cells | results (live)", elem_id="inpaint-out",
                                       **{**image_out, "height": 240})
                        status = gr.Markdown(elem_id="inpaint-info")
                controls = sampling_controls("inpaint", 16, True, ar)
                source.change(user_errors(demo.inpaint_canvas), [source], [editor], preprocess=False,
                              api_name="inpaint_canvas", **model_events)
                button.click(user_errors(demo.inpaint), [editor, prompt, num, *controls], [out, status],
                             api_name="inpaint", **model_events)

            with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
                with gr.Row():
                    with gr.Column():
                        source = gr.Image(label="image to edit", elem_id="edit-image", **image_in)
                        instruction = gr.Textbox(label="instruction", value="make the red circle blue",
                                                 elem_id="edit-instruction", **text_box)
                        num = gr.Slider(1, MAX_VARIATIONS, value=2, step=1, label="results")
                        image_guidance = gr.Slider(0, 10, value=0, step=0.5, label="image guidance",
                                                   info="guidance on the source image apart from the instruction's "
                                                        "(InstructPix2Pix); 0 = one scale for both")
                        button = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    with gr.Column():
                        out = gr.Image(label="original | edited", elem_id="edit-out", **{**image_out, "height": 240})
                        status = gr.Markdown(elem_id="edit-info")
                controls = sampling_controls("edit", 16, True, ar)
                gr.on([button.click, instruction.submit], user_errors(demo.edit),
                      [source, instruction, num, image_guidance, *controls], [out, status], api_name="edit",
                      preprocess=False, **model_events)

            with gr.Tab("Text infilling", id="infilling", elem_id="tab-infilling"):
                if ar:
                    gr.Markdown(needs_mdm.format("Text infilling"))
                with gr.Row():
                    with gr.Column():
                        text = gr.Textbox(label=f"text with {BLANK_MARK} where words are missing",
                                          value=f"a large {BLANK_MARK} circle at the top {BLANK_MARK}",
                                          elem_id="infill-text", **text_box)
                        per_blank = gr.Slider(1, 8, value=1, step=1, label="tokens per blank")
                        button = gr.Button("Fill in", variant="primary", elem_id="infill-run", interactive=not ar)
                    with gr.Column():
                        out = gr.Textbox(label="filled in", elem_id="infill-out", interactive=False)
                        status = gr.Markdown(elem_id="infill-info")
                controls = sampling_controls("infill", pipe.layout.text_len, False, ar)
                gr.on([button.click, text.submit], user_errors(demo.infill), [text, per_blank, *controls],
                      [out, status], api_name="infill", **model_events)
    app.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, allow_hosts: Iterable[str] = ()) -> str:
    """Serve `app` on host:port behind `RequestGuard`, in the background; returns its URL. `app.block_thread()`
    waits for Ctrl-C, `app.close()` stops it."""
    import gradio as gr
    from starlette.middleware import Middleware

    names, any_ip = allowed_names(host, allow_hosts)
    font = ["ui-sans-serif", "system-ui", "sans-serif"]  # system fonts: the page fetches nothing from elsewhere
    theme = gr.themes.Default(font=font, font_mono=["ui-monospace", "monospace"])
    app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, prevent_thread_lock=True,
               quiet=True, share=False, show_error=False, theme=theme, css=CSS, footer_links=["api", "settings"],
               app_kwargs={"middleware": [Middleware(RequestGuard, names=names, any_ip=any_ip)]})
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def main(argv: list[str] | None = None, prog: str = "python -m mmdlm.demo") -> int:
    """Serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (written by mmdlm.commands.export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name by which browsers reach the demo, beyond localhost and --host "
                             "(repeatable; e.g. the machine's DNS name behind a proxy)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    try:
        pipe = load_pipeline(args.model, args.device)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    folder = Path(args.model).resolve()
    params = sum(p.numel() for p in pipe.model.parameters())
    app = build_app(pipe, f"Model `{folder.parent.name}/{folder.name}` ({params / 1e6:.1f}M parameters).")
    try:
        url = launch(app, args.host, args.port, args.allow_host)
    except OSError as err:  # the port is taken
        print(f"error: {err}", file=sys.stderr)
        return 2
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL refuses over twice this at open, wherever Gradio opens an image
    print(f"serving on {url}  (Ctrl-C to stop)", flush=True)
    app.block_thread()
    return 0


if __name__ == "__main__":
    sys.exit(main())
