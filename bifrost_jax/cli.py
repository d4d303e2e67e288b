"""The `bifrost` command line: train | generate | chat | eval | port | cache-latents | aot | demo.

Each subcommand imports its machinery lazily so that `bifrost --help` is instant.
"""
from __future__ import annotations

import sys


def _delegate(module: str, func: str):
    def run(argv: list[str]) -> int:
        import importlib

        return int(getattr(importlib.import_module(module), func)(argv) or 0)
    run.module = module
    return run


def _available(handler) -> bool:
    """Subcommands whose implementing module is not in this checkout are not offered."""
    import importlib.util

    module = getattr(handler, "module", None)
    return module is None or importlib.util.find_spec(module) is not None


COMMANDS = {
    "train": ("train a phase from a config", _delegate("bifrost_jax.train.loop", "main")),
    "generate": ("generate images from prompts", _delegate("bifrost_jax.generate", "main")),
    "chat": ("answer questions about images (the understanding path)", _delegate("bifrost_jax.chat", "main")),
    "eval": ("sharded evaluation: geneval | dpg | reconstruction | shapes | understanding",
             _delegate("bifrost_jax.eval.run", "main")),
    "port": ("port a PyTorch checkpoint into an Orbax checkpoint", _delegate("bifrost_jax.port.cli", "main")),
    "cache-latents": ("precompute a phase's CLIP latents (frozen vision tower) for data.precomputed_clip_latents",
                      _delegate("bifrost_jax.train.cache_latents", "main")),
    "aot": ("compile a phase ahead of time for a TPU topology", _delegate("bifrost_jax.aot", "main")),
    "demo": ("the embedded default, end to end on CPU", _delegate("bifrost_jax.demo", "main")),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {name: entry for name, entry in COMMANDS.items() if _available(entry[1])}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        lines = ["usage: bifrost <command> [args]", "", "commands:"]
        lines += [f"  {name:<14} {help_}" for name, (help_, _) in commands.items()]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nbifrost: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][1](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
