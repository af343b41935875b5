"""Quality benchmark of the MiKV KV cache: the same as ``mikv-vllm eval [args]``.

    python benchmarks/quality.py --quick                 # smoke set, a few minutes
    python benchmarks/quality.py                         # policies x ~20/25/33/50 % cache (sweep)
    python benchmarks/quality.py --suite full --jobs 2   # sweep + frontier + ablations

Writes summary.json, results.md and quality.png under results/ (see docs/quality.md).
"""

from __future__ import annotations

import sys

from mikv_vllm.cli import main

if __name__ == "__main__":  # vLLM spawns processes: keep the entry point guarded
    sys.exit(main(["eval", *sys.argv[1:]]))
