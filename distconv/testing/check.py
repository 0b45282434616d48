"""Compare an exported HF folder's logits with megatron-core's recorded ones.

    python -m distconv.testing.check --hf OUT --ref DIR/refs/NAME.pt [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="exported HF folder")
    parser.add_argument("--ref", required=True, help="reference file written by distconv.testing.build")
    parser.add_argument("--tol", type=float, default=1e-4)
    opts = parser.parse_args()
    from transformers import AutoModelForCausalLM

    ref = torch.load(opts.ref)
    model = AutoModelForCausalLM.from_pretrained(opts.hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    diff = (logits - ref["logits"][..., : logits.shape[-1]]).abs()
    top1 = (logits.argmax(-1) == ref["logits"][..., : logits.shape[-1]].argmax(-1)).float().mean().item()
    ok = diff.max().item() <= opts.tol
    print(f"transformers vs megatron-core logits: max |diff| {diff.max().item():.2e}, mean {diff.mean().item():.2e}, "
          f"top-1 agreement {top1:.0%} -> {'OK' if ok else 'MISMATCH'} (tolerance {opts.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
