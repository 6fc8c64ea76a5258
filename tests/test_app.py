"""The web app (``python -m lavis_ext.app``) in a real browser: Debian's chromium, headless,
driven by playwright, against the app serving a tiny trained model on a free local port.

What the page shows must be what the model's own methods give for the same image and question
(``predict_answers``, ``chat``, ``generate``). A screenshot is saved as ``app.png`` in the test's
output dir.
"""
from __future__ import annotations

import shutil
import socket

import pytest
import torch
from chat_fixtures import QA, trained_chat  # noqa: F401  (fixture)
from lavis.models import load_model
from lavis.processors.blip_processors import BlipImageEvalProcessor
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from lavis_ext import app
from lavis_ext.text_zh import CAPTION_PROMPT_ZH

CHROMIUM = "/usr/bin/chromium"  # Debian's package (make venv installs it); playwright's download is unreachable
# as root, without a sandbox; no connections beyond the page (the closed network refuses them)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
SETTINGS = {"num_beams": 1, "max_len": 24}  # the app's --num-beams 1 --max-new-tokens 24, as predict_answers takes them
TIMEOUT_MS = 20_000
UPLOAD_LIMIT_KB = 8  # the test images are ~200 bytes
# gradio 6.17.3 names starlette's renamed 422 constant on every queued request
pytestmark = pytest.mark.filterwarnings("ignore:'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_env(tiny_parts, tiny_llm):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAVIS_EXT_BERT", str(tiny_parts["bert"]))
        patch.setenv("LAVIS_EXT_VIT", str(tiny_parts["vit"]))
        patch.setenv("LAVIS_EXT_TINY_LLM", str(tiny_llm))
        patch.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)
        yield


@pytest.fixture(scope="module")
def url(tiny_env, trained_chat):  # noqa: F811
    port = free_port()
    page = app.serve(app.parse_args(["--model-type", "tiny", "--checkpoint", str(trained_chat["checkpoint"]),
                                     "--port", str(port), "--num-beams", "1", "--max-new-tokens", "24",
                                     "--max-upload-mb", str(UPLOAD_LIMIT_KB / 1024)]), block=False)
    yield f"http://127.0.0.1:{port}/"
    page.close()


@pytest.fixture(scope="module")
def model(tiny_env, trained_chat):  # noqa: F811
    """The same checkpoint, loaded as LAVIS loads any model."""
    return load_model("blip2_internlm", "tiny", is_eval=True, checkpoint=str(trained_chat["checkpoint"]))


@pytest.fixture(scope="module")
def browser():
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: `make venv` (and so `make test`) installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def pixels(model, path) -> torch.Tensor:
    return BlipImageEvalProcessor(image_size=model.config.image_size)(Image.open(path).convert("RGB"))[None]


def predict(model, path, question: str) -> str:
    (answer,) = model.predict_answers({"image": pixels(model, path), "text_input": [question]}, **SETTINGS)
    return answer


def open_page(browser, url: str, hosts: set[str]):
    """A new tab (its own session) on the app; every host it contacts goes into ``hosts``."""
    page = browser.new_context(viewport={"width": 1280, "height": 860}).new_page()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2]))
    page.goto(url)
    return page


def upload(page, path, status: str) -> None:
    page.set_input_files("#upload input[type=file]", str(path))
    expect(page.locator("#status")).to_contain_text(status, timeout=TIMEOUT_MS)


def ask(page, question: str) -> None:
    page.fill("#question textarea", question)
    page.click("#send")


def last_answer(page):
    return page.locator("#chatbot [data-testid=bot]").last


def test_caption_and_chat_in_the_page_are_the_models(browser, url, model, trained_chat, tmp_path):  # noqa: F811
    hosts: set[str] = set()
    page = open_page(browser, url, hosts)
    red = trained_chat["red"]
    upload(page, red, "Image red.png: 32x32")

    page.click("#caption-button")
    (english,) = model.generate({"image": pixels(model, red)}, num_beams=1, max_length=24)
    expect(page.locator("#caption textarea")).to_have_value(english, timeout=TIMEOUT_MS)
    page.get_by_label("zh").check()
    page.click("#caption-button")
    (chinese,) = model.generate({"image": pixels(model, red), "prompt": [CAPTION_PROMPT_ZH]}, num_beams=1,
                                max_length=24)
    expect(page.locator("#caption textarea")).to_have_value(chinese, timeout=TIMEOUT_MS)

    first = predict(model, red, "what colour is it?")
    ask(page, "what colour is it?")
    expect(last_answer(page)).to_have_text(first, timeout=TIMEOUT_MS)
    second = model.chat(pixels(model, red), [("what colour is it?", first)], "say it again",
                        num_beams=1, max_new_tokens=24)
    ask(page, "say it again")  # the second turn sees the first
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(2, timeout=TIMEOUT_MS)
    expect(last_answer(page)).to_have_text(second, timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "app.png")
    # the trained model's words: the page shows text a reader can check, not byte soup
    assert (english, chinese, first, second) == ("a red circle", "一个红色的圆形", "red", "red again")
    assert hosts == {url.split("/")[2]}  # nothing fetched from anywhere else


def test_a_broken_upload_is_a_message_in_the_page(browser, url, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image, whatever the name says\n")
    page = open_page(browser, url, set())
    upload(page, notes, "Not an image we can read")
    expect(page.locator("#status")).to_contain_text("cannot decode image notes.png")
    ask(page, "still there?")  # the page goes on: a text-only chat
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(1, timeout=TIMEOUT_MS)


def test_an_upload_over_the_limit_is_refused_in_the_page(browser, url, tmp_path):
    large = tmp_path / "large.png"
    noise = torch.randint(0, 256, (128, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.numpy()).save(large)
    assert large.stat().st_size > UPLOAD_LIMIT_KB * 1024
    page = open_page(browser, url, set())
    page.set_input_files("#upload input[type=file]", str(large))
    expect(page.get_by_text("exceed the maximum allowed size")).to_be_visible(timeout=TIMEOUT_MS)
    expect(page.locator("#status")).to_contain_text("No image")


def test_two_tabs_at_once_both_get_their_answers(browser, url, model, trained_chat):  # noqa: F811
    tabs = {colour: open_page(browser, url, set()) for colour in ("red", "blue")}
    for colour, page in tabs.items():
        upload(page, trained_chat[colour], f"Image {colour}.png")
    for page in tabs.values():  # both queued before either is answered
        ask(page, "what colour is it?")
    for colour, page in tabs.items():
        expected = predict(model, trained_chat[colour], "what colour is it?")
        expect(last_answer(page)).to_have_text(expected, timeout=TIMEOUT_MS)
        assert expected == colour
