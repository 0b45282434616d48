"""Megatron-LM's tokenizer as its args describe it: the true vocab size and the special token ids.

The true vocab size is what Megatron-LM's ``build_tokenizer`` computes from the files args name.

Megatron-LM pads the tokenizer's ``vocab_size`` to ``padded_vocab_size``; a checkpoint stores
only the padded size, so the true one is recomputed here per ``tokenizer_type``:

- ``GPT2BPETokenizer``: the entries of ``vocab_file`` (a JSON object); no special tokens are added.
- ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``: the pieces of the ``tokenizer_model`` file.
- ``SentencePieceTokenizer``: the pieces, plus ``<CLS>``, ``<SEP>``, ``<EOD>``, ``<MASK>``, the pad,
  bos and eos pieces (``<PAD>``/``<BOS>``/``<EOS>`` when the model has no such control piece) and
  ``vocab_extra_ids`` ``<extra_id_i>`` tokens, each only when not already a piece.
- ``TikTokenizer``: ``vocab_size``, else 2**17 (the file is cut to it, special tokens included).
- ``NullTokenizer``: ``vocab_size`` + 1 (its end-of-document id is ``vocab_size``) up to megatron-core
  0.17; ``vocab_size`` from 0.18 on (Megatron-LM #4057: the id is ``vocab_size - 1`` unless
  ``--null-tokenizer-eod-id`` says, and args carry ``null_tokenizer_eod_id`` from then on, None or not).

A SentencePiece ``.model`` file is a ``ModelProto`` protobuf, read here with a small
wire-format reader (pieces with their types, and the trainer spec's special piece names).

The files come from the checkpoint first: Megatron-LM (``--save-tokenizer-assets``) saves the
tokenizer in the iteration folder's ``tokenizer/`` (``vocab.json`` and ``merges.txt``,
``tokenizer.model``, or an HF tokenizer). Only without one are the paths args name read, which
lie wherever the training ran (the export warns, naming them).

Special token ids for an exported config come from the tokenizer, else from args, else nowhere.
Serving engines stop generating at ``generation_config.json``'s ``eos_token_id``, so a config
class's default id (GPT-2's 50256, Llama's 1 and 2) would be a made-up stop token. Megatron-LM's
args name a token id only for ``NullTokenizer`` (``null_tokenizer_eod_id``; its default differs
between versions, so only an explicit one counts); every other tokenizer type keeps its ids in
the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distconv.errors import DistconvError
from distconv.megatron.args import arg
from distconv.megatron.checkpoint import TRACKER

_SENTENCEPIECE = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
_CONTROL = 3  # ModelProto.SentencePiece.Type.CONTROL
_TIKTOKEN_DEFAULT = 2**17


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """``(field number, value)`` of one protobuf message: varints as ints, length-delimited as bytes."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
            if pos > len(data):
                raise ValueError("truncated field")
        elif wire in (1, 5):
            value, pos = 0, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((number, value))
    return out


def sentencepiece_pieces(path: str | Path) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The ``(piece, type)`` list of a SentencePiece model file and its bos/eos/pad piece names."""
    pieces: list[tuple[str, int]] = []
    names = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
    for number, value in _fields(Path(path).read_bytes()):
        if number == 1 and isinstance(value, bytes):
            fields = dict(_fields(value))
            pieces.append((bytes(fields.get(1, b"")).decode("utf-8"), int(fields.get(3, 1))))
        elif number == 2 and isinstance(value, bytes):  # TrainerSpec: bos/eos/pad_piece are fields 46-48
            for field, piece in _fields(value):
                if field in (46, 47, 48) and isinstance(piece, bytes):
                    names[{46: "bos", 47: "eos", 48: "pad"}[field]] = piece.decode("utf-8")
    if not pieces:
        raise ValueError("no pieces")
    return pieces, names


def _sentencepiece_size(path: str, tokenizer_type: str, extra_ids: int, origin: str = "args.tokenizer_model") -> int:
    try:
        pieces, names = sentencepiece_pieces(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DistconvError(f"{origin} {path}: not a SentencePiece model file ({e})") from None
    if tokenizer_type != "SentencePieceTokenizer":
        return len(pieces)
    vocab = {p for p, _ in pieces}
    types = {p: t for p, t in pieces}
    special = ["<CLS>", "<SEP>", "<EOD>", "<MASK>"]
    for role in ("pad", "bos", "eos"):  # the processor's id is -1 unless the piece is a control piece
        special.append(names[role] if types.get(names[role]) == _CONTROL else f"<{role.upper()}>")
    special += [f"<extra_id_{i}>" for i in range(extra_ids)]
    for token in special:
        vocab.add(token)
    return len(vocab)


def megatron_vocab(args: Any, saved: Path | None = None) -> tuple[int, str, Path | None] | None:
    """``(size, where it came from, the file read)`` for args' ``tokenizer_type``, from the
    checkpoint's ``saved`` tokenizer folder, else the local files args name; None when they do not tell."""
    kind = arg(args, "tokenizer_type")
    vocab_size = arg(args, "vocab_size")
    if kind == "NullTokenizer" and vocab_size is not None:
        if hasattr(args, "null_tokenizer_eod_id"):  # Megatron-LM >= #4057 (megatron-core 0.18)
            return int(vocab_size), "args.vocab_size (NullTokenizer of megatron-core >= 0.18, its end-of-document token inside)", None
        return int(vocab_size) + 1, "args.vocab_size + 1 (NullTokenizer's end-of-document token)", None
    if kind == "TikTokenizer":
        if vocab_size is not None:
            return int(vocab_size), "args.vocab_size (TikTokenizer)", None
        return _TIKTOKEN_DEFAULT, "TikTokenizer's default size 2**17 (args.vocab_size unset)", None
    if kind == "GPT2BPETokenizer":
        vocab_file, origin = _file(saved, "vocab.json", args, "vocab_file")
        if vocab_file is None:
            return None
        try:
            entries = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DistconvError(f"{origin} {vocab_file}: not a GPT-2 vocab JSON ({e})") from None
        if not isinstance(entries, dict):
            raise DistconvError(f"{origin} {vocab_file}: not a GPT-2 vocab JSON (no object)")
        return len(entries), f"{origin} {vocab_file} (GPT2BPETokenizer)", vocab_file
    if kind in _SENTENCEPIECE:
        model, origin = _file(saved, "tokenizer.model", args, "tokenizer_model")
        if model is None:
            return None
        extra = int(arg(args, "vocab_extra_ids", default=0) or 0)
        return _sentencepiece_size(str(model), kind, extra, origin), f"{origin} {model} ({kind})", model
    return None


def special_tokens(tokenizer: Any, args: Any) -> tuple[int | None, int | None, str]:
    """``(bos_token_id, eos_token_id, where they came from)``; None where nothing says."""
    if tokenizer is not None:
        return tokenizer.bos_token_id, tokenizer.eos_token_id, "the tokenizer"
    eod = arg(args, "null_tokenizer_eod_id")
    if arg(args, "tokenizer_type") == "NullTokenizer" and eod is not None:
        return None, int(eod), "args.null_tokenizer_eod_id (NullTokenizer)"
    return None, None, "nothing (no tokenizer, no token ids in args): written as null"


def _file(saved: Path | None, name: str, args: Any, field: str) -> tuple[Path | None, str]:
    """The checkpoint's saved copy ``saved/name`` if there is one, else the file args' ``field`` names."""
    if saved is not None and (saved / name).is_file():
        return saved / name, "the checkpoint's"
    value = arg(args, field)
    return (Path(value) if value is not None and Path(value).is_file() else None), f"args.{field}"


def checkpoint_tokenizer(folder: Path) -> Path | None:
    """The tokenizer folder saved inside the checkpoint: ``tokenizer/`` in the iteration ``folder``
    (where Megatron-LM saves it), else in the save root above it."""
    if not folder.is_dir():  # a zipped legacy release
        return None
    root = folder.parent if (folder.parent / TRACKER).is_file() else None
    return next((f for f in (folder / "tokenizer", root / "tokenizer" if root else None) if f and f.is_dir()), None)


def outside_checkpoint(path: str | Path, folder: Path) -> bool:
    """``path`` resolves outside the checkpoint: its iteration ``folder`` and the save root above it."""
    target = Path(path).resolve()
    roots = {folder.resolve()} | ({folder.parent.resolve()} if (folder.parent / TRACKER).is_file() else set())
    return not any(target == r or r in target.parents for r in roots)

