"""The Gradio web demo (`mmdlm.demo`): its handlers on the tiny model, the real server started with
`python -m mmdlm.commands.demo`, and every tab driven in headless Chromium.

The browser test needs Debian's `chromium` and `chromium-driver` (the Makefile installs them) and Selenium;
it is skipped, saying which is missing, only when they are absent. It saves a screenshot of each tab into
a temporary folder, or into $MMDLM_SCREENSHOTS (e.g. docs/img) when set; $MMDLM_DEMO_MODEL serves another
model folder than the tiny one (the docs' screenshots use the quickstart model):

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_demo.py
    MMDLM_SCREENSHOTS=docs/img MMDLM_DEMO_MODEL=runs/quickstart/model python -m pytest -q tests/test_demo.py -k browser
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdlm.commands import demo as demo_command
from mmdlm.demo import app as demo_app
from mmdlm.demo import guard as demo_guard
from mmdlm.demo import handlers as demo_handlers
from mmdlm.inputs import InputError
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.worlds.shapes import make_object, render

REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCENE = [make_object("red", "circle", "large", 0), make_object("blue", "square", "small", 8)]


@pytest.fixture(scope="module")
def handlers(tiny_model_dir: str) -> demo_handlers.Demo:
    return demo_handlers.Demo(MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu"))


@pytest.fixture(scope="module")
def ar_handlers(tiny_model_dir: str, tmp_path_factory) -> demo_handlers.Demo:
    """The tiny model as an autoregressive baseline: the same folder with `causal: true` in its config."""
    folder = tmp_path_factory.mktemp("ar") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["causal"] = True
    (folder / "config.json").write_text(json.dumps(config))
    return demo_handlers.Demo(MMDLMPipeline.from_pretrained(folder, device="cpu"))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    render(SCENE, 32).save(path)
    return path


def painted(editor: dict, box: tuple[int, int, int, int]) -> dict:
    """The ImageEditor value the page sends after painting `box` (x0, y0, x1, y1) on the canvas: RGBA arrays."""
    background = np.asarray(editor["background"].convert("RGBA"))
    layer = np.zeros_like(background)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 0, 255, 255)
    return {"background": background, "layers": [layer], "composite": background}


# ---- handlers, called directly ------------------------------------------------------------------------------
def test_caption_and_answer_return_text(handlers, scene):
    caption, info = handlers.caption(str(scene))
    caption_len = handlers.pipe.layout.caption_len
    assert caption and info == f"done: {caption_len} forward passes" + info.split("forward passes")[1]
    _, info = handlers.caption(str(scene), block_length=1, steps=2)  # fewer steps than blocks: blocks grow
    assert info.startswith("done: 2 forward passes")
    answer, info = handlers.answer({"path": str(scene)}, "what color is the circle?", steps=2, seed=3)
    pipe = handlers.pipe
    expected = pipe.answer([Image.open(scene)], ["what color is the circle?"], steps=2, seed=3).texts[0]
    assert answer == (expected or demo_handlers.NO_TEXT) and info.startswith("done: 2 forward passes")


def test_text_to_image_shows_every_step_then_the_images(handlers):
    frames = list(handlers.text_to_image("a red circle at the top left", num=2, steps=4, guidance=2,
                                         self_correction=True))
    grid_side = 32 * demo_handlers.scale(2)
    pictures = [np.asarray(f[0]) for f in frames]
    assert len(frames) >= 4 + 1 and frames[-1][1].startswith("done: ")  # a frame before each step, then the result
    assert all(p.shape == pictures[0].shape for p in pictures) and pictures[0].shape[0] == grid_side + 4
    first = pictures[0][2:-2, 2:2 + grid_side]  # the first tile, inside the grid's padding
    assert (first == 127).all()  # before the first step every cell is masked: grey (0.5)
    assert frames[0][1] == f"step 1: {2 * handlers.pipe.vq.tokens_per_image} tokens masked"
    sampler = demo_handlers.sampler_config("text_to_image", 4, 1, 0, True, 2)
    assert sampler.self_correction is not None and sampler.steps == 4 and sampler.guidance_scale == 2
    final = handlers.pipe.text_to_image(["a red circle at the top left"] * 2, sampler)
    from mmdlm.render import make_grid, to_pil

    assert (pictures[-1] == np.asarray(to_pil(make_grid(final.images, 2, demo_handlers.scale(2))))).all()


def test_joint_gives_images_and_captions(handlers):
    frames = list(handlers.joint(num=2, steps=3, threshold=0.5))
    sheet, captions, info = frames[-1]
    assert isinstance(sheet, Image.Image) and captions.startswith("1. ") and "\n2. " in captions
    assert info.startswith("done: ") and len(frames) >= 2


def test_inpainting_regenerates_only_the_painted_cells(handlers, scene):
    editor = handlers.inpaint_canvas({"path": str(scene)})
    assert editor["background"].size == (demo_handlers.CANVAS, demo_handlers.CANVAS)
    frames = list(handlers.inpaint(painted(editor, (0, 0, 64, 64)), "", num=1, steps=3))
    assert frames[-1][1].startswith("done: ") and len(frames) >= 2
    side, (_, w) = handlers.pipe.vq.image_size, handlers.pipe.vq.grid
    masked_cells = (64 * side // demo_handlers.CANVAS // (side // w)) ** 2  # the token cells under the painted square
    assert frames[0][1] == f"step 1: {masked_cells} tokens masked"
    with pytest.raises(InputError, match="nothing is painted"):
        next(handlers.inpaint(painted(editor, (0, 0, 0, 0)), ""))
    with pytest.raises(InputError, match="there is no image to inpaint"):
        next(handlers.inpaint(None, ""))


def test_edit_shows_the_original_then_the_edits(handlers, scene):
    strip, info = handlers.edit({"path": str(scene)}, "make the red circle blue", num=2, image_guidance=1.5, steps=3)
    side = 32 * demo_handlers.scale(3)
    assert strip.size == (3 * side + 4 * 2, side + 4) and info.startswith("done: 3 forward passes")
    original = np.asarray(strip)[2:2 + side, 2:2 + side]
    from mmdlm.render import to_pil, upscale

    expected = np.asarray(to_pil(upscale(handlers.pipe.image_tensor([Image.open(scene)]), demo_handlers.scale(3))[0]))
    assert (original == expected).all()
    with pytest.raises(InputError, match="instruction"):
        handlers.edit({"path": str(scene)}, "   ")


def test_infill_fills_the_blanks(handlers):
    text, info = handlers.infill("a large [MASK] circle at the top [MASK]", tokens_per_blank=1, steps=2)
    assert text.startswith("a large") and "[MASK]" not in text and info.startswith("done: ")
    with pytest.raises(InputError, match=r"the text has no blank: write \[MASK\]"):
        handlers.infill("a large red circle")


def test_the_autoregressive_baseline_says_what_it_cannot_do(ar_handlers, scene):
    assert ar_handlers.caption(str(scene))[1].startswith("done: ")
    assert list(ar_handlers.text_to_image("a red circle", num=1))[-1][1].startswith("done: ")
    with pytest.raises(InputError, match="inpainting needs the masked-diffusion model; this model folder is the "
                                         "autoregressive baseline"):
        next(ar_handlers.inpaint(None, ""))
    with pytest.raises(InputError, match="text infilling needs the masked-diffusion model"):
        ar_handlers.infill("a [MASK] circle")


def test_the_app_has_a_tab_per_task_and_disables_what_ar_cannot_do(handlers, ar_handlers):
    for pipe, ar in ((handlers.pipe, False), (ar_handlers.pipe, True)):
        app = demo_app.build_app(pipe)
        by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
        assert {f"tab-{t}" for t in demo_app.TABS} <= set(by_id)
        assert [by_id[f"{t}-run"].interactive for t in ("inpaint", "infill")] == [not ar, not ar]
        api = {d["api_name"] for d in app.config["dependencies"] if d.get("api_name")}
        assert {"caption", "answer", "text_to_image", "joint", "inpaint", "edit", "infill"} <= api


def test_errors_become_one_sentence_for_the_page():
    import gradio as gr

    def bad(kind: type[Exception]):
        raise kind("the prompt is 80 tokens, longer than the model's limit of 20")

    with pytest.raises(gr.Error) as err:
        demo_app.user_errors(bad)(ValueError)
    assert err.value.message == "the prompt is 80 tokens, longer than the model's limit of 20"
    with pytest.raises(gr.Error) as err:
        demo_app.user_errors(bad)(RuntimeError)
    assert err.value.message == ("internal error: RuntimeError: the prompt is 80 tokens, longer than the model's "
                                 "limit of 20")

    def gen():
        yield 1
        raise InputError("the text is empty")

    wrapped = demo_app.user_errors(gen)
    with pytest.raises(gr.Error) as err:
        list(wrapped())
    assert err.value.message == "the text is empty"


def test_cli_rejects_a_missing_model_and_a_bad_port(tmp_path, capsys):
    assert demo_command.main(["--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model folder {str(tmp_path / 'nothing')!r} does not exist"
    with pytest.raises(SystemExit) as exit_info:
        demo_command.main(["--model", str(tmp_path), "--port", "70000"])
    assert exit_info.value.code == 2 and "--port must be 1-65535" in capsys.readouterr().err


# ---- the real server -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: str, tmp_path_factory) -> Iterator[str]:
    """`python -m mmdlm.commands.demo` on a free port (default host: 127.0.0.1); its URL."""
    model = os.environ.get("MMDLM_DEMO_MODEL") or tiny_model_dir
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    log = tmp_path_factory.mktemp("log") / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mmdlm.commands.demo", "--model", model, "--port", str(port),
                                 "--device", "cpu"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not start: {log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def http(url: str, headers: dict | None = None, data: bytes | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers or {}), timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def test_server_refuses_foreign_hosts_origins_and_huge_bodies(server):
    port = server.rsplit(":", 1)[1]
    status, body = http(server + "/", {"Host": f"evil.example:{port}"})  # DNS rebinding
    assert status == 403
    assert body.strip() == (f"the Host header 'evil.example:{port}' does not name this server; start the demo with "
                            f"--allow-host evil.example if you reach it by that name")
    status, body = http(server + "/gradio_api/info", {"Origin": "http://evil.example"})
    assert status == 403 and body.startswith("cross-origin requests are refused")
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:  # the headers alone: no body
        sock.sendall(f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Content-Length: {100 * 2**20}\r\n\r\n".encode())
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 413") and f"the demo accepts at most {demo_guard.MAX_BODY}" in reply


def test_cli_says_so_when_the_port_is_taken(server, tiny_model_dir, capsys):
    port = server.rsplit(":", 1)[1]
    assert demo_command.main(["--model", tiny_model_dir, "--port", port, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(f"error: Cannot find empty port in range: {port}-{port}.")


def test_server_answers_through_the_gradio_api_with_one_sentence_errors(server, scene, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server + "/", verbose=False)
    answer, info = client.predict(handle_file(str(scene)), "what shape?", 2, 0, 0, 0, False, 0, api_name="/answer")
    assert answer and info.startswith("done: 2 forward passes")
    start = time.perf_counter()
    with pytest.raises(AppError, match=r"^the prompt is \d+ characters long; the demo accepts at most 1000$"):
        client.predict("a red circle " * (8 * 2**20 // 13), 1, 2, 0, 1, 0, False, 0, api_name="/text_to_image")
    assert time.perf_counter() - start < 3  # 8 MiB of text (~0.2 s): refused before anything tokenizes it
    with pytest.raises(AppError, match="longer than the model's limit"):
        client.predict("a" * 1000, 1, 2, 0, 1, 0, False, 0, api_name="/text_to_image")
    big = tmp_path / "big.png"
    Image.new("1", (10_000, 10_000)).save(big, optimize=True)
    with pytest.raises(AppError, match="^the image has 100000000 pixels; the demo accepts at most 16777216"):
        client.predict(handle_file(str(big)), 4, 24, 0, 0, 0, False, 0, api_name="/caption")


# ---- every tab in headless Chromium ---------------------------------------------------------------------------
def browser():
    """Headless Debian Chromium through its own chromedriver (nothing is downloaded)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless browser test: Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; `make test` does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_browser_every_tab_returns_an_output(server, scene, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    shots = Path(os.environ.get("MMDLM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    driver = browser()
    wait = WebDriverWait(driver, 60, poll_frequency=0.1)

    def js(script: str, *args):
        return driver.execute_script(script, *args)

    def toast() -> str:
        return js("return Array.from(document.querySelectorAll('.toast-body')).map(e => e.innerText).join(' | ')")

    def wait_done(info_id: str) -> str:
        """Wait for the tab's status line to say done; fail at once with the error if the page shows one."""
        def check(_):
            if toast():
                pytest.fail(f"{info_id}: the page shows an error: {toast()}")
            return "done:" in driver.find_element(By.ID, info_id).text
        wait.until(check)
        return driver.find_element(By.ID, info_id).text

    def click(elem_id: str) -> None:
        wait.until(expected_conditions.element_to_be_clickable((By.ID, elem_id))).click()

    def value(elem_id: str) -> str:
        return js(f"return document.querySelector('#{elem_id} textarea, #{elem_id} input').value")

    def image_src(elem_id: str) -> str | None:
        return js(f"const e = document.querySelector('#{elem_id} img'); return e ? e.src : null")

    def open_tab(name: str) -> None:
        [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == TAB_NAMES[name]][0].click()
        wait.until(lambda _: driver.find_element(By.ID, f"tab-{name}").is_displayed())

    def upload(elem_id: str, path: Path) -> None:
        driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=file]").send_keys(str(path))
        wait.until(lambda _: image_src(elem_id))

    def shot(name: str) -> None:
        js("window.scrollTo(0, 0)")
        driver.save_screenshot(str(shots / f"demo-{name}.png"))

    try:
        driver.get(server + "/")
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#caption-image input[type=file]"))
        click("caption-run")  # with no image yet: a missing input is one sentence in the page, not a traceback
        wait.until(lambda _: toast())
        assert "there is no image: upload one first" in toast()
        for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):
            close.click()
        wait.until(lambda _: not toast())

        upload("caption-image", scene)
        click("caption-run")
        wait_done("caption-info")
        assert value("caption-out")
        shot("caption")

        open_tab("vqa")
        upload("vqa-image", scene)
        click("vqa-run")
        wait_done("vqa-info")
        assert value("vqa-out")
        shot("vqa")

        open_tab("text-to-image")
        js("""window.frames_seen = new Set();
              new MutationObserver(() => { const i = document.querySelector('#t2i-out img');
                                           if (i) window.frames_seen.add(i.src); })
                  .observe(document.querySelector('#t2i-out'), {subtree: true, childList: true, attributes: true});""")
        click("t2i-run")
        info = wait_done("t2i-info")
        assert image_src("t2i-out") and info.startswith("done: ")
        assert js("return window.frames_seen.size") >= 2  # live: the canvas was shown before the result
        shot("text-to-image")

        open_tab("joint")
        click("joint-run")
        wait_done("joint-info")
        assert image_src("joint-out") and value("joint-captions").startswith("1. ")
        shot("joint")

        open_tab("inpainting")
        upload("inpaint-image", scene)
        time.sleep(0.5)  # the upload's event fills the canvas: wait until it is idle
        wait.until(lambda _: "hide" in driver.find_element(
            By.CSS_SELECTOR, "#inpaint-canvas [data-testid=status-tracker]").get_attribute("class"))
        time.sleep(0.5)
        canvas = driver.find_elements(By.CSS_SELECTOR, "#inpaint-canvas canvas")[-1]
        d = canvas.size["height"] // 8  # paint over the top-left object (offsets from the canvas's centre)
        ActionChains(driver).move_to_element_with_offset(canvas, -3 * d, -3 * d).click_and_hold() \
            .move_by_offset(d, 0).move_by_offset(0, d).move_by_offset(-d, 0).release().perform()
        click("inpaint-run")
        wait_done("inpaint-info")
        assert image_src("inpaint-out")
        shot("inpainting")

        open_tab("edit")
        upload("edit-image", scene)
        click("edit-run")
        wait_done("edit-info")
        assert image_src("edit-out")
        shot("edit")

        open_tab("infilling")
        click("infill-run")
        wait_done("infill-info")
        assert value("infill-out") and "[MASK]" not in value("infill-out")
        shot("infilling")
    finally:
        driver.quit()
    assert sorted(p.name for p in shots.glob("demo-*.png")) == sorted(f"demo-{t}.png" for t in demo_app.TABS)


TAB_NAMES = {"caption": "Caption", "vqa": "VQA", "text-to-image": "Text to image", "joint": "Joint",
             "inpainting": "Inpainting", "edit": "Edit", "infilling": "Text infilling"}
