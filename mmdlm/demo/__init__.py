"""The web demo as a library: a Gradio app with one tab per task on a model folder, served behind its own
request checks. `mmdlm demo` (`mmdlm.commands.demo`) parses the command line and serves it.

    from mmdlm.demo import build_app, launch
    url = launch(build_app(pipe), host="127.0.0.1", port=7860)      # serves in the background

- `limits`: the limits on user inputs (text length, image size and format, numbers) and their checks.
- `guard`: who may call (Host and Origin headers) and how large a request body may be (`RequestGuard`).
- `handlers`: `Demo`, one method per tab on a pipeline, with the live denoising canvas.
- `app`: the Gradio layout (`build_app`) and `launch`.

The names below load their module on first use (PEP 562), so `mmdlm.demo.guard` does not load torch or Gradio.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_app": "app", "launch": "app", "user_errors": "app",
    "RequestGuard": "guard", "allowed_names": "guard", "check_request": "guard",
    "Demo": "handlers", "sampler_config": "handlers",
    "TooLarge": "limits", "check_number": "limits", "check_text": "limits", "open_image": "limits",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdlm.demo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmdlm.demo.{_EXPORTS[name]}"), name)
