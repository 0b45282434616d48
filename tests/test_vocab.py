"""The true vocab size from what Megatron-LM's args name, per tokenizer type, and ``--vocab-size``.

Each case rewrites the args of a copy of the qwen3 fixture (padded vocab 256, no tokenizer, no
vocab_size) and exports it; the expected sizes are counted here from the files the test writes,
following Megatron-LM's ``build_tokenizer``.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from conftest import distconv_cli, run_export_jobs
from fixtures.build import layout_dir

PADDED = 256


def _checkpoint(built: Path, dst: Path, **changes) -> Path:
    shutil.copytree(layout_dir(built, "qwen3", 1, 1), dst)
    common = dst / "iter_0000100" / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture, trusted
    for k, v in changes.items():
        setattr(state["args"], k, v)
    torch.save(state, common)
    return dst


def _rows(folder: Path) -> tuple[int, int]:
    """(embedding rows in the safetensors, config.json vocab_size) of an export."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"] \
        if (folder / "model.safetensors.index.json").exists() else None
    file = folder / (index["model.embed_tokens.weight"] if index else "model.safetensors")
    with safe_open(str(file), "pt") as f:
        rows = f.get_slice("model.embed_tokens.weight").get_shape()[0]
    return rows, json.loads((folder / "config.json").read_text())["vocab_size"]


def _gpt2_files(folder: Path, n: int) -> tuple[Path, Path]:
    """A GPT-2 style BPE vocab.json of ``n`` entries (letters, their merges, <|endoftext|>) and merges.txt."""
    folder.mkdir()
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = [f"{a} {b}" for a in letters for b in letters][: n - len(letters) - 1]
    vocab = {s: i for i, s in enumerate(letters + [m.replace(" ", "") for m in merges])}
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) == n
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _sentencepiece_model(path: Path, pieces: list[tuple[str, int]]) -> None:
    """A SentencePiece ``ModelProto`` (sentencepiece_model.proto): field 1 pieces {1 piece, 2 score, 3 type},
    field 2 trainer_spec with the default special ids (unk 0, bos 1, eos 2, pad -1)."""
    body = b"".join(_field(1, _field(1, p.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", -float(i)) + _field(3, t))
                    for i, (p, t) in enumerate(pieces))
    trainer = _field(3, 1) + _field(4, len(pieces)) + _field(40, 0) + _field(41, 1) + _field(42, 2)
    path.write_bytes(body + _field(2, trainer))


NORMAL, UNKNOWN, CONTROL = 1, 2, 3


def _hf_cache(home: Path, repo: str, tokenizer: Path) -> None:
    """A hub snapshot of ``repo`` in an HF cache at ``home`` (HF_HOME), holding a copy of ``tokenizer``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tokenizer, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_vocab_from_each_tokenizer_type(built, tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    vocab_json, merges = _gpt2_files(files / "gpt2", 200)
    pieces = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)] + [(f"\u2581p{i}", NORMAL) for i in range(150)]
    _sentencepiece_model(files / "sp.model", pieces)
    _sentencepiece_model(files / "sp_pad.model", pieces + [("<pad>", CONTROL)])
    home = tmp_path / "hf_home"
    _hf_cache(home, "tiny-org/tiny-tok", built / "tokenizer")
    hf_count = len(json.loads((built / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nothing = dict(vocab_size=None, tokenizer_model=None)
    cases = {  # name: (args, expected size counted here)
        "gpt2bpe": (dict(nothing, tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_json), merge_file=str(merges)), 200),
        # 153 pieces + <CLS> <SEP> <EOD> <MASK> + <PAD> (no pad piece) + 3 extra ids; <s>, </s> are pieces
        "sentencepiece": (dict(nothing, tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(files / "sp.model"),
                               vocab_extra_ids=3), 153 + 4 + 1 + 3),
        # a control piece <pad> is the pad token: no <PAD> added
        "sentencepiece_pad": (dict(nothing, tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(files / "sp_pad.model")),
                              154 + 4),
        "llama2": (dict(nothing, tokenizer_type="Llama2Tokenizer", tokenizer_model=str(files / "sp.model")), 153),
        "gptsentencepiece": (dict(nothing, tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=str(files / "sp.model")), 153),
        "tiktoken": (dict(nothing, tokenizer_type="TikTokenizer", vocab_size=180, tiktoken_num_special_tokens=10), 180),
        "null": (dict(nothing, tokenizer_type="NullTokenizer", vocab_size=199), 200),
        # megatron-core >= 0.18 (Megatron-LM #4057): no added token; its args carry null_tokenizer_eod_id
        "null_0_18": (dict(nothing, tokenizer_type="NullTokenizer", vocab_size=199, null_tokenizer_eod_id=None), 199),
        "hub_cache": (dict(nothing, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tiny-org/tiny-tok"), hf_count),
        "hub_absent": (dict(nothing, tokenizer_type="HuggingFaceTokenizer", tokenizer_model="tiny-org/absent"), PADDED),
    }
    jobs = [{"load": str(_checkpoint(built, tmp_path / name, **args)), "save": str(tmp_path / f"{name}_hf")}
            for name, (args, _) in cases.items()]
    jobs.append({"load": jobs[0]["load"], "save": str(tmp_path / "hand_hf"), "vocab_size": 210})
    results = run_export_jobs(1, jobs, tmp_path / "jobs")
    assert all(r["ok"] for r in results), results
    for (name, (_, expected)), result in zip(cases.items(), results):
        assert _rows(tmp_path / f"{name}_hf") == (expected, expected), name
        assert result["report"]["vocab_size"] == expected, name
    absent = results[list(cases).index("hub_absent")]["report"]
    assert len(absent["warnings"]) == 1 and "--vocab-size" in absent["warnings"][0]  # not in the cache: padded rows kept
    outside = {"gpt2bpe": vocab_json, "sentencepiece": files / "sp.model", "sentencepiece_pad": files / "sp_pad.model",
               "llama2": files / "sp.model", "gptsentencepiece": files / "sp.model",
               "hub_cache": next((home / "hub").glob("models--tiny-org--tiny-tok/snapshots/*"))}
    for name, result in zip(cases, results):  # files args name outside the checkpoint are read, with a warning naming them
        warnings = result["report"]["warnings"]
        if name in outside:
            assert len(warnings) == 1 and str(outside[name]) in warnings[0] and "lies outside the checkpoint" in warnings[0], name
        elif name != "hub_absent":
            assert not warnings, (name, warnings)
    assert _rows(tmp_path / "hand_hf") == (210, 210)  # --vocab-size wins over the GPT-2 vocab file
    assert results[-1]["report"]["vocab_source"] == "--vocab-size"
    assert (tmp_path / "hub_cache_hf" / "tokenizer.json").is_file()  # the cached HF tokenizer is copied
    marker = json.loads((tmp_path / "hand_hf" / "distconv.json").read_text())
    assert marker["source"]["options"]["vocab_size"] == 210


def test_vocab_size_flag(built, tmp_path):
    """--vocab-size from the CLI; a second run with another size is not skipped (the folder is
    not this export: --overwrite needed); a contradiction with --hf-config is an error naming both."""
    load, out = str(layout_dir(built, "qwen3", 1, 1)), tmp_path / "hf"
    proc = distconv_cli("export", "--load", load, "--save", str(out), "--vocab-size", "240")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr and "from --vocab-size" in proc.stdout
    assert _rows(out) == (240, 240)
    again = distconv_cli("export", "--load", load, "--save", str(out), "--vocab-size", "240")
    assert again.returncode == 0 and "skipped" in again.stdout, again.stderr[-3000:]
    other = distconv_cli("export", "--load", load, "--save", str(out), "--vocab-size", "230")
    assert other.returncode == 1 and "skipped" not in other.stdout and "--overwrite" in other.stderr, other.stderr[-3000:]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 250}))
    bad = distconv_cli("export", "--load", load, "--save", str(tmp_path / "bad"), "--vocab-size", "240",
                       "--hf-config", str(config))
    assert bad.returncode == 1 and "--vocab-size 240" in bad.stderr and "--hf-config vocab_size 250" in bad.stderr, bad.stderr[-3000:]
