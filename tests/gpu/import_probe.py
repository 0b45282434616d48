"""``python -m distconv ARGS`` in this process, then what CUDA state it left (run by tests/gpu/check.py).

    python tests/gpu/import_probe.py RESULT.json import --load HF --save MEG ...

Runs ``distconv.cli.main(ARGS)`` (what ``python -m distconv`` runs) and writes RESULT.json:
its return code, whether torch initialised CUDA in this process, and on which devices a
primary CUDA context exists (``torch._C._cuda_hasPrimaryContext``, which creates none; None
where this torch build cannot tell).
"""

import json
import sys

import torch

from distconv.cli import main


def primary_contexts() -> list[int] | None:
    has = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if not torch.cuda.is_available():
        return []
    if has is None:
        return None
    return [i for i in range(torch.cuda.device_count()) if has(i)]


if __name__ == "__main__":
    result_path, argv = sys.argv[1], sys.argv[2:]
    try:
        rc = main(argv)
    except SystemExit as e:  # main() is decorated with torchelastic's @record; argparse exits
        rc = e.code if isinstance(e.code, int) else 1
    result = {"rc": rc, "cuda_initialized": torch.cuda.is_initialized(), "primary_contexts": primary_contexts(),
              "cuda_available": torch.cuda.is_available(),
              "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    with open(result_path, "w") as f:
        json.dump(result, f)
    sys.exit(0 if rc == 0 else 1)
