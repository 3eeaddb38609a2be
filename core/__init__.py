"""Infrastructure every stage uses: typed params, paths, atomic writes, hashing, the stage command line,
parallel maps, the training loop, run-dependent timings, live metrics and each stage's DVC deps."""
