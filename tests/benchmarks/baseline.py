"""The single-process baseline a user would otherwise run, measured the same way.

    python tests/benchmarks/baseline.py --load ITER_DIR --save OUT --stats STATS.json

PyTorch's ``dcp_to_torch_save`` turns the whole DCP checkpoint into one ``torch.save`` file,
which is loaded back, mapped to HF names (with distconv's own family table, so only the I/O
strategy differs), and written with ``safetensors.torch.save_file`` in one process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from distconv.families import FAMILIES, pick_family
from distconv.megatron.args import spec_from_args
from distconv.megatron.catalogue import canonical, items_of
from distconv.megatron.checkpoint import safe_globals
from distconv.megatron.source import describe

from tests.benchmarks.stats import io_counters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--save", required=True)
    parser.add_argument("--stats", required=True)
    opts = parser.parse_args()
    out = Path(opts.save)
    out.mkdir(parents=True, exist_ok=True)
    before, start = io_counters(), time.perf_counter()
    ckpt = describe(opts.load)
    spec = spec_from_args(ckpt.args).with_vocab(int(ckpt.args.vocab_size))
    family = pick_family(FAMILIES, spec, None)
    dcp_to_torch_save(str(ckpt.path), str(out / "full.pt"))
    with torch.serialization.safe_globals(safe_globals()):
        state = torch.load(out / "full.pt", weights_only=True)
    hf = {}
    for key, info in ckpt.tensors.items():
        for item in items_of(info, spec.num_layers):
            tensor = state[key][item.index] if item.index else state[key]
            for name, t in family.export_tensor(canonical(item.name, spec.multi_latent_attention), tensor, spec):
                hf[name] = t.contiguous()
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    seconds, after = time.perf_counter() - start, io_counters()
    stats = {
        "seconds": seconds,
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "write_bytes": after["write_bytes"] - before["write_bytes"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(opts.stats).write_text(json.dumps([stats]))


if __name__ == "__main__":
    main()
