"""Prompts longer than a text encoder takes: truncated as the stock pipeline truncates them, reported once.

transformers logs "Token indices sequence length is longer than ..." when such a prompt is tokenized, and the
pipelines' `encode_prompt` logs the whole cut-off tail ("The following part of your input was truncated ...") at
every call: megabytes of stderr for one long prompt. `quiet_truncation` silences both around encoding;
`LongPromptWarning.check` counts the prompts the pipeline's tokenizers truncate and warns once, with the count.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

TOKENIZER_LOGGER = "transformers.tokenization_utils_base"  # the "Token indices sequence length" warning


@contextmanager
def quiet_truncation(pipeline) -> Iterator[None]:
    """Silence the truncation warnings of the pipeline's module and of transformers' tokenizers (errors pass)."""
    loggers = [logging.getLogger(type(pipeline).__module__), logging.getLogger(TOKENIZER_LOGGER)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def token_limits(pipeline, settings: Mapping) -> list[tuple[object, int]]:
    """(tokenizer, tokens it keeps) for each loaded tokenizer of the pipeline: its model_max_length, or the
    family's `max_sequence_length` where that is shorter (T5 encoders of PixArt, SD3, CogVideoX)."""
    limit = settings.get("max_sequence_length")
    return [(tok, min(tok.model_max_length, limit or tok.model_max_length))
            for name, tok in pipeline.components.items() if name.startswith("tokenizer") and tok is not None]


def count_truncated(pipeline, prompts: Iterable[str], settings: Mapping) -> tuple[int, int]:
    """(how many of the distinct `prompts` some tokenizer truncates, the shortest limit that applies)."""
    limits = token_limits(pipeline, settings)
    truncated, shortest = 0, None
    with quiet_truncation(pipeline):
        for prompt in set(prompts):
            cut = [n for tok, n in limits if len(tok(prompt).input_ids) > n]
            if cut:
                truncated += 1
                shortest = min(cut + ([shortest] if shortest else []))
    return truncated, shortest or 0


class LongPromptWarning:
    """Warns once (per backbone or prompt encoder) how many prompts are truncated; checks nothing after that."""

    def __init__(self):
        self.given = False

    def check(self, pipeline, prompts: list[str], settings: Mapping) -> None:
        if self.given:
            return
        truncated, limit = count_truncated(pipeline, prompts, settings)
        if truncated:
            self.given = True
            print(f"tdm: warning: {truncated} prompt(s) longer than the text encoder takes ({limit} tokens) are "
                  f"truncated, as the stock pipeline truncates them ({len(set(prompts))} distinct prompts checked; "
                  f"reported once)", file=sys.stderr)
