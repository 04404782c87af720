"""``blocktool tokenizer``: tokenizer utilities (library: ``tokenizer_train``)."""

from __future__ import annotations

import sys

import click


@click.group()
def tokenizer():
    """Tokenizers for the text blocks of datasets.

    \b
    Example:
      blocktool tokenizer train data/shards/text --out data/shards/tokenizer --vocab-size 4096
    """


@tokenizer.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True,
              help="Output prefix: writes OUT.model and OUT.vocab.")
@click.option("--vocab-size", type=int, default=4096, show_default=True)
@click.option("--model-type", type=click.Choice(["bpe", "unigram", "char", "word"]),
              default="bpe", show_default=True)
@click.option("--mode", "modes", multiple=True, help="Only text blocks of these modes.")
def train(inputs, out, vocab_size, model_type, modes):
    """Train a sentencepiece model on the text blocks of datasets (folders, manifests, .tar) or
    on .txt files given as INPUTS. Deterministic: the same text gives the same model.

    \b
    Example:
      blocktool tokenizer train data/shards/text --out data/shards/tokenizer
      # -> data/shards/tokenizer.model, data/shards/tokenizer.vocab
    """
    from blocklm.formats import FormatError

    from .tokenizer_train import TokenizerConfig, train_tokenizer

    try:
        model, vocab, n = train_tokenizer(list(inputs), out,
                                          TokenizerConfig(vocab_size, model_type),
                                          set(modes) or None)
    except (FormatError, OSError, ValueError, RuntimeError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"trained on {n} lines: {model} {vocab}", err=True)
