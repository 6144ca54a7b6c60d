"""``python -m llava_san.serve <model>``: serve one model with an OpenAI-compatible API and a web page.

    python -m llava_san.serve outputs/<run> [--host 127.0.0.1] [--port 8000] [--model-id NAME]
                              [--max-new-tokens-limit 1024] [--device auto] [--dtype auto]

<model> is a training run folder, its merged/ folder, an exported folder or a llava-hf checkpoint
(LoRA/DoRA/SAN merged into the weights). Then open http://127.0.0.1:8000/ for the web page, or point
an OpenAI client at http://127.0.0.1:8000/v1:

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
      "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What shape is this?"},
        {"type": "image_url", "image_url": {"url": "/path/to/image.png"}}]}],
      "max_tokens": 64}'

Decoding is greedy (temperature and top_p are ignored); one conversation holds at most one image;
system messages other than the template's own are refused; one request is generated at a time.
A bad model folder or option is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from typing import Optional, Sequence

EXTRA_HINT = "pip install -e '.[serve]'"


def _parser() -> argparse.ArgumentParser:
    from ..inference.cli_args import add_model_arguments

    parser = argparse.ArgumentParser(prog="python -m llava_san.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, template=False)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--model-id", help="the model name clients use (default: the folder name)")
    parser.add_argument("--max-new-tokens-limit", type=int, default=1024,
                        help="the most new tokens one request may ask for (default: %(default)s)")
    return parser


def _missing_extra() -> Optional[str]:
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed: {EXTRA_HINT}" if missing else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit code (0 after a clean stop, 2 bad input)."""
    args = _parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"llava_san.serve: error: {message}", file=sys.stderr)
        return 2

    missing = _missing_extra()
    if missing:  # before the model loads: say it in a second, not after a minute
        return fail(missing)
    if not 0 <= args.port <= 65535:
        return fail(f"--port must be 0..65535, got {args.port}")
    if args.max_new_tokens_limit < 1:
        return fail(f"--max-new-tokens-limit must be at least 1, got {args.max_new_tokens_limit}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from ..inference import Assistant, CausalLmAssistant
    from .app import create_app
    from .engine import Engine
    from .server import serve

    try:
        assistant = Assistant.load(args.model, device=args.device, dtype=args.dtype, model_id=args.model_id)
    except (FileNotFoundError, ValueError, OSError) as err:
        return fail(f"cannot load {args.model}: {err}")
    if isinstance(assistant, CausalLmAssistant):
        return fail(f"{args.model} is a text-only causal LM (LLaMA); the server serves LLaVA models: ask it with "
                    "`python -m llava_san.chat`")
    engine = Engine(assistant, model_id=args.model_id, max_new_tokens_limit=args.max_new_tokens_limit)
    print(f"serving {engine.model_id!r} on http://{args.host}:{args.port}/ (OpenAI API at /v1)", flush=True)
    serve(create_app(engine), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
