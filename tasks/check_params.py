"""Stage ``check_params``: validate the whole params file before any other stage runs.

``python -m tasks.check_params [--params params.yaml]`` reads every section with the typed config
(:func:`core.config.load_params`): an unknown section or key, a wrong type or an out-of-range value
anywhere stops ``dvc repro`` (and the Prefect flow) here, naming the key, even when every other stage
is cached: ``dvc.yaml`` gives it the whole ``params.yaml`` as a file dep, so any edit of the file (a typo
included) reruns it, and it is first in the DAG (``prepare`` depends on its output). The output's bytes
never change, so a passing check reruns nothing downstream.
"""

from __future__ import annotations

import argparse
import sys

from core.atomic import write_text_atomic
from core.config import load_params
from core.paths import PARAMS_CHECKED

OUTPUT = PARAMS_CHECKED
CONTENT = "params validated by tasks.check_params\n"   # constant: downstream stages see no change


def run(params_path: str = "params.yaml", out: str = OUTPUT) -> None:
    load_params(params_path)
    write_text_atomic(out, CONTENT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.check_params", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=OUTPUT)
    args = ap.parse_args(argv)
    try:
        run(args.params, args.out)
    except ValueError as e:  # ConfigError
        print(f"check_params: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
