"""``python -m llava_san.chat <model>``: talk to a trained model in the terminal, or ask it one question.

    python -m llava_san.chat outputs/run --image cat.png --question "What is in the picture?"
    python -m llava_san.chat outputs/run/merged --image cat.png          # a conversation

``<model>`` is a training run folder, its ``merged/`` folder (or a ``python -m llava_san.export``
folder) or a llava-hf checkpoint folder. Prompts are built as training built them (the run's
conversation template and image preprocessing, :class:`llava_san.inference.Assistant`) and answered
greedily by the project's generator, so an answer here is the answer ``python -m evaluation`` gives.

With ``--question``: prints the answer and exits. Without: a conversation on stdin/stdout; the answer
is printed while it is generated and every answer sees the whole conversation so far. One image per
conversation, as in LLaVA's CLI:

    /image <path>   load an image and start a new conversation about it
    /reset          start a new conversation without an image
    /exit, /quit    end (as does end of input)

When stdin is not a terminal (a piped script) each input line is echoed after the prompt, so that
stdout reads as the transcript; notes and errors go to stderr. Bad input (a missing or unreadable
image, a path that is not a model folder, a prompt longer than the model's context) is one line on
stderr naming it, and exit code 2 (in a conversation: the error is printed and the conversation goes on).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence, TextIO

__all__ = ["main", "repl"]

PROG = "python -m llava_san.chat"
USER_PROMPT, ASSISTANT_PREFIX = "USER: ", "ASSISTANT: "
COMMANDS = "/image <path> starts a conversation about an image, /reset starts one without, /exit quits"


class _BadInput(ValueError):
    """Input the command cannot use; the message names it."""


def _parser() -> argparse.ArgumentParser:
    from .inference.cli_args import add_model_arguments

    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--image", help="an image for the (first) conversation")
    p.add_argument("--question", help="ask this one question, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="answer length limit in tokens (default 512)")
    return p


def _read_image(path: str) -> Any:
    from .data.images import ImageLoadError, load_image

    try:
        return load_image(path)
    except ImageLoadError as err:  # names the file
        raise _BadInput(str(err)) from None


def _load(args: argparse.Namespace):
    """The :class:`Assistant` of ``args.model``; :class:`_BadInput` naming the folder when it is not a
    model folder or cannot be read."""
    from .inference import Assistant, describe_path

    try:
        describe_path(args.model)  # a one-line answer before seconds of imports and loading
        return Assistant.load(args.model, device=args.device, dtype=args.dtype, template=args.template)
    except FileNotFoundError as err:
        raise _BadInput(str(err)) from None
    except (OSError, ValueError) as err:  # damaged config or weights: the loaders' own messages
        raise _BadInput(f"cannot load {args.model}: {err}") from None


def _say(answer: Any, out: TextIO) -> str:
    """Print the pieces of a streamed answer as they come; returns the whole answer."""
    text = ""
    for piece in answer:
        out.write(piece)
        out.flush()
        text += piece
    out.write("\n")
    out.flush()
    return text


def _read_line(stdin: TextIO, stdout: TextIO) -> str:
    """One input line after the prompt, ``""`` at end of input; on the terminal through ``input()``
    (line editing and history when the ``readline`` module is there)."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (input() edits lines with it once imported)
        except ImportError:
            pass
        try:
            return input(USER_PROMPT) + "\n"
        except EOFError:
            return ""
    stdout.write(USER_PROMPT)
    stdout.flush()
    return stdin.readline()


def repl(assistant: Any, image: Any = None, *, max_new_tokens: int = 512, stdin: Optional[TextIO] = None,
         stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> None:
    """The conversation loop (see the module docstring) until ``/exit``, ``/quit`` or end of input."""
    from .inference import Turn

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    echo = not stdin.isatty()

    def note(message: str) -> None:
        stdout.flush()  # keep the transcript and the notes in order on a terminal
        print(message, file=stderr, flush=True)

    turns: list[Turn] = []
    while True:
        try:
            line = _read_line(stdin, stdout)
        except KeyboardInterrupt:
            stdout.write("\n")
            return
        if not line:  # end of input: end the prompt's line
            stdout.write("\n")
            return
        if echo:
            stdout.write(line if line.endswith("\n") else line + "\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            arg = arg.strip()
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                turns, image = [], None
                note("(new conversation, no image)")
            elif command == "/image" and not arg:
                note("error: /image needs a path: /image <path>")
            elif command == "/image":
                try:
                    image = _read_image(arg)
                except _BadInput as err:
                    note(f"error: {err}")
                    continue
                turns = []
                note(f"(new conversation about {arg})")
            else:
                note(f"error: unknown command {text!r}: {COMMANDS}")
            continue
        asked = turns + [Turn("user", text)]
        try:
            pieces = assistant.stream(asked, image, max_new_tokens)  # encodes now: errors come before output
        except ValueError as err:  # PromptTooLong, an "<image>" typed in the text
            note(f"error: {err}")
            continue
        stdout.write(ASSISTANT_PREFIX)
        try:
            answer = _say(pieces, stdout)
        except KeyboardInterrupt:  # Ctrl-C stops an answer, not the session
            stdout.write("\n")
            note("(answer interrupted: it is not kept in the conversation)")
            continue
        turns = asked + [Turn("assistant", answer)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (0 done, 2 bad input, 130 interrupted)."""
    args = _parser().parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise _BadInput(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        image = _read_image(args.image) if args.image else None
        assistant = _load(args)
        if args.question is None:
            print(f"chatting with {assistant.loaded.source} ({COMMANDS})", file=sys.stderr, flush=True)
            repl(assistant, image, max_new_tokens=args.max_new_tokens)
            return 0
        from .inference import Turn

        try:
            pieces = assistant.stream([Turn("user", args.question)], image, args.max_new_tokens)
        except ValueError as err:  # PromptTooLong, "<image>" in the question
            raise _BadInput(f"--question: {err}") from None
        _say(pieces, sys.stdout)
    except _BadInput as err:
        print(f"llava_san.chat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
