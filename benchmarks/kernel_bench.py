"""Same as ``gatekv bench kernels``: see gatekv/bench_kernels.py."""

import sys

from gatekv.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main())
