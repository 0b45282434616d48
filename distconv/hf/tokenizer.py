"""HF tokenizers: a local folder, or a hub id whose snapshot is in the local HF cache (never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distconv.errors import DistconvError
from distconv.hf.source import auto_map_file, remote_code

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cached_hub_tokenizer(name: str) -> Path | None:
    """The local HF cache's snapshot folder of hub repo ``name`` when it holds tokenizer files; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id (huggingface_hub raises several kinds)
        return None
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None


def load_tokenizer(folder: Path, origin: str) -> tuple[Any, list[str]]:
    """The HF tokenizer in ``folder`` (local files only, never the folder's own code), and a warning
    when its ``auto_map`` was ignored (it is dropped, so the export does not write it). One that does
    not load is an error naming ``origin`` (where the folder came from), the folder and the reason,
    or the file whose ``auto_map`` only the folder's code could serve."""
    from transformers import AutoTokenizer

    remote = auto_map_file(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds (ValueError, OSError, JSON and tokenizers errors)
        if remote:
            raise DistconvError(remote_code(remote, origin, False)) from None
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DistconvError(f"{origin} {folder}: the folder does not load as an HF tokenizer: {reason}") from None
    if remote is None:
        return tokenizer, []
    tokenizer.init_kwargs.pop("auto_map", None)  # what save_pretrained writes into tokenizer_config.json
    return tokenizer, [remote_code(remote, origin, True)]
