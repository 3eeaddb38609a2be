"""Stage ``headline``: the few numbers a run is judged by, in one small metrics file.

``python -m tasks.headline`` reads the detailed metrics the other stages wrote and writes
``data/metrics/headline.json``, the only file ``dvc.yaml`` declares as ``metrics`` -- so ``dvc exp show``
and ``dvc metrics diff`` show these columns by default (the detailed files stay beside it, git-tracked):

* ``classifier/val_mAP``;
* ``pseudo_masks/``: ``miou``, ``boundary_f1``, ``mean_mkc`` (co-occurrence confusion, datasets with
  contexts), and ``oracle_threshold_miou`` / ``oracle_threshold``: the best constant background threshold
  picked with the ground truth (an oracle, for comparison only; nothing in the pipeline uses it);
* ``refined_masks/``: ``miou``, ``boundary_f1``, ``mean_mkc`` of the AffinityNet refinement (``refine_masks``);
* ``segmenter/``: ``val_miou``, ``val_boundary_f1``.

A value whose stage has not run (or that a dataset cannot give) is ``null``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic
from core.paths import EVAL_PSEUDO_METRICS, EVAL_REFINED_METRICS, EVAL_SEG_METRICS, HEADLINE_METRICS, TRAIN_CLS_METRICS

SOURCES = {"train_cls": TRAIN_CLS_METRICS, "pseudo": EVAL_PSEUDO_METRICS,
           "refined": EVAL_REFINED_METRICS, "seg": EVAL_SEG_METRICS}
OUTPUT = HEADLINE_METRICS


def _read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun the stage that writes it") from None


def _get(d: dict, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def headline(train_cls: dict, pseudo: dict, seg: dict, refined: dict | None = None) -> dict:
    """The headline values from the detailed metrics dicts (missing -> None)."""
    refined = refined or {}
    return {
        "classifier": {"val_mAP": _get(train_cls, "val", "mAP")},
        "pseudo_masks": {"miou": _get(pseudo, "miou"), "boundary_f1": _get(pseudo, "boundary", "f1"),
                         "mean_mkc": _get(pseudo, "cooccurrence", "mean_ratio"),
                         "oracle_threshold_miou": _get(pseudo, "threshold_sweep", "oracle_miou"),
                         "oracle_threshold": _get(pseudo, "threshold_sweep", "oracle_threshold")},
        "refined_masks": {"miou": _get(refined, "miou"), "boundary_f1": _get(refined, "boundary", "f1"),
                          "mean_mkc": _get(refined, "cooccurrence", "mean_ratio")},
        "segmenter": {"val_miou": _get(seg, "miou"), "val_boundary_f1": _get(seg, "boundary", "f1")},
    }


def run(sources: dict[str, str] = SOURCES, out: str | Path = OUTPUT) -> dict:
    values = headline(_read(sources["train_cls"]), _read(sources["pseudo"]), _read(sources["seg"]),
                      _read(sources["refined"]) if "refined" in sources else {})
    write_text_atomic(out, json.dumps(values, indent=2) + "\n")
    return values


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.headline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=OUTPUT)
    args = ap.parse_args(argv)
    try:
        values = run(out=args.out)
    except ValueError as e:
        print(f"headline: error: {e}", file=sys.stderr)
        return 2
    flat = {f"{g}/{k}": v for g, d in values.items() for k, v in d.items()}
    print("headline: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in flat.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
