"""The true vocab size as Megatron-LM's ``build_tokenizer`` computes it, from the files args name.

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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distconv.errors import DistconvError
from distconv.spec import arg

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


def _sentencepiece_size(path: str, tokenizer_type: str, extra_ids: int) -> int:
    try:
        pieces, names = sentencepiece_pieces(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DistconvError(f"args.tokenizer_model {path}: not a SentencePiece model file ({e})") from None
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


def megatron_vocab(args: Any) -> tuple[int, str] | None:
    """``(size, where it came from)`` for args' ``tokenizer_type`` and its local files; None when they do not tell."""
    kind = arg(args, "tokenizer_type")
    vocab_size = arg(args, "vocab_size")
    if kind == "NullTokenizer" and vocab_size is not None:
        if hasattr(args, "null_tokenizer_eod_id"):  # Megatron-LM >= #4057 (megatron-core 0.18)
            return int(vocab_size), "args.vocab_size (NullTokenizer of megatron-core >= 0.18, its end-of-document token inside)"
        return int(vocab_size) + 1, "args.vocab_size + 1 (NullTokenizer's end-of-document token)"
    if kind == "TikTokenizer":
        if vocab_size is not None:
            return int(vocab_size), "args.vocab_size (TikTokenizer)"
        return _TIKTOKEN_DEFAULT, "TikTokenizer's default size 2**17 (args.vocab_size unset)"
    if kind == "GPT2BPETokenizer":
        vocab_file = arg(args, "vocab_file")
        if vocab_file is None or not Path(vocab_file).is_file():
            return None
        try:
            entries = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DistconvError(f"args.vocab_file {vocab_file}: not a GPT-2 vocab JSON ({e})") from None
        if not isinstance(entries, dict):
            raise DistconvError(f"args.vocab_file {vocab_file}: not a GPT-2 vocab JSON (no object)")
        return len(entries), f"args.vocab_file {vocab_file} (GPT2BPETokenizer)"
    if kind in _SENTENCEPIECE:
        model = arg(args, "tokenizer_model")
        if model is None or not Path(model).is_file():
            return None
        extra = int(arg(args, "vocab_extra_ids", default=0) or 0)
        return _sentencepiece_size(str(model), kind, extra), f"args.tokenizer_model {model} ({kind})"
    return None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cached_hub_tokenizer(name: str) -> Path | None:
    """The local HF cache's snapshot folder of hub repo ``name`` when it holds tokenizer files; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache, or not a valid repo id (huggingface_hub raises several kinds)
        return None
    return folder if any((folder / f).is_file() for f in _TOKENIZER_FILES) else None
