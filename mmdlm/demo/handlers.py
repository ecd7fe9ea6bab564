"""The web demo's handlers (`Demo`): one method per tab on a loaded pipeline, each checking its inputs
(`mmdlm.demo.limits`), turning the tab's controls into the call's `SamplerConfig`, and returning pictures and
text for the page. Text to image, Joint and Inpainting yield the canvas after every denoising step (a forward
pre-hook on the model reads it; nothing in the sampler changes). A lock serialises model calls.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from mmdlm.demo.limits import MAX_PIXELS, MAX_SIDE, check_number, check_text, open_image
from mmdlm.inputs import InputError
from mmdlm.render import captioned_grid, decode_canvas, make_grid, paint_masked, printable, to_pil

if TYPE_CHECKING:
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig

MAX_IMAGES = 16  # images per text-to-image request
MAX_JOINT = 8  # image+caption pairs per request
MAX_VARIATIONS = 4  # inpainting results per request
MAX_STEPS = 64
MAX_SEED = 2**31 - 1
CANVAS = 256  # pixels of the inpainting canvas (the model's image, upscaled with nearest neighbour)
BLANK_MARK = "[MASK]"  # the pipeline's blank (mmdlm.pipeline.BLANK)
NO_TEXT = "(nothing: the model produced only end-of-text)"


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
