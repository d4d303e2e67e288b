"""``bifrost chat``: ask the understanding model of a checkpoint about images.

    bifrost chat --checkpoint Qwen2.5-VL-7B-Instruct --image a.png [--image b.png] --prompt "What is shown?"
    bifrost chat --checkpoint BIFROST1_DIR --base QWEN2.5-VL_DIR --image a.png        # interactive
    bifrost chat --checkpoint WORKDIR --image a.png --prompt "..."                     # an mllm training run

With ``--prompt`` it answers once and exits; without, it reads questions from standard input (the images of
``--image`` go with the first question; ``/image PATH`` adds an image to the next question, ``/reset`` starts a
new conversation, ``/quit`` or end of input leaves). Checkpoint kinds and where the tokenizer comes from:
``bifrost_jax.sample.understanding``. Greedy decoding unless ``--sample``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from bifrost_jax.data.qwen_image import MAX_PIXELS, MIN_PIXELS
from bifrost_jax.parallel.mesh import make_mesh
from bifrost_jax.sample.text import DecodeOptions, ImageOptions
from bifrost_jax.sample.understanding import Chat


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bifrost chat", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="Qwen2.5-VL directory, Bifrost-1 checkpoint, or WORKDIR")
    p.add_argument("--base", default=None, help="the Qwen2.5-VL directory a Bifrost-1 checkpoint was built on")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json directory (default: from the checkpoint)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", default=None, help="the question (omit for an interactive conversation)")
    p.add_argument("--system", default=None, help="system prompt (default: Qwen2.5-VL's)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixels", type=int, default=MIN_PIXELS)
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="parameter and compute dtype")
    p.add_argument("--mesh", default=None, help='JSON mesh sizes, e.g. \'{"fsdp": -1}\' (default: one device)')
    return p


def read_image(path: str):
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, ValueError) as e:
        raise SystemExit(f"bifrost chat: cannot read image {path}: {e}") from None


def repl(chat, images, stdin=None, stdout=None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    pending = list(images)
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            chat.reset()
            pending = []
            print("(new conversation)", file=stdout)
        elif line.startswith("/image "):
            pending.append(read_image(line[len("/image "):].strip()))
            print(f"({len(pending)} image(s) for the next question)", file=stdout)
        elif line:
            print(chat.ask(line, pending), file=stdout, flush=True)
            pending = []


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    images = [read_image(p) for p in args.image]
    import jax.numpy as jnp


    mesh = make_mesh(json.loads(args.mesh)) if args.mesh else None
    options = DecodeOptions(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k)
    chat = Chat.from_checkpoint(args.checkpoint, base=args.base, tokenizer=args.tokenizer,
                                dtype=getattr(jnp, args.dtype), mesh=mesh, system=args.system, options=options,
                                seed=args.seed, image_options=ImageOptions(args.min_pixels, args.max_pixels))
    if args.prompt is not None:
        print(chat.ask(args.prompt, images))
        return 0
    repl(chat, images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
