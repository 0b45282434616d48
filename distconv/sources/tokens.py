"""Special token ids for an exported config: the tokenizer's, else what Megatron-LM's args hold, else none.

Serving engines stop generating at ``generation_config.json``'s ``eos_token_id``, so a config
class's default id (GPT-2's 50256, Llama's 1 and 2) would be a made-up stop token. Megatron-LM's
args name a token id only for ``NullTokenizer`` (``null_tokenizer_eod_id``; its default differs
between versions, so only an explicit one counts); every other tokenizer type keeps its ids in
the tokenizer files.
"""

from __future__ import annotations

import argparse
from typing import Any

from distconv.spec import arg


def special_tokens(tokenizer: Any, args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    """``(bos_token_id, eos_token_id, where they came from)``; None where nothing says."""
    if tokenizer is not None:
        return tokenizer.bos_token_id, tokenizer.eos_token_id, "the tokenizer"
    eod = arg(args, "null_tokenizer_eod_id")
    if arg(args, "tokenizer_type") == "NullTokenizer" and eod is not None:
        return None, int(eod), "args.null_tokenizer_eod_id (NullTokenizer)"
    return None, None, "nothing (no tokenizer, no token ids in args): written as null"
