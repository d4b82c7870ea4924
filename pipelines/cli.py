"""The ``tessera`` command line: one subcommand per pipeline module.

Each module named in ``COMMANDS`` exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a ``run(args) -> int``. A user error (bad config, bad input, missing file) prints one
line to stderr and exits non-zero; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# subcommand modules, in the order `tessera --help` lists them
COMMANDS = [
    "pipelines.train_tokenizer",   # train-tokenizer, reconstruct
    "pipelines.train_generator",   # tokenize, train-generator
    "pipelines.generate",          # generate
    "pipelines.inpaint",           # inpaint
    "pipelines.classifier",        # train-classifier
    "pipelines.evaluate",          # evaluate
    "pipelines.demo",              # demo
]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line too: ``error: tessera generate: argument --num-steps: ...``
    (argparse's default prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tessera", description="Latent discrete image generation: tokenizers, masked / AR / VAR generators.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def end_distributed() -> bool:
    """Under ``accelerate launch``, wait for every rank (rank 0 may still be validating or saving after
    training) and destroy the process group. True when there was one to end (the caller then leaves through
    ``exit_now``). A rank that exits with a live gloo group while its peer still uses it can abort in C++
    ("terminate called without an active exception"), which fails the whole launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_now(code: int) -> None:
    """End a launched rank once its work is written and its process group destroyed: flush the logs and the
    standard streams, then ``os._exit``. The interpreter's teardown is skipped on purpose: twice in this
    project's CI a 2-process gloo run had finished, validated and passed the barrier, and then one rank aborted
    on its way out (SIGABRT, "terminate called without an active exception": a native thread still joinable at
    teardown; pytorch/gloo#155), failing a launch whose work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        if end_distributed():
            exit_now(code)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, OSError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__    # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
