"""Print the MiKV bytes-per-token table (all presets) as Markdown; same as `mikv-vllm bytes`.

Usage: python benchmarks/bytes_table.py [--head-dims 64 128] [--block-sizes 16 128] [--presets NAME ...]
"""

import sys

from mikv_vllm.cli import main

if __name__ == "__main__":
    rc = main(["bytes", *sys.argv[1:]])
    if rc:
        sys.exit(rc)
