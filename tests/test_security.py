"""Hostile and careless input: no code runs from a checkpoint, nothing outside it is read, and
the source is never written into, over or around.

Each payload would create a marker file when unpickled without an allow-list (checked here
with plain ``pickle``, so the payloads are live); every test asserts the marker is absent
afterwards. Commands run in this process through ``distconv.cli.main``, exactly as the
command line runs them (one rank), so the many cases share one interpreter start-up.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from distconv.cli import main
from distconv.engine import marker
from distconv.hf import sink as hf_sink
from distconv.megatron import save as megatron_save

from fixtures.build import layout_dir

ITER = "iter_0000100"


def _cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """Run one command; its exit status and its ``distconv: error:`` lines."""
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Do you wish to run the custom code" not in out + err, "transformers asked about remote code"
    return code, [l for l in err.splitlines() if l.startswith("distconv: error:")]


def _refused(capsys, needle: str, *argv: str) -> str:
    code, errors = _cli(capsys, *argv)
    assert code == 1 and len(errors) == 1, errors
    assert needle in errors[0], errors[0]
    return errors[0]


def _tree(root: Path) -> dict[str, str]:
    """Every file (and link) under ``root`` with its content's SHA-256: the source, byte for byte."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _shell_global(module: str, name: str, command: str, protocol: int) -> bytes:
    """A pickle that calls ``module``/``name`` with ``command``: protocol 4's STACK_GLOBAL (where a
    dotted name walks attributes) or protocol 0's GLOBAL."""
    if protocol >= 4:
        def text(s: str) -> bytes:
            raw = s.encode()
            return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE

        return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(command) + b"\x85R."
    return f"c{module}\n{name}\n(V{command}\ntR.".encode()


class _Payload:
    """An object whose unpickling runs ``touch MARKER`` (for torch.save'd files)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


PAYLOADS = {
    "dotted": lambda m: _shell_global("torch.distributed.checkpoint.filesystem", "os.system", f"touch {m}", 4),
    "plain": lambda m: _shell_global("os", "system", f"touch {m}", 0),
}


def _live(payload: bytes, flag: Path) -> None:
    """The payload really runs when unpickled without an allow-list."""
    pickle.loads(payload)
    assert flag.exists(), "the payload is not live"
    flag.unlink()


@pytest.fixture
def ckpt(built, tmp_path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(layout_dir(built, "llama", 1, 1), root)
    return root


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_metadata_payload_runs_in_no_command(ckpt, tmp_path, capsys, kind):
    flag = tmp_path / "pwned"
    payload = PAYLOADS[kind](flag)
    _live(payload, flag)
    (ckpt / ITER / ".metadata").write_bytes(payload)
    before = _tree(ckpt)
    out = tmp_path / "hf"
    some_hf = tmp_path / "some_hf"
    some_hf.mkdir()
    (some_hf / "config.json").write_text('{"vocab_size": 250}')
    _refused(capsys, "refusing to unpickle", "inspect", str(ckpt))
    _refused(capsys, "refusing to unpickle", "export", "--load", str(ckpt), "--save", str(out))
    _refused(capsys, "refusing to unpickle", "verify", "--load", str(ckpt), "--hf", str(some_hf))
    _refused(capsys, "refusing to unpickle", "reshard", "--load", str(ckpt), "--save", str(out))
    (ckpt / ITER / "common.pt").unlink()  # layout then has only the DCP common state to go by
    before.pop(f"{ITER}/common.pt")
    _refused(capsys, "refusing to unpickle", "layout", str(ckpt))
    assert not flag.exists(), "the payload ran"
    assert not out.exists()
    assert _tree(ckpt) == before


def test_metadata_that_is_not_dcp_metadata_is_one_line(ckpt, tmp_path, capsys):
    (ckpt / ITER / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    _refused(capsys, "does not hold DCP metadata", "inspect", str(ckpt))


def _inflate(folder: Path, key: str, grow) -> None:
    """Our own fixture's metadata (trusted), with ``key``'s global shape and chunks given by ``grow``."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    md = metadata.state_dict_metadata[key]
    md.size, md.chunks = grow(md.size, md.chunks)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("how", ["chunk", "outside"])
def test_metadata_claiming_more_elements_than_its_bytes_is_refused_before_planning(ckpt, tmp_path, capsys, how):
    """A crafted ``.metadata`` that makes the embedding's leading axis huge is refused before any box of
    that size is allocated: a chunk must lie inside its tensor and its stored bytes hold its elements."""
    import dataclasses

    key = "embedding.word_embeddings.weight"

    def grow(size, chunks):
        rows = 10**12
        if how == "chunk":  # the global shape and its one chunk grow together, the bytes stay as they were
            return torch.Size((rows, *size[1:])), [dataclasses.replace(chunks[0], sizes=torch.Size((rows, *size[1:])))]
        return size, [dataclasses.replace(c, sizes=torch.Size((rows, *c.sizes[1:]))) for c in chunks]

    _inflate(ckpt / ITER, key, grow)
    needle = "elements but stores" if how == "chunk" else "lies outside its shape"
    _refused(capsys, needle, "inspect", str(ckpt))
    _refused(capsys, needle, "export", "--load", str(ckpt), "--save", str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


def test_common_pt_payload_does_not_run(ckpt, tmp_path, capsys):
    flag = tmp_path / "pwned"
    torch.save({"args": _Payload(flag)}, ckpt / ITER / "common.pt")
    _refused(capsys, "allow-list", "inspect", str(ckpt))
    _refused(capsys, "allow-list", "layout", str(ckpt))
    _refused(capsys, "allow-list", "export", "--load", str(ckpt), "--save", str(tmp_path / "hf"))
    assert not flag.exists(), "the payload ran"


def test_legacy_rank_file_payload_does_not_run(tmp_path, capsys):
    flag = tmp_path / "pwned"
    root = tmp_path / "legacy"
    (root / "release" / "mp_rank_00").mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release")
    torch.save({"args": _Payload(flag), "model": {}}, root / "release" / "mp_rank_00" / "model_optim_rng.pt")
    _refused(capsys, "model_optim_rng.pt", "inspect", str(root))
    _refused(capsys, "model_optim_rng.pt", "export", "--load", str(root), "--save", str(tmp_path / "hf"))
    _refused(capsys, "model_optim_rng.pt", "layout", str(root))
    assert not flag.exists(), "the payload ran"


def _rewrite_paths(folder: Path, new_path) -> None:
    """Our own fixture's metadata (trusted), with every data file name replaced."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = new_path(info.relative_path)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.parametrize("where", ["dotdot", "absolute", "linked_folder"])
def test_data_files_outside_the_checkpoint_are_not_read(ckpt, tmp_path, capsys, where):
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = ckpt / ITER
    for f in folder.glob("*.distcp"):
        shutil.copy(f, outside / f.name)  # a readable target, so only confinement can refuse it
    if where == "linked_folder":
        (folder / "sub").symlink_to(outside)
    name = {"dotdot": lambda n: f"../../outside/{n}", "absolute": lambda n: str(outside / n),
            "linked_folder": lambda n: f"sub/{n}"}[where]
    _rewrite_paths(folder, name)
    out = tmp_path / "hf"
    _refused(capsys, "outside the checkpoint", "inspect", str(ckpt))
    _refused(capsys, "outside the checkpoint", "export", "--load", str(ckpt), "--save", str(out))
    assert not out.exists()


def test_a_distcp_file_that_is_a_link_is_read(ckpt, tmp_path, capsys):
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    for f in (ckpt / ITER).glob("*.distcp"):
        shutil.move(f, elsewhere / f.name)
        f.symlink_to(elsewhere / f.name)
    code, errors = _cli(capsys, "export", "--load", str(ckpt), "--save", str(tmp_path / "hf"), "--quiet")
    assert code == 0 and not errors


def test_save_never_overlaps_the_source(ckpt, tmp_path, capsys):
    before = _tree(ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    for save in (ckpt, ckpt / ITER, ckpt / ITER / "hf", ckpt / "hf", tmp_path, link):
        _refused(capsys, "never writes into, over or around", "export", "--load", str(ckpt), "--save", str(save),
                 "--overwrite")
    _refused(capsys, "never writes into, over or around", "export", "--load", str(ckpt / ITER), "--save",
             str(ckpt / ITER), "--overwrite")
    _refused(capsys, "never writes into, over or around", "reshard", "--load", str(ckpt), "--save", str(ckpt),
             "--overwrite")
    _refused(capsys, "never writes into, over or around", "reshard", "--load", str(link), "--save", str(ckpt / "new"))
    _refused(capsys, "never writes into, over or around", "export", "--watch", str(ckpt), "--save", str(ckpt / "hf"),
             "--once")
    assert _tree(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "link"]


def test_import_never_overwrites_its_source(ckpt, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(hf), "--quiet")[0] == 0
    before = _tree(hf)
    _refused(capsys, "never writes into, over or around", "import", "--load", str(hf), "--save", str(hf), "--overwrite")
    _refused(capsys, "never writes into, over or around", "import", "--load", str(hf), "--save", str(tmp_path),
             "--overwrite")
    assert _tree(hf) == before


def test_save_that_is_a_link_or_a_file(ckpt, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "out"
    link.symlink_to(target)
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(link), "--quiet")[0] == 0
    assert link.is_symlink() and marker.finished(target, hf_sink.complete), "the export goes into the link's target"
    afile = tmp_path / "afile"
    afile.write_text("precious")
    _refused(capsys, "is a file; pass --overwrite", "export", "--load", str(ckpt), "--save", str(afile))
    assert afile.read_text() == "precious"
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(afile), "--overwrite", "--quiet")[0] == 0
    assert marker.finished(afile, hf_sink.complete)
    assert not [p.name for p in tmp_path.iterdir() if "distconv" in p.name], "no leftovers"


def test_marker_catches_a_same_size_corruption(ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(out), "--quiet")[0] == 0
    shard = next(out.glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert not marker.finished(out, hf_sink.complete)
    # asked again, it is not "skipped": the damaged folder is not distconv's finished work
    _refused(capsys, "not empty; pass --overwrite", "export", "--load", str(ckpt), "--save", str(out))
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(out), "--overwrite", "--quiet")[0] == 0
    assert marker.finished(out, hf_sink.complete)


def test_partial_folders_of_other_runs_are_kept_and_reported(ckpt, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(hf), "--quiet")[0] == 0
    save = tmp_path / "mc"
    stale = [tmp_path / ".mc.distconv-partial", tmp_path / ".mc.distconv-partial-0badc0de"]
    for s in stale:
        s.mkdir()
        (s / "keep").write_text("not this run's")
    # a failing run (bad size) and a successful one leave the other runs' folders alone
    _refused(capsys, "", "import", "--load", str(hf), "--save", str(save), "--tensor-model-parallel-size", "3")
    assert all((s / "keep").exists() for s in stale)
    capsys.readouterr()
    assert main(["import", "--load", str(hf), "--save", str(save), "--quiet"]) == 0
    assert "partial folder(s) of earlier, unfinished runs" in capsys.readouterr().err
    assert all((s / "keep").exists() for s in stale)
    assert main(["import", "--load", str(hf), "--save", str(save), "--overwrite", "--quiet"]) == 0
    assert not any(s.exists() for s in stale)
    assert (save / "latest_checkpointed_iteration.txt").exists()


def test_unwritable_report_is_refused_before_the_work(ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "hf"
    _refused(capsys, "--report", "export", "--load", str(ckpt), "--save", str(out), "--report",
             str(tmp_path / "afile" / "report.json"))
    assert not out.exists()


@pytest.mark.parametrize("size", ["1.2.3", "0", "-1", "5XB"])
def test_bad_shard_size_is_one_clear_line(ckpt, tmp_path, capsys, size):
    _refused(capsys, "give a positive size", "export", "--load", str(ckpt), "--save", str(tmp_path / "hf"),
             "--max-shard-size", size)


def test_verify_never_unpickles_a_bin_file(ckpt, tmp_path, capsys):
    flag = tmp_path / "pwned"
    hf = tmp_path / "hf"
    assert _cli(capsys, "export", "--load", str(ckpt), "--save", str(hf), "--quiet")[0] == 0
    for f in hf.glob("*.safetensors*"):
        f.unlink()
    torch.save({"w": _Payload(flag)}, hf / "pytorch_model.bin")
    _refused(capsys, "safetensors", "verify", "--load", str(ckpt), "--hf", str(hf))
    assert not flag.exists(), "the payload ran"


def test_save_dot_from_inside_the_target(ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "hf"
    out.mkdir()
    monkeypatch.chdir(out)
    code, errors = _cli(capsys, "export", "--load", str(ckpt), "--save", ".", "--quiet")
    assert code == 0 and not errors
    assert marker.finished(out, hf_sink.complete) and Path.cwd() == out


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"])
def test_full_disk_while_writing_small_files_names_the_file(built, tmp_path, name):
    """A file that cannot be written (here: a link to /dev/full, which answers ENOSPC)."""
    from transformers import AutoTokenizer, LlamaConfig

    from distconv.engine.plan import Output
    from distconv.errors import DistconvError
    from distconv.hf.sink import write_generation_config, write_index, write_tokenizer

    if not os.path.exists("/dev/full"):
        pytest.skip("this system has no /dev/full to stand for a full disk")
    (tmp_path / name).symlink_to("/dev/full")
    with pytest.raises(DistconvError, match=name.replace(".", r"\.") + ".*No space left"):
        if name == "generation_config.json":
            write_generation_config(tmp_path, LlamaConfig(), None)
        elif name == "tokenizer_config.json":
            write_tokenizer(tmp_path, AutoTokenizer.from_pretrained(str(built / "tokenizer"), trust_remote_code=False))
        else:
            write_index(tmp_path, [Output("w", (2,), torch.float32, "model.safetensors")])


def _with_common_state_in_dcp(src: Path, dst: Path, common: bytes) -> Path:
    """``src`` (our trusted fixture) re-saved the way megatron-core 0.19 saves: no common.pt,
    the common state as a bytes entry of the DCP checkpoint itself."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = src / ITER
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in metadata.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    state["common_state/shard_0_1"] = io.BytesIO(common)
    (dst / ITER).mkdir(parents=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst / ITER)), no_dist=True)
    shutil.copy(folder / "metadata.json", dst / ITER / "metadata.json")
    (dst / "latest_checkpointed_iteration.txt").write_text("100")
    return dst


def test_common_state_inside_dcp_is_read_with_the_allow_list(ckpt, tmp_path, capsys):
    import io

    good = io.BytesIO()
    torch.save(torch.load(ckpt / ITER / "common.pt", weights_only=False), good)  # our own fixture, trusted
    root = _with_common_state_in_dcp(ckpt, tmp_path / "v019", good.getvalue())
    assert not (root / ITER / "common.pt").exists()
    code, errors = _cli(capsys, "layout", str(root))
    assert code == 0 and not errors
    code, errors = _cli(capsys, "export", "--load", str(root), "--save", str(tmp_path / "hf"), "--quiet")
    assert code == 0 and not errors and marker.finished(tmp_path / "hf", hf_sink.complete)

    flag = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save({"args": _Payload(flag)}, evil)
    bad = _with_common_state_in_dcp(ckpt, tmp_path / "evil", evil.getvalue())
    _refused(capsys, "allow-list", "layout", str(bad))
    _refused(capsys, "allow-list", "inspect", str(bad))
    assert not flag.exists(), "the payload ran"


def test_a_failed_rename_puts_back_what_save_held(tmp_path):
    """The last step swaps the finished folder in; when that rename fails, the previous --save is
    back under its name, intact, and the error says what failed."""
    from distconv.engine.folder import OutputFolder
    from distconv.errors import DistconvError

    save = tmp_path / "out"
    save.mkdir()
    (save / "model.safetensors").write_bytes(b"the user's previous export")
    folder = OutputFolder(save, overwrite=True)
    folder.create()
    (folder.tmp / "model.safetensors").write_bytes(b"new")
    (folder.tmp / "x").mkdir()
    folder.tmp.rename(folder.tmp.with_name(folder.tmp.name + "-gone"))  # the rename source vanishes
    with pytest.raises(DistconvError, match="cannot rename the finished output"):
        folder.commit()
    assert (save / "model.safetensors").read_bytes() == b"the user's previous export"
    assert not list(tmp_path.glob(".out.distconv-old-*"))


# ---- round two (issue 25) -------------------------------------------------------------------

def _export(capsys, ckpt: Path, out: Path, *extra: str) -> None:
    code, errors = _cli(capsys, "export", "--load", str(ckpt), "--save", str(out), "--quiet", *extra)
    assert code == 0 and not errors, errors


def test_verify_never_unpickles_extra_state(ckpt, tmp_path, capsys):
    """An ``_extra_state`` item of an allow-listed ``.metadata`` pointed at a ``torch.save``'d payload
    appended to a ``.distcp`` file: torch's DCP would read it with ``weights_only=False``."""
    import io

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    flag = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(_Payload(flag), evil)
    torch.load(io.BytesIO(evil.getvalue()), weights_only=False)
    assert flag.exists(), "the payload is not live"
    flag.unlink()
    folder = ckpt / ITER
    metadata = FileSystemReader(str(folder)).read_metadata()  # our own fixture, trusted
    extra = [k for k, m in metadata.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)
             and "_extra_state" in k]
    assert extra
    for index, info in metadata.storage_data.items():
        if index.fqn in extra:
            data = folder / info.relative_path
            info.offset, info.length = data.stat().st_size, len(evil.getvalue())
            with data.open("ab") as f:
                f.write(evil.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    code, errors = _cli(capsys, "verify", "--load", str(ckpt), "--hf", str(hf))
    assert not flag.exists(), "the payload ran"
    assert code == 0 and not errors, errors


def test_tracker_with_a_digit_int_refuses_is_one_line(ckpt, tmp_path, capsys):
    (ckpt / "latest_checkpointed_iteration.txt").write_text("²")  # str.isdigit() is True, int() fails
    _refused(capsys, "neither an iteration number nor 'release'", "inspect", str(ckpt))
    _refused(capsys, "neither an iteration number nor 'release'", "export", "--watch", str(ckpt), "--save",
             str(tmp_path / "hf"), "--once")


@pytest.mark.parametrize("config,header,needle", [
    ("[1, 2]", None, "not an object"),
    ('{"architectures": "LlamaForCausalLM"}', None, "architectures"),
    ('{"quantization_config": [1]}', None, "quantization_config"),
    ("{}", [1], "not an object"),
    ("{}", {"w": 5}, "header entry 'w'"),
    ("{}", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, "header entry 'w'"),
])
def test_inspect_malformed_hf_folder_is_one_line(tmp_path, capsys, config, header, needle):
    import json

    (tmp_path / "config.json").write_text(config)
    if header is not None:
        raw = json.dumps(header).encode()
        (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    _refused(capsys, needle, "inspect", str(tmp_path))


@pytest.mark.parametrize("config", ['{"architectures": ["LlamaForCausalLM"]}', '{"vocab_size": "250"}', "[250]"])
def test_verify_config_without_a_vocab_size_is_one_line(ckpt, tmp_path, capsys, config):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(config)
    _refused(capsys, "vocab_size", "verify", "--load", str(ckpt), "--hf", str(hf))


def test_single_process_errors_are_not_lost_contact(capsys, monkeypatch):
    """What a memory or other runtime error says: "lost contact" only where there are other ranks."""
    import distconv.cli

    for world, error, needle in [
        (None, MemoryError(), "out of memory"),
        (None, RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
         "out of memory"),
        (None, RuntimeError("Error(s) in loading state_dict"), "RuntimeError: Error(s) in loading state_dict"),
        ("2", RuntimeError("Connection closed by peer"), "lost contact with another rank (Connection closed"),
    ]:
        def fail(opts, error=error):
            raise error

        monkeypatch.setattr(distconv.cli, "_dispatch", fail)
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        message = _refused(capsys, needle, "inspect", "anything")
        assert ("lost contact" in message) == (world is not None)


def test_args_of_the_wrong_type_are_one_line_in_inspect(ckpt, capsys):
    common = ckpt / ITER / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture, trusted
    state["args"].num_experts, state["args"].moe_layer_freq = 2, "²"
    torch.save(state, common)
    code, errors = _cli(capsys, "inspect", str(ckpt))
    assert code == 0 and not errors  # the family is "none (...)", the rest is reported
    state["args"].tensor_model_parallel_size = "two"
    torch.save(state, common)
    _refused(capsys, "tensor_model_parallel_size='two', not a whole number", "inspect", str(ckpt))


def _edit_common(folder: Path, **changes) -> None:
    common = folder / "common.pt"
    state = torch.load(common, weights_only=False)  # our own fixture, trusted
    for k, v in changes.items():
        setattr(state["args"], k, v)
    torch.save(state, common)


def test_import_checks_config_sizes_before_building_a_model(ckpt, tmp_path, capsys):
    """A config.json claiming a million layers (or experts) over 4 stored layers is refused at once,
    not built as a meta model for minutes and gigabytes."""
    import json

    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1_000_000}))
    _refused(capsys, "the config says 1000000 layers, but the safetensors store 4", "import", "--load", str(hf),
             "--save", str(tmp_path / "mc"))
    assert not (tmp_path / "mc").exists()


def test_import_counts_experts_held_in_one_tensor_before_building_a_model(built, tmp_path, capsys):
    """gpt-oss holds a layer's experts in one tensor: they are counted by its first axis (the folder
    imports as it is; a config claiming a million experts over 4 is refused at once)."""
    import json

    hf = tmp_path / "hf"
    _export(capsys, layout_dir(built, "gpt_oss", 1, 1), hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_local_experts": 1_000_000}))
    message = _refused(capsys, "the config says 1000000 experts, but the safetensors' model.layers.", "import", "--load",
                       str(hf), "--save", str(tmp_path / "mc"))
    assert message.endswith("holds 4; no model is built from a config that contradicts the tensors"), message
    assert not (tmp_path / "mc").exists()


def test_export_checks_stored_experts_before_building_a_model(built, tmp_path, capsys):
    root = tmp_path / "mixtral"
    shutil.copytree(built / "mixtral" / "grouped_gemm_keys", root)  # per-expert keys: weight{e}
    _edit_common(root / "release", num_experts=1_000_000)
    _refused(capsys, "args say 1000000 experts, but it stores 4", "export", "--load", str(root), "--save",
             str(tmp_path / "hf"))


@pytest.mark.parametrize("change,needle", [
    ({"ffn_hidden_size": 2**27}, "linear_fc1.weight is stored as [4, 256, 64]"),
    ({"num_layers": 1_000_000}, "num_layers=1000000, but it stores 4"),
])
def test_verify_checks_args_against_stored_shapes_before_building(ckpt, tmp_path, capsys, change, needle):
    """Args that contradict the stored shapes are refused before megatron-core's model is built (run
    with a 6 GiB address-space limit, so that an attempt to allocate fails instead of paging)."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    _edit_common(ckpt / ITER, **change)

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run([sys.executable, "-m", "distconv", "verify", "--load", str(ckpt), "--hf", str(hf)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300, cwd=ROOT,
                          preexec_fn=limit)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("distconv: error:")]
    assert proc.returncode == 1 and len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]


def _with_remote_code(folder: Path, flag: Path, json_name: str, known: bool) -> None:
    """``folder``'s ``json_name`` gets an ``auto_map`` naming Python files of the folder that touch
    ``flag`` when imported (what ``trust_remote_code`` would run); unless ``known``, its model type or
    tokenizer class is one transformers does not have, so only that code could load it."""
    import json

    code = f"open({str(flag)!r}, 'w').close()\n"
    (folder / "tokenization_evil.py").write_text(code + "from transformers import PreTrainedTokenizerFast\n"
                                                 "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (folder / "configuration_evil.py").write_text(code + "from transformers import LlamaConfig\n"
                                                  "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    (folder / "modeling_evil.py").write_text(code + "from transformers import LlamaForCausalLM\n"
                                             "class EvilModel(LlamaForCausalLM):\n    pass\n")
    path = folder / json_name
    data = json.loads(path.read_text()) if path.exists() else {}
    if json_name == "tokenizer_config.json":
        data["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
        if not known:
            data["tokenizer_class"] = "EvilTokenizer"
    else:
        data["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
        if not known:
            data["model_type"] = "evil"
    path.write_text(json.dumps(data))


def test_remote_code_is_never_run_nor_asked_about(ckpt, built, tmp_path, capsys, monkeypatch):
    """A folder that only its own code could load (an ``auto_map`` and a type transformers lacks) is
    one line naming the file, even with "y" waiting on stdin for transformers' question."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 20))
    flag = tmp_path / "pwned"
    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    out = tmp_path / "out"

    tokenizer = tmp_path / "tok"
    shutil.copytree(built / "tokenizer", tokenizer)
    _with_remote_code(tokenizer, flag, "tokenizer_config.json", known=False)
    _refused(capsys, f"{tokenizer}/tokenizer_config.json has an auto_map", "export", "--load", str(ckpt), "--save",
             str(out), "--tokenizer", str(tokenizer))
    _edit_common(ckpt / ITER, tokenizer_model=str(tokenizer), tokenizer_type="HuggingFaceTokenizer")
    _refused(capsys, "tokenizer_config.json has an auto_map", "export", "--load", str(ckpt), "--save", str(out))
    _edit_common(ckpt / ITER, tokenizer_model=None)

    config_dir = tmp_path / "config_dir"
    config_dir.mkdir()
    shutil.copy(hf / "config.json", config_dir / "config.json")
    _with_remote_code(config_dir, flag, "config.json", known=False)
    for given in (config_dir, config_dir / "config.json"):
        _refused(capsys, f"{config_dir}/config.json has an auto_map", "export", "--load", str(ckpt), "--save", str(out),
                 "--hf-config", str(given))

    remote = tmp_path / "remote"
    shutil.copytree(hf, remote)
    _with_remote_code(remote, flag, "config.json", known=False)
    _refused(capsys, f"{remote}/config.json has an auto_map", "import", "--load", str(remote), "--save", str(out))
    _refused(capsys, f"{remote}/config.json has an auto_map", "verify", "--load", str(ckpt), "--hf", str(remote))
    assert not flag.exists(), "the folder's code ran"
    assert not out.exists()


def test_an_auto_map_transformers_does_not_need_is_ignored_and_not_exported(ckpt, built, tmp_path, capsys):
    """Hub folders such as DeepSeek-V3's name their own code in ``auto_map`` though transformers has the
    class: its own class is used, one warning names the file, and no ``auto_map`` or code reaches the export."""
    import json

    flag = tmp_path / "pwned"
    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    tokenizer, config_dir = tmp_path / "tok", tmp_path / "config_dir"
    shutil.copytree(built / "tokenizer", tokenizer)
    _with_remote_code(tokenizer, flag, "tokenizer_config.json", known=True)
    config_dir.mkdir()
    shutil.copy(hf / "config.json", config_dir / "config.json")
    _with_remote_code(config_dir, flag, "config.json", known=True)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["export", "--load", str(ckpt), "--save", str(out), "--quiet", "--tokenizer", str(tokenizer),
                 "--hf-config", str(config_dir)]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if "auto_map" in l]
    assert len(warnings) == 2 and f"{tokenizer}/tokenizer_config.json" in warnings[1], warnings
    assert all("is ignored" in w for w in warnings) and f"{config_dir}/config.json" in warnings[0]
    for name in ("config.json", "tokenizer_config.json"):
        assert "auto_map" not in json.loads((out / name).read_text()), name
    assert not list(out.glob("*.py"))

    remote = tmp_path / "remote"
    shutil.copytree(hf, remote)
    _with_remote_code(remote, flag, "config.json", known=True)
    capsys.readouterr()
    assert main(["import", "--load", str(remote), "--save", str(tmp_path / "mc"), "--quiet"]) == 0
    assert main(["verify", "--load", str(ckpt), "--hf", str(remote)]) == 0
    assert capsys.readouterr().err.count(f"the auto_map in {remote}/config.json is ignored") == 2
    assert not flag.exists(), "the folder's code ran"


def _relist(folder: Path, keep) -> None:
    """Rewrite ``folder``'s marker to list only the files ``keep(name)`` accepts (what a hand-edited
    marker would say); their sums stay right."""
    import json

    data = json.loads((folder / marker.MARKER).read_text())
    data["files"] = {n: v for n, v in data["files"].items() if keep(n)}
    (folder / marker.MARKER).write_text(json.dumps(data))


def test_marker_lists_the_whole_folder(ckpt, tmp_path, capsys):
    """A file, link or folder planted into a finished export makes it unfinished (it is not skipped as
    done); so does a marker trimmed to fewer files, with or without those files."""
    out = tmp_path / "hf"
    _export(capsys, ckpt, out)
    assert marker.finished(out, hf_sink.complete)
    for plant in ("pytorch_model.bin", "modeling_evil.py", "sub/x.json", "link", "empty"):
        path = out / plant
        if plant == "link":
            path.symlink_to(out / "config.json")
        elif plant == "empty":
            path.mkdir()
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text("planted")
        assert not marker.finished(out, hf_sink.complete), plant
        if plant == "pytorch_model.bin":  # asked again, the export is not "already done"
            _refused(capsys, "not empty; pass --overwrite", "export", "--load", str(ckpt), "--save", str(out))
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if path.parent != out:
            path.parent.rmdir()
        assert marker.finished(out, hf_sink.complete), plant

    _relist(out, lambda n: n == "config.json")
    assert not marker.finished(out, hf_sink.complete)
    for f in out.iterdir():
        if f.name not in ("config.json", marker.MARKER):
            f.unlink()
    assert not marker.finished(out, hf_sink.complete), "a folder of config.json alone is no export"


def test_marker_of_a_megatron_save_root_needs_every_data_file(ckpt, tmp_path, capsys):
    hf, mc = tmp_path / "hf", tmp_path / "mc"
    _export(capsys, ckpt, hf)
    code, errors = _cli(capsys, "import", "--load", str(hf), "--save", str(mc), "--quiet")
    assert code == 0 and not errors, errors
    assert marker.finished(mc, megatron_save.complete)
    (mc / "release" / "extra.pt").write_bytes(b"planted")
    assert not marker.finished(mc, megatron_save.complete)
    (mc / "release" / "extra.pt").unlink()
    shard = next((mc / "release").glob("*.distcp"))
    shard.unlink()
    _relist(mc, lambda n: n != f"release/{shard.name}")
    assert not marker.finished(mc, megatron_save.complete), "the marker lists what is there, but .metadata names a missing file"


def test_watcher_never_redoes_a_folder_without_a_marker(ckpt, tmp_path, capsys):
    """The user's own ``SAVE/iter_0000100`` (no distconv.json) is left alone: that iteration fails with
    one line, as a plain export would; a target that is a file is left alone too."""
    save = tmp_path / "hf"
    mine = save / ITER
    mine.mkdir(parents=True)
    (mine / "precious.txt").write_text("the user's")
    _refused(capsys, "exists and is not empty", "export", "--watch", str(ckpt), "--save", str(save), "--once")
    assert (mine / "precious.txt").read_text() == "the user's" and sorted(p.name for p in mine.iterdir()) == ["precious.txt"]
    shutil.rmtree(mine)
    mine.write_text("a file")
    _refused(capsys, "is a file", "export", "--watch", str(ckpt), "--save", str(save), "--once")
    assert mine.read_text() == "a file"


def test_one_run_per_save(ckpt, tmp_path, capsys):
    """A run stopped (SIGSTOP) while it writes holds --save: a second run, with or without
    --overwrite, gets one line and touches nothing; the first then finishes."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, subprocess_env

    hf, save = tmp_path / "hf", tmp_path / "mc"
    _export(capsys, ckpt, hf)
    first = ["import", "--load", str(hf), "--save", str(save), "--quiet"]
    for attempt in range(5):  # stop it between creating its partial folder and renaming it onto --save
        run = subprocess.Popen([sys.executable, "-m", "distconv", *first], env=subprocess_env(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        partial = None
        while run.poll() is None and partial is None:
            partial = next(tmp_path.glob(".mc.distconv-partial-*"), None)
            time.sleep(0.0005)
        if partial is not None:
            run.send_signal(signal.SIGSTOP)
            if partial.exists():
                break
            run.send_signal(signal.SIGCONT)
        run.communicate(timeout=300)
        shutil.rmtree(save, ignore_errors=True)
    else:
        pytest.skip("could not stop the first run while it was writing (5 tries)")
    try:
        _refused(capsys, "is being written by another distconv run", *first)
        _refused(capsys, "is being written by another distconv run", *first, "--overwrite")
        assert partial.exists(), "--overwrite removed the partial folder of a live run"
        assert not save.exists()
    finally:
        run.send_signal(signal.SIGCONT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert marker.finished(save, megatron_save.complete) and not partial.exists()
    assert not list(tmp_path.glob(".mc.distconv-lock")), "the run removes the lock file it created"


def test_lock_file_is_never_followed_nor_removed_unless_created(ckpt, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.write_text("the user's")
    out = tmp_path / "hf"
    lock = tmp_path / ".hf.distconv-lock"
    lock.symlink_to(precious)
    _refused(capsys, f"cannot use the lock file {lock}", "export", "--load", str(ckpt), "--save", str(out))
    assert precious.read_text() == "the user's" and not out.exists()
    lock.unlink()
    lock.write_text("")  # left by a killed run: reused, and kept (this run did not create it)
    _export(capsys, ckpt, out)
    assert lock.exists() and marker.finished(out, hf_sink.complete)


def test_read_only_parent_needs_no_lock_to_skip(ckpt, tmp_path, capsys):
    """Guard for the lock: a finished export on a read-only file system is still skipped (the lock is
    taken only to write), and writing there is one line naming the lock file."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this process may not mount a tmpfs to make read-only (root only)")
    try:
        out = disk / "hf"
        _export(capsys, ckpt, out)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert main(["export", "--load", str(ckpt), "--save", str(out)]) == 0
        assert "skipped" in capsys.readouterr().out
        _refused(capsys, f"cannot create the lock file {disk}/.hf.distconv-lock next to --save: Read-only file system",
                 "export", "--load", str(ckpt), "--save", str(out), "--dtype", "fp32", "--overwrite")
        assert marker.finished(out, hf_sink.complete)
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_overwrite_never_destroys_a_source_through_its_links(ckpt, tmp_path, capsys):
    """A checkpoint (or HF folder) whose data files are links into --save: --overwrite would replace
    --save and with it the source's data. Every command refuses, and both stay byte for byte."""
    store = tmp_path / "store"
    store.mkdir()
    for f in (ckpt / ITER).glob("*.distcp"):
        shutil.move(f, store / f.name)
        f.symlink_to(store / f.name)
    before, kept = _tree(ckpt), _tree(store)
    for command in ("export", "reshard"):
        _refused(capsys, f"contains the source {store}/", command, "--load", str(ckpt), "--save", str(store),
                 "--overwrite")
    assert _tree(ckpt) == before and _tree(store) == kept

    hf = tmp_path / "hf"
    _export(capsys, ckpt, hf)
    shards = tmp_path / "shards"
    shards.mkdir()
    for f in hf.glob("*.safetensors"):
        shutil.move(f, shards / f.name)
        f.symlink_to(shards / f.name)
    (hf / "tokenizer.json").unlink(missing_ok=True)
    kept = _tree(shards)
    _refused(capsys, f"contains the source {shards}/", "import", "--load", str(hf), "--save", str(shards), "--overwrite")
    config_dir = tmp_path / "config_dir"
    config_dir.mkdir()
    shutil.move(hf / "config.json", shards / "config.json")
    (config_dir / "config.json").symlink_to(shards / "config.json")
    kept = _tree(shards)
    _refused(capsys, f"contains the source {shards}/config.json", "export", "--load", str(ckpt), "--save", str(shards),
             "--overwrite", "--hf-config", str(config_dir))
    assert _tree(shards) == kept


def test_import_refuses_fp8_scales_that_are_not_finite_and_positive(ckpt, tmp_path, capsys):
    from test_bad_input import _poison_hf

    clean = tmp_path / "clean"
    _export(capsys, ckpt, clean, "--dtype", "fp8")
    for value in (float("nan"), float("inf"), 0.0, -1.0):
        source = tmp_path / f"fp8_{value}"
        shutil.copytree(clean, source)
        _poison_hf(source, "model.layers.0.mlp.down_proj.weight_scale_inv", value)
        _refused(capsys, "model.layers.0.mlp.down_proj.weight_scale_inv holds a scale that is NaN, infinite, zero or "
                 "negative", "import", "--load", str(source), "--save", str(tmp_path / "mc"))
        assert not (tmp_path / "mc").exists()


def test_launchers_cap_processes_on_cpus(ckpt, tmp_path):
    """Args claiming TP 512 x PP 8 on a node without GPUs: the launchers start at most as many
    processes as ranks wrote the checkpoint (4 here) and the node has cores, not 4,096."""
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    _edit_common(ckpt / ITER, tensor_model_parallel_size=512, pipeline_model_parallel_size=8)
    fake = tmp_path / "bin"
    fake.mkdir()
    python = fake / "python"  # the real interpreter, except that torchrun only says how it was started
    python.write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m torch.distributed.run" ]; then echo "torchrun $*"; exit 0; fi\n'
                      f'exec {sys.executable} "$@"\n')
    for name, body in (("nvidia-smi", "exit 1"), ("scontrol", "echo node0"), ("srun", 'echo "srun $*"')):
        (fake / name).write_text(f"#!/bin/bash\n{body}\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    env = {**subprocess_env(), "PATH": f"{fake}:{os.environ['PATH']}", "PYTHON": str(python),
           "SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node0"}
    want = min(4, len(os.sched_getaffinity(0)))
    for script in (["bash", str(ROOT / "launch" / "export.sh"), str(ckpt), str(tmp_path / "hf")],
                   ["bash", str(ROOT / "slurm" / "distconv.sbatch"), "export", "--load", str(ckpt), "--save", "x"]):
        proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"--nproc-per-node {want} " in proc.stdout, proc.stdout
    proc = subprocess.run([str(python), "-m", "distconv", "layout", str(ckpt)], env=env, capture_output=True, text=True)
    assert proc.stdout.strip() == "4096", "without --cpu, layout still prints the args' model-parallel size"
    from distconv.megatron.source import writer_count

    assert writer_count(ckpt) == 4  # the fixture was saved by 4 ranks (__0_0 ... __3_1.distcp)


def test_tokenizer_saved_in_the_checkpoint_wins_over_files_args_name(ckpt, built, tmp_path, capsys):
    """Megatron-LM saves the tokenizer in the iteration's ``tokenizer/``: it is used, and the folder
    args name elsewhere is not read; without it, args' folder is read with a warning naming it."""
    import json

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(built / "tokenizer", elsewhere)
    _edit_common(ckpt / ITER, tokenizer_model=str(elsewhere), tokenizer_type="HuggingFaceTokenizer")
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", "--load", str(ckpt), "--save", str(out), "--quiet"]) == 0
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distconv: warning:")]
    assert len(warnings) == 1 and f"args.tokenizer_model {elsewhere} lies outside the checkpoint" in warnings[0], warnings

    shutil.copytree(built / "tokenizer", ckpt / ITER / "tokenizer")
    (elsewhere / "tokenizer.json").write_text("not read")  # it would fail to load if it were
    out = tmp_path / "hf2"
    capsys.readouterr()
    assert main(["export", "--load", str(ckpt), "--save", str(out), "--quiet"]) == 0
    assert "distconv: warning:" not in capsys.readouterr().err
    options = json.loads((out / marker.MARKER).read_text())["source"]["options"]
    assert options["tokenizer"] == str(ckpt / ITER / "tokenizer") and (out / "tokenizer.json").is_file()


def test_vocab_file_args_name_is_read_from_the_checkpoint_first_and_never_replaced(ckpt, tmp_path, capsys):
    """GPT2BPETokenizer: the checkpoint's saved ``tokenizer/vocab.json`` gives the vocab size; args'
    ``vocab_file`` elsewhere is read only without it, with a warning, and a --save holding it is refused."""
    import json

    store = tmp_path / "store"
    store.mkdir()
    (store / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(200)}))
    _edit_common(ckpt / ITER, tokenizer_type="GPT2BPETokenizer", tokenizer_model=None, vocab_size=None,
                 vocab_file=str(store / "vocab.json"), merge_file=str(store / "merges.txt"))
    _refused(capsys, f"contains the source {store}/vocab.json", "export", "--load", str(ckpt), "--save", str(store),
             "--overwrite")
    assert (store / "vocab.json").is_file()
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", "--load", str(ckpt), "--save", str(out), "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    assert f"args.vocab_file {store}/vocab.json (GPT2BPETokenizer) lies outside" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["vocab_size"] == 200

    (ckpt / ITER / "tokenizer").mkdir()
    (ckpt / ITER / "tokenizer" / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(210)}))
    (store / "vocab.json").unlink()
    capsys.readouterr()
    assert main(["export", "--load", str(ckpt), "--save", str(store), "--quiet", "--overwrite", "--report",
                 str(tmp_path / "r.json")]) == 0
    assert "distconv: warning:" not in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["vocab_size"] == 210 and report["vocab_source"].startswith("the checkpoint's ")


def test_inspect_says_which_tokenizer_an_export_reads(ckpt, built, tmp_path):
    """The checkpoint's ``tokenizer/`` first, as args' ``tokenizer_type`` reads it (an empty one is
    none; TikTokenizer's ``tokenizer.json`` is its tiktoken vocab, no HF tokenizer), else args' paths."""
    import json

    from distconv.inspect import inspect_checkpoint

    def said() -> dict:
        return inspect_checkpoint(ckpt)["tokenizer"]

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(built / "tokenizer", elsewhere)
    _edit_common(ckpt / ITER, tokenizer_model=str(elsewhere), tokenizer_type="HuggingFaceTokenizer")
    (ckpt / ITER / "tokenizer").mkdir()  # empty: NullTokenizer's, or a failed copy
    assert said() == {"kind": "HF tokenizer", "path": str(elsewhere), "from": "args.tokenizer_model",
                      "outside_checkpoint": True}
    shutil.copytree(built / "tokenizer", ckpt / ITER / "tokenizer", dirs_exist_ok=True)
    assert said() == {"kind": "HF tokenizer", "path": str(ckpt / ITER / "tokenizer"), "from": "the checkpoint's tokenizer",
                      "outside_checkpoint": False}
    _edit_common(ckpt / ITER, tokenizer_type="TikTokenizer", tokenizer_model=str(tmp_path / "gone.tiktoken"))
    assert said()["kind"] == "none"
    (ckpt / ITER / "tokenizer" / "vocab.json").write_text(json.dumps({"a": 0}))
    _edit_common(ckpt / ITER, tokenizer_type="GPT2BPETokenizer", vocab_file=str(elsewhere / "vocab.json"))
    assert said() == {"kind": "GPT2BPETokenizer file (the vocab size only)", "path": str(ckpt / ITER / "tokenizer" / "vocab.json"),
                      "from": "the checkpoint's", "outside_checkpoint": False}


def test_tiktoken_vocab_saved_as_tokenizer_json_is_not_read_as_an_hf_tokenizer(ckpt, tmp_path, capsys):
    """Megatron-LM saves TikTokenizer's vocab as ``tokenizer/tokenizer.json``: the export takes the vocab
    size from args, as Megatron-LM's TikTokenizer does, and writes no tokenizer (it used to fail loading it)."""
    import json

    (ckpt / ITER / "tokenizer").mkdir()
    (ckpt / ITER / "tokenizer" / "tokenizer.json").write_text(json.dumps([{"token_bytes": "AA==", "rank": 0}]))
    _edit_common(ckpt / ITER, tokenizer_type="TikTokenizer", tokenizer_model=None, vocab_size=250)
    out = tmp_path / "hf"
    _export(capsys, ckpt, out, "--report", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["vocab_size"] == 250 and report["vocab_source"] == "args.vocab_size (TikTokenizer)"
    assert not (out / "tokenizer.json").exists()


def test_save_in_a_folder_that_does_not_exist_yet(ckpt, tmp_path, capsys):
    """--save's parent is created (as before the lock), and the lock file next to it is removed."""
    out = tmp_path / "new" / "deeper" / "hf"
    _export(capsys, ckpt, out)
    assert marker.finished(out, hf_sink.complete) and sorted(p.name for p in out.parent.iterdir()) == ["hf"]
