"""Command line for `streammerge.testing.presets`: large veRL-format FSDP2 checkpoints of public model shapes.

    python benchmarks/make_checkpoint.py /work/bench-tmp/q05 --preset qwen2.5-0.5b --world-size 8
"""

import sys

from streammerge.testing.presets import main

if __name__ == "__main__":
    sys.exit(main())
