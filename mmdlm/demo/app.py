"""The web demo's page: a Gradio Blocks app with one tab per task on `mmdlm.demo.handlers.Demo`, each with
the sampler's controls where they apply, and `launch`, which serves it behind `mmdlm.demo.guard.RequestGuard`.
A handler's bad input becomes a one-sentence error toast (`user_errors`), never a traceback.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mmdlm.demo.guard import MAX_UPLOAD, RequestGuard, allowed_names
from mmdlm.demo.handlers import (
    BLANK_MARK,
    CANVAS,
    MAX_IMAGES,
    MAX_JOINT,
    MAX_SEED,
    MAX_STEPS,
    MAX_VARIATIONS,
    Demo,
)
from mmdlm.demo.limits import MAX_SIDE, MAX_TEXT_CHARS

if TYPE_CHECKING:
    import gradio as gr

    from mmdlm.pipeline import MMDLMPipeline

MAX_QUEUE = 16  # requests waiting for the model
CSS = ".pixelated img {image-rendering: pixelated; object-fit: contain; width: 100%; height: 100%}"
TABS = ("caption", "vqa", "text-to-image", "joint", "inpainting", "edit", "infilling")  # elem_id "tab-<name>"


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
    """The Gradio Blocks app on `pipe`: one tab per task (`mmdlm.commands.demo` describes them)."""
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
