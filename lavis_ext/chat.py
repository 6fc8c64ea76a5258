"""Talk to a BLIP-2 x InternLM2 model in the terminal.

    python -m lavis_ext.chat [--image PATH]                       # the model `make demo` trained
    python -m lavis_ext.chat --cfg-path PROJECT.yaml [--checkpoint CKPT] [--image PATH]
    python -m lavis_ext.chat --model-type pretrain_internlm2_chat_1_8b --checkpoint CKPT

Type a question and the answer streams in. ``/image PATH`` switches the image (and starts a new
conversation), ``/reset`` clears the history, ``/caption [en|zh]`` captions the image, ``/help``
lists the commands, and Ctrl-D leaves. Without an image the chat is text only.

Generation follows the project yaml's ``run`` section as ``evaluate.py`` passes it to
``predict_answers`` (``num_beams``, ``max_len``, ``min_len``, ``length_penalty``, ``prompt``), so a
first question gets the answer the evaluation predicts; flags override it. Beam search cannot
stream (transformers refuses a streamer with it): with ``--num-beams`` above 1 an answer comes whole.

This module also holds what the web app (:mod:`lavis_ext.app`) shares with the CLI: loading the
model (:func:`load_chat_model`, :func:`model_from_args`), the generation settings, reading an
image, captions, and :func:`stream_answer`, all around ``Blip2InternLM.chat``.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from lavis_ext.cli import DEBUG_ENV, USER_ERRORS, check_model_section, error_line, exit_on_bad_input
from lavis_ext.datasets.base import DEFAULT_MAX_IMAGE_PIXELS, open_rgb_image
from lavis_ext.errors import ConfigError
from lavis_ext.text_zh import CAPTION_PROMPT_ZH

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "output" / "demo"  # where `make demo` writes (python -m lavis_ext.demo --output)
NO_MODEL = ("no model to serve: run `make demo` to train the demo model into output/demo "
            "(or pass --demo-dir), or pass --cfg-path or --model-type with --checkpoint")
CAPTION_LANGUAGES = ("en", "zh")
ARCH = "blip2_internlm"  # the model class with ``chat``


# --------------------------------------------------------------------------- generation settings


@dataclass
class GenerationSettings:
    """How ``Blip2InternLM.chat`` generates; ``template`` None is the model's ``qa_prompt``."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    length_penalty: float = 1.0
    template: str | None = None

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"generation: num_beams {self.num_beams} and max_new_tokens {self.max_new_tokens} must "
                              f"be at least 1, and min_new_tokens {self.min_new_tokens} within 0..max_new_tokens")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"generation: temperature {self.temperature} must be positive and top_p "
                              f"{self.top_p} in (0, 1]")
        if self.template is not None and "{}" not in self.template:
            raise ConfigError(f"generation: the question template {self.template!r} has no {{}} for the question")

    @classmethod
    def from_run_config(cls, run) -> GenerationSettings:
        """The settings ``evaluate.py``'s VQA task passes to ``predict_answers`` (``run.num_beams``,
        ``max_len``, ``min_len``, ``length_penalty``, ``prompt``); missing keys keep the defaults."""
        keys = {"num_beams": "num_beams", "max_new_tokens": "max_len", "min_new_tokens": "min_len",
                "length_penalty": "length_penalty", "template": "prompt"}
        values = {name: run[key] for name, key in keys.items() if run.get(key) not in (None, "")}
        return cls(**values)

    def replace(self, **changes) -> GenerationSettings:
        """A copy with the ``changes`` that are not None."""
        return GenerationSettings(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``Blip2InternLM.chat`` and (renamed) ``generate``."""
        return asdict(self)

    @property
    def streams(self) -> bool:
        """Greedy decoding and sampling stream token by token; beam search cannot."""
        return self.do_sample or self.num_beams == 1


# --------------------------------------------------------------------------- the model


@dataclass
class ChatModel:
    """A loaded model, its image processor, its default settings and a one-line description."""

    model: torch.nn.Module
    processor: object
    settings: GenerationSettings
    description: str


def demo_model(demo_dir: Path) -> tuple[Path, Path] | None:
    """``(eval yaml, checkpoint)`` of the model ``make demo`` trained under ``demo_dir``, if it did:
    the newest stage-2 ``checkpoint_last.pth``, with the demo's zero-shot VQA yaml, as
    :func:`lavis_ext.demo.pipeline.vqa_accuracy` evaluates it. Sets the variables that yaml reads."""
    from lavis_ext.demo.pipeline import VQA_YAML, demo_env

    checkpoints = sorted((demo_dir / "demo" / "pretrain_stage2").glob("*/checkpoint_last.pth"),
                         key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        return None
    os.environ.update(demo_env(demo_dir, {part: demo_dir / part for part in ("bert", "vit", "llm")}))
    return VQA_YAML, checkpoints[-1]


def load_chat_model(cfg_path: str | Path | None = None, model_type: str | None = None,
                    checkpoint: str | Path | None = None, device: str = "auto") -> ChatModel:
    """A ``blip2_internlm`` model as a project yaml (``cfg_path``: its ``model`` section on its
    model type's defaults, and its ``run`` section's generation settings) or a bare ``model_type``
    builds it, with the weights of ``checkpoint`` (else what the yaml loads)."""
    from lavis.common.registry import registry
    from lavis.processors.blip_processors import BlipImageEvalProcessor
    from omegaconf import OmegaConf

    if cfg_path is not None:
        project = OmegaConf.load(cfg_path)
        if not project.get("model"):
            raise ConfigError(f"{cfg_path}: no model section")
    elif model_type is not None:
        project = OmegaConf.create({"model": {"arch": ARCH, "model_type": model_type}})
    else:
        raise ConfigError("load_chat_model: give cfg_path or model_type")
    if model_type is not None:
        project.model.model_type = model_type
    if project.model.arch != ARCH:
        raise ConfigError(f"model.arch = {project.model.arch!r} ({cfg_path}): the chat needs {ARCH!r}")
    check_model_section(project.model, cfg_path or "--model-type")
    model_cls = registry.get_model_class(ARCH)
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(project.model.model_type)).model, project.model)
    if checkpoint is not None:
        cfg.finetuned, cfg.load_finetuned = str(checkpoint), True
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)  # what the checkpoint does not hold (a ViT without weights) is the same in every run
    model = model_cls.from_config(cfg).eval().to(device)
    weights = cfg.finetuned if cfg.get("load_finetuned") else cfg.get("pretrained")
    description = (f"{project.model.model_type} from {cfg_path or 'its model yaml'}, weights "
                   f"{weights or 'as initialised (no checkpoint)'}, on {device}")
    return ChatModel(model, BlipImageEvalProcessor(image_size=model.config.image_size),
                     GenerationSettings.from_run_config(project.get("run") or {}), description)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the model and its generation settings (CLI and web app)."""
    parser.add_argument("--cfg-path", help="project yaml: its model section and run section's generation "
                                           "settings (default: the model `make demo` trained)")
    parser.add_argument("--model-type", help="a blip2_internlm model type (its yaml under lavis_ext/configs)")
    parser.add_argument("--checkpoint", help="a blip2_internlm checkpoint (.pth) to load")
    parser.add_argument("--demo-dir", type=Path, default=DEMO_DIR, help="where `make demo` wrote its output")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--num-beams", type=int, help="beams (1: greedy, streams token by token)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--min-new-tokens", type=int)
    parser.add_argument("--sample", dest="do_sample", action="store_true", default=None,
                        help="sample (top-p) instead of beam search")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--length-penalty", type=float)
    parser.add_argument("--debug", action="store_true", help=f"print tracebacks of errors (or set {DEBUG_ENV}=1)")


def model_from_args(args: argparse.Namespace) -> ChatModel:
    """The model the flags name, or the demo's; flags override its generation settings."""
    cfg_path, checkpoint = args.cfg_path, args.checkpoint
    if cfg_path is None and args.model_type is None:
        found = demo_model(args.demo_dir)
        if found is None:
            raise ConfigError(NO_MODEL)
        cfg_path, demo_checkpoint = found
        checkpoint = checkpoint or demo_checkpoint
    loaded = load_chat_model(cfg_path, args.model_type, checkpoint, args.device)
    overrides = {f.name: getattr(args, f.name, None) for f in fields(GenerationSettings)}
    loaded.settings = loaded.settings.replace(**overrides)
    return loaded


# --------------------------------------------------------------------------- images, captions, answers


def read_image(path: str | Path, processor, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The processed image ``[3, H, W]`` of a file; a missing, too large or broken file raises
    ``DataError`` in one line."""
    return processor(open_rgb_image(str(path), max_pixels, limit_name="the pixel limit"))


def caption(model, image: torch.Tensor, language: str, settings: GenerationSettings) -> str:
    """A caption of ``image`` as the captioning task makes it: the model's caption prompt for English,
    ``一张图片的描述：`` (through the chat format, for chat models) for Chinese."""
    if language not in CAPTION_LANGUAGES:
        raise ConfigError(f"caption language {language!r}: expected one of {list(CAPTION_LANGUAGES)}")
    prompt = model.config.prompt if language == "en" else model.format_question(CAPTION_PROMPT_ZH, "{}")
    (text,) = model.generate({"image": image.reshape(1, *image.shape[-3:]).to(model.device), "prompt": [prompt]},
                             use_nucleus_sampling=settings.do_sample, num_beams=settings.num_beams,
                             max_length=settings.max_new_tokens, min_length=settings.min_new_tokens,
                             top_p=settings.top_p, temperature=settings.temperature,
                             length_penalty=settings.length_penalty)
    return text


class AnswerStreamer(BaseStreamer):
    """Takes the ids ``generate`` streams (batch 1) and queues the answer so far, decoded as
    ``chat`` decodes its answer (:meth:`Blip2InternLM.decode_answer`)."""

    def __init__(self, model):
        self.model = model
        self.ids: list[int] = []
        self.prompt_seen = False
        self.answers: queue.Queue = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt's ids (none, with inputs_embeds)
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        answer = self.model.decode_answer(self.ids)
        if not answer.endswith("\ufffd"):  # not in the middle of a character's bytes (byte fallback)
            self.answers.put(answer)

    def end(self) -> None:
        pass


_DONE = object()


def stream_answer(model, image: torch.Tensor | None, history: list[tuple[str, str]], question: str,
                  settings: GenerationSettings) -> Iterator[str]:
    """The answer so far as tokens come (it may change as it grows: a final period is trimmed
    until more follows), then ``model.chat``'s answer. Beam search yields that answer only."""
    if not settings.streams:
        yield model.chat(image, history, question, **settings.generate_kwargs())
        return
    streamer = AnswerStreamer(model)
    result: dict = {}

    def generate():
        try:
            result["answer"] = model.chat(image, history, question, streamer=streamer, **settings.generate_kwargs())
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc
        finally:
            streamer.answers.put(_DONE)

    thread = threading.Thread(target=generate, name="generate", daemon=True)
    thread.start()
    while (text := streamer.answers.get()) is not _DONE:
        yield text
    thread.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"]


# --------------------------------------------------------------------------- the terminal chat

HELP = """commands: /image PATH (switch the image, new conversation), /reset (clear the history),
/caption [en|zh] (caption the image), /help, Ctrl-D (leave); anything else is a question"""


class TerminalChat:
    """One conversation in the terminal: the current image and the ``(question, answer)`` turns."""

    def __init__(self, loaded: ChatModel, out=sys.stdout):
        self.loaded = loaded
        self.out = out
        self.image: torch.Tensor | None = None
        self.history: list[tuple[str, str]] = []

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def set_image(self, path: str) -> None:
        """Switch to the image at ``path``; a bad file is one line, and the old image stays."""
        try:
            self.image = read_image(path, self.loaded.processor)
        except USER_ERRORS as exc:
            self.say(f"error: {error_line(exc)}")
            return
        self.history = []
        self.say(f"image: {path} (new conversation)")

    def handle(self, line: str) -> None:
        """One line of input: a command or a question."""
        line = line.strip()
        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if not line:
            return
        if command == "/image":
            self.set_image(argument) if argument else self.say("usage: /image PATH")
        elif command == "/reset":
            self.history = []
            self.say("history cleared")
        elif command == "/caption":
            if self.image is None:
                self.say("no image: /image PATH first")
            elif (argument or "en") not in CAPTION_LANGUAGES:
                self.say(f"usage: /caption [{'|'.join(CAPTION_LANGUAGES)}]")
            else:
                self.say(caption(self.loaded.model, self.image, argument or "en", self.loaded.settings))
        elif command == "/help":
            self.say(HELP)
        elif command.startswith("/"):
            self.say(f"unknown command {command}; {HELP}")
        else:
            self.ask(line)

    def ask(self, question: str) -> None:
        """Stream the answer: new text as it extends what is shown (a changed answer starts a new line)."""
        shown = answer = ""
        for answer in stream_answer(self.loaded.model, self.image, self.history, question, self.loaded.settings):
            if answer.startswith(shown):
                self.say(answer[len(shown):], end="")
            else:
                self.say("\n" + answer, end="")
            shown = answer
        self.say()
        self.history.append((question, answer))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a BLIP-2 x InternLM2 model about an image.")
    add_model_arguments(parser)
    parser.add_argument("--image", help="the image to talk about (switch with /image PATH)")
    return parser.parse_args(argv)


def run_terminal(args: argparse.Namespace, lines=sys.stdin, out=sys.stdout) -> None:
    loaded = model_from_args(args)
    chat = TerminalChat(loaded, out)
    chat.say(f"model: {loaded.description}\n{HELP}")
    if args.image:
        chat.set_image(args.image)
    interactive = lines is sys.stdin and sys.stdin.isatty()  # then input(): line editing, a prompt
    try:
        while True:
            line = input("> ") if interactive else lines.readline()
            if not (interactive or line):
                break
            chat.handle(line)
    except (EOFError, KeyboardInterrupt):  # Ctrl-D at the prompt, Ctrl-C anywhere
        chat.say()


def main(argv: list[str] | None = None) -> None:
    exit_on_bad_input(lambda a: run_terminal(parse_args(a)), argv)


if __name__ == "__main__":
    main()
