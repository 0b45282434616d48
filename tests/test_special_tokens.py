"""Special token ids: the tokenizer's, else an explicit NullTokenizer end-of-document id from args,
else null in config.json and generation_config.json (never a config class's default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import distconv_cli
from fixtures.build import layout_dir


def _export(load: Path, save: Path) -> tuple[dict, dict, str]:
    proc = distconv_cli("export", "--load", str(load), "--save", str(save))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((save / "config.json").read_text())
    generation = json.loads((save / "generation_config.json").read_text())
    return config, generation, proc.stdout


def _ids(data: dict) -> tuple:
    return data["bos_token_id"], data["eos_token_id"]


@pytest.mark.parametrize("name", ["gpt2", "mixtral"])  # GPT2Config's default ids are 50256, Mixtral's 1 and 2
def test_without_tokenizer_the_ids_are_null(built, tmp_path, name):
    config, generation, out = _export(layout_dir(built, name, 1, 1), tmp_path / name)
    assert _ids(config) == _ids(generation) == (None, None)
    assert "tokens      bos None, eos None, from nothing" in out


def test_with_a_tokenizer_the_ids_are_the_tokenizers(built, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(built / "tokenizer"), trust_remote_code=False)  # the llama fixture's args point at it
    config, generation, out = _export(layout_dir(built, "llama", 1, 1), tmp_path / "llama")
    assert _ids(config) == _ids(generation) == (tokenizer.bos_token_id, tokenizer.eos_token_id) != (None, None)
    assert "from the tokenizer" in out


def test_null_tokenizer_eod_id_from_args(built, tmp_path):
    """Megatron-LM's NullTokenizer keeps its end-of-document id in args.null_tokenizer_eod_id."""
    root = tmp_path / "gpt2_null"
    shutil.copytree(layout_dir(built, "gpt2", 1, 1), root)
    common = root / "iter_0000100" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["args"].tokenizer_type, state["args"].null_tokenizer_eod_id = "NullTokenizer", 249
    torch.save(state, common)
    config, generation, out = _export(root, tmp_path / "out")
    assert _ids(config) == _ids(generation) == (None, 249)
    assert "from args.null_tokenizer_eod_id" in out
