"""A web page to talk to a BLIP-2 x InternLM2 model about an image (gradio).

    python -m lavis_ext.app                     # the model `make demo` trained (make app)
    python -m lavis_ext.app --cfg-path PROJECT.yaml [--checkpoint CKPT] [--port 7860]
    python -m lavis_ext.app --model-type pretrain_internlm2_chat_1_8b --checkpoint CKPT

Upload an image, caption it in English or Chinese, and chat about it (or without one: text only),
with the answers streamed and the generation options at hand. The model, its settings and the
flags are the terminal chat's (:mod:`lavis_ext.chat`).

It serves on 127.0.0.1 unless ``--host`` says otherwise and shares publicly only with ``--share``.
Uploads are limited (``--max-upload-mb``, ``--max-image-pixels``); a file that is not an image
gets a message in the page. Requests queue and run one at a time on the one model, so several
tabs are all answered in turn. Nothing is fetched at run time (gradio's analytics are off).
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: it reads it then

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from lavis_ext.chat import (  # noqa: E402
    CAPTION_LANGUAGES, ChatModel, GenerationSettings, add_model_arguments, caption, model_from_args, stream_answer)
from lavis_ext.cli import USER_ERRORS, error_line, exit_on_bad_input  # noqa: E402
from lavis_ext.datasets.base import DEFAULT_MAX_IMAGE_PIXELS, open_rgb_image  # noqa: E402

TITLE = "BLIP-2 x InternLM2"
QUEUE_SIZE = 64  # waiting requests beyond this are refused with a message
NO_IMAGE = "No image: the chat is text only. Upload one to talk about it."


class ChatApp:
    """The page's handlers around one loaded model. Per-tab state (the processed image and the
    ``(question, answer)`` turns) lives in gradio ``State``s, so tabs do not see each other's."""

    def __init__(self, loaded: ChatModel, max_image_pixels: int):
        self.loaded = loaded
        self.max_image_pixels = max_image_pixels

    def settings(self, num_beams, max_new_tokens, do_sample, temperature, top_p) -> GenerationSettings:
        return self.loaded.settings.replace(num_beams=int(num_beams), max_new_tokens=int(max_new_tokens),
                                            do_sample=bool(do_sample), temperature=float(temperature),
                                            top_p=float(top_p))

    def upload(self, path: str | None):
        """A new image (or none): preview, status, and a new conversation."""
        if path is None:
            return None, None, NO_IMAGE, [], [], ""
        name = os.path.basename(path)
        try:
            picture = open_rgb_image(path, self.max_image_pixels, limit_name="--max-image-pixels")
        except USER_ERRORS as exc:  # the message names the upload, not gradio's copy of it
            return None, None, f"**Not an image we can read:** {error_line(exc).replace(path, name)}", [], [], ""
        return (self.loaded.processor(picture), picture,
                f"Image {name}: {picture.width}x{picture.height}. Ask about it, or caption it.", [], [], "")

    def caption(self, image: torch.Tensor | None, language: str, *options) -> str:
        if image is None:
            return "(upload an image to caption it)"
        return caption(self.loaded.model, image, language, self.settings(*options))

    def answer(self, question: str, history: list, image: torch.Tensor | None, *options):
        """Stream the answer into the chat; ``history`` holds ``(question, answer)`` turns."""
        question = question.strip()
        if not question:
            yield messages(history), history, ""
            return
        answer = ""
        for answer in stream_answer(self.loaded.model, image, history, question, self.settings(*options)):
            yield messages(history) + messages([(question, answer)]), history, ""
        history = [*history, (question, answer)]
        yield messages(history), history, ""


def messages(turns: list) -> list[dict]:
    """``(question, answer)`` turns as the chatbot's messages."""
    return [message for question, answer in turns
            for message in ({"role": "user", "content": question}, {"role": "assistant", "content": answer})]


def build_page(app: ChatApp) -> gr.Blocks:
    settings = app.loaded.settings
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE}\nModel: {app.loaded.description}", elem_id="model")
        image_state, history_state = gr.State(None), gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Image", file_types=["image"], elem_id="upload", height=120)
                preview = gr.Image(label="Preview", type="pil", interactive=False, height=220, elem_id="preview",
                                   buttons=["fullscreen"])
                status = gr.Markdown(NO_IMAGE, elem_id="status")
                with gr.Row():
                    language = gr.Radio(list(CAPTION_LANGUAGES), value="en", label="Caption language",
                                        elem_id="language")
                    caption_button = gr.Button("Caption", elem_id="caption-button")
                caption_box = gr.Textbox(label="Caption", interactive=False, elem_id="caption")
                with gr.Accordion("Generation options", open=False):
                    options = [
                        gr.Slider(1, 8, value=settings.num_beams, step=1, label="Beams (1 streams token by token)"),
                        gr.Slider(1, 256, value=settings.max_new_tokens, step=1, label="Max new tokens"),
                        gr.Checkbox(value=settings.do_sample, label="Sample (top-p) instead of beam search"),
                        gr.Slider(0.05, 2.0, value=settings.temperature, step=0.05, label="Temperature"),
                        gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p"),
                    ]
            with gr.Column(scale=3):
                # answers shown as the model wrote them (markdown would turn "*" or "_" into formatting)
                chatbot = gr.Chatbot(label="Chat", elem_id="chatbot", height=420, render_markdown=False,
                                     feedback_options=None, buttons=["copy", "copy_all"])
                question = gr.Textbox(label="Question", placeholder="Ask about the image (Enter sends)",
                                      elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("New conversation", elem_id="clear")
        upload.change(app.upload, upload, [image_state, preview, status, history_state, chatbot, caption_box])
        caption_button.click(app.caption, [image_state, language, *options], caption_box)
        for event in (send.click, question.submit):
            event(app.answer, [question, history_state, image_state, *options], [chatbot, history_state, question])
        clear.click(lambda: ([], []), None, [chatbot, history_state])
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)  # one model: one request at a time
    return page


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Web page to chat with a BLIP-2 x InternLM2 model about an image.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted (MB)")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest image decoded (width x height)")
    return parser.parse_args(argv)


def serve(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    """Load the model, build the page and serve it; with ``block`` False, return the running page
    (``page.close()`` stops it)."""
    loaded = model_from_args(args)
    page = build_page(ChatApp(loaded, args.max_image_pixels))
    _, url, _ = page.launch(server_name=args.host, server_port=args.port, share=args.share, quiet=True,
                            show_error=True, max_file_size=int(args.max_upload_mb * 2**20), prevent_thread_lock=True)
    print(f"serving {loaded.description} at {url}", flush=True)
    if block:
        page.block_thread()
    return page


def main(argv: list[str] | None = None) -> None:
    exit_on_bad_input(lambda a: serve(parse_args(a)), argv)


if __name__ == "__main__":
    main()
