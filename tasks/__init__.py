"""One module per pipeline stage: plain ``run(cfg, paths...)`` functions, no Prefect or DVC inside."""
