"""One module per pipeline stage: plain ``run(cfg, paths...)`` functions, no Prefect or DVC inside."""

import os

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other work, spinning
# threads made a 2-thread training step ~8x slower than a 1-thread one (measured: 6.9 s vs 0.67 s per
# EfficientNet-Lite0 batch; 0.83 s with PASSIVE). Set here, before any stage imports torch, so it holds
# for `python -m tasks.<stage>` and torchrun; a user's own OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
