"""The command line every stage shares: ``python -m tasks.<stage> [--params FILE] [paths ...]``.

The stage's params sections are read and validated before any work; a bad input (``ValueError``:
the typed config's and every stage's errors; a missing file) becomes one line on stderr naming the
stage, and exit status 2, which is how ``dvc repro`` and the Prefect flow show it to the user.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from core.config import Params, load_params
from core.stage_params import stage_sections
from core.timings import timings_path


def stage_main(stage: str, doc: str | None, argv: list[str] | None, paths: dict[str, str | tuple[str, str]],
               body: Callable[[argparse.Namespace, Params], str | None], *, timings: bool = False,
               sections: str | None = None,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse ``argv``, load the params ``stage`` (or ``sections``'s stage) reads, run ``body``; print
    the summary line it returns. ``paths`` maps each path option to its default (or ``(default, help)``);
    ``timings`` adds ``--timings`` (run-dependent figures, :mod:`core.timings`)."""
    ap = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=(doc or "").split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="params file (e.g. configs/voc12.yaml)")
    if timings:
        ap.add_argument("--timings", default=str(timings_path(stage)),
                        help="run-dependent figures (core.timings; not a DVC output)")
    for flag, spec in paths.items():
        default, help_text = spec if isinstance(spec, tuple) else (spec, None)
        ap.add_argument(flag, default=default, help=help_text)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, sections=stage_sections(sections or stage))
        summary = body(args, params)
    except (ValueError, FileNotFoundError) as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        return 2
    if summary:
        print(f"{stage}: {summary}")
    return 0
