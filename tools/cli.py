"""The ``blocktool`` command line: a thin click group over library functions.

Commands are registered by import path and loaded on first use, so ``blocktool --help`` stays fast
(no torch import) and each issue adds its command by adding one line to ``COMMANDS``/``BENCH``.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from blocklm import __version__

# name -> "module:attribute" of a click command. A module that does not exist yet is not listed.
COMMANDS: dict[str, str] = {
    "convert": "blocklm.tools.cmd_convert:convert",
    "inspect": "blocklm.tools.cmd_inspect:inspect",
    "verify": "blocklm.tools.cmd_verify:verify",
    "ls": "blocklm.tools.cmd_ls:ls",
    "cat": "blocklm.tools.cmd_cat:cat",
    "tokenizer": "blocklm.tools.cmd_tokenizer:tokenizer",
    "train": "blocklm.tools.cmd_train:train",
    "generate": "blocklm.tools.cmd_generate:generate",
    "plot": "blocklm.tools.cmd_plot:plot",
    "eval": "blocklm.tools.cmd_eval:eval_run",
}

BENCH: dict[str, str] = {
    "convert": "blocklm.tools.bench_convert:bench_convert",
    "read": "blocklm.tools.bench_read:bench_read",
    "dispatch": "blocklm.tools.bench_dispatch:bench_dispatch",
    "model": "blocklm.tools.bench_model:bench_model",
    "gpu": "blocklm.tools.bench_gpu:bench_gpu",
    "train": "blocklm.tools.bench_train:bench_train",
    "train-compare": "blocklm.tools.bench_train_compare:bench_train_compare",
    "heads": "blocklm.tools.bench_heads:bench_heads",
    "add-norm": "blocklm.tools.bench_add_norm:bench_add_norm",
}


def _available(table: dict[str, str]) -> list[str]:
    return sorted(n for n, ref in table.items()
                  if importlib.util.find_spec(ref.split(":")[0]) is not None)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked or listed."""

    def __init__(self, *args, table: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.table = table

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_available(self.table)))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is not None or name not in self.table:
            return cmd
        module, attr = self.table[name].split(":")
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        """Runs the subcommand; bad data (a typed ``FormatError``: it names the file, shard and
        key) or a decoder library missing on this machine (``CodecUnavailableError``: it names
        the package) ends it with ``error: ...`` and exit 1, not a traceback, whichever command
        met it."""
        try:
            return super().invoke(ctx)
        except Exception as e:
            # imported only on the error path
            from blocklm.formats.errors import CodecUnavailableError, FormatError

            if not isinstance(e, (FormatError, CodecUnavailableError)):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=LazyGroup, table=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="blocktool")
def main() -> None:
    """blocktool: package, audit, stream and train on block-list datasets.

    \b
    Typical session:
      blocktool convert ../shared/corpora/images/bsd100 --out data/shards/images
      blocktool inspect data/shards/images
      blocktool verify data/shards/images
    Run `blocktool COMMAND --help` for each command's options and an example.
    """


@main.group(cls=LazyGroup, table=BENCH)
def bench() -> None:
    """Benchmarks that compare blocklm with its baseline side by side, in one run.

    \b
    Example:
      blocktool bench read data/shards/mixed --json
    """


if __name__ == "__main__":
    main()
