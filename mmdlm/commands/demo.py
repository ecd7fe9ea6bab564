"""The web demo: a Gradio Blocks app with one tab per task, on a model folder, on this machine only by default.

    mmdlm demo --model runs/quickstart/model                  # then open http://127.0.0.1:7860
    mmdlm demo --model DIR --device cpu --host 0.0.0.0 --port 8000 --allow-host demo.lan
    mmdlm demo --model DIR                 # the same command

Tabs (the layout of the MMaDA / Show-o demos): Caption (image -> caption), VQA (image + question -> answer),
Text to image (prompt -> images), Joint (image + caption pairs from nothing), Inpainting (upload an image,
paint over the part to regenerate, optionally say what should be there), Edit (an image and an instruction,
"make the red circle blue" -> the edited image; for a model trained on edits, configs/edits.yaml), Text
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
middleware `RequestGuard` of `mmdlm.demo.guard`): every request must name this server in its Host header
(localhost, the bound address, any IP address when bound to 0.0.0.0, or a name given with `--allow-host`),
and an Origin header, when sent, must be this same server; else 403 with one sentence. Gradio serves with uvicorn on
an event loop: a client that stalls holds a socket, not a thread, so it cannot block other users (but
uvicorn does not drop a connection that never sends a request; nothing in Gradio sets a timeout for it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmdlm.demo.limits import MAX_PIXELS
from mmdlm.inputs import EXIT_OK, EXIT_USAGE, InputError, add_device_argument, add_model_argument, load_pipeline


def main(argv: list[str] | None = None, prog: str = "mmdlm demo") -> int:
    """Serve the demo until Ctrl-C."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_device_argument(parser)
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name by which browsers reach the demo, beyond localhost and --host "
                             "(repeatable; e.g. the machine's DNS name behind a proxy)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    from PIL import Image

    from mmdlm.demo.app import build_app, launch  # loads torch and Gradio: after the arguments are checked

    try:
        pipe = load_pipeline(args.model, args.device)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    folder = Path(args.model).resolve()
    params = sum(p.numel() for p in pipe.model.parameters())
    app = build_app(pipe, f"Model `{folder.parent.name}/{folder.name}` ({params / 1e6:.1f}M parameters).")
    try:
        url = launch(app, args.host, args.port, args.allow_host)
    except OSError as err:  # the port is taken
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # PIL refuses over twice this at open, wherever Gradio opens an image
    print(f"serving on {url}  (Ctrl-C to stop)", flush=True)
    app.block_thread()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
