"""bpext against native PyTorch and torch.compile: `python benchmarks/run.py [options]` is
`python -m bpext bench [options]` (the suite lives in bpext/bench.py; see --help)."""

import sys

from bpext.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
