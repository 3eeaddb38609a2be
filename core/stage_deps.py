"""What each DVC stage depends on, derived from the code: one source for the ``deps`` and ``params``
lists of ``dvc.yaml`` (``tests/test_stage_deps.py`` checks that they agree).

* **params**: the result-affecting keys of the params sections a stage reads (operational knobs --
  threads, workers, device, logging, checkpoints: ``knob(..., operational=True)`` -- are left out, so
  changing them leaves ``dvc status`` clean).
* **code**: the project files a stage's module imports, directly or not, at module level or inside
  functions (the import closure over ``core/``, ``models/``, ``tasks/``), so editing any of them marks
  the stage changed.

``python -m core.stage_deps`` prints both for every stage; ``--write`` rewrites them in ``dvc.yaml``
(keeping each stage's command, data deps, outputs, metrics and plots).
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

from core.config import Params, is_operational
from core.stage_params import STAGE_PARAMS

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "dataio", "artifacts", "method", "assets", "models", "tasks")

# stage -> its module (the params each stage reads: core.stage_params.STAGE_PARAMS)
STAGES: dict[str, str] = {
    "check_params": "tasks.check_params",
    "prepare": "tasks.prepare",
    "saliency": "tasks.saliency",
    "train_cls": "tasks.train_cls",
    "infer_cam": "tasks.infer_cam",
    "rescue_saliency": "tasks.rescue_saliency",
    "export_masks": "tasks.export_masks",
    "evaluate": "tasks.evaluate",
    "train_affinity": "tasks.train_affinity",
    "refine_masks": "tasks.refine_masks",
    "evaluate_refined": "tasks.evaluate",
    "train_seg": "tasks.train_seg",
    "predict_seg": "tasks.predict_seg",
    "evaluate_seg": "tasks.evaluate",
    "headline": "tasks.headline",
}


def params_deps(stage: str) -> list[str]:
    """The dotted params keys ``stage`` depends on, in declaration order."""
    keys: list[str] = []
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    hints = {f.name: f for f in dataclasses.fields(Params)}
    for entry in STAGE_PARAMS[stage]:
        section, _, key = entry.partition(".")
        if section not in sections:
            raise KeyError(f"stage {stage}: params.yaml has no section '{section}'")
        cls = hints[section].default_factory if hints[section].default_factory is not dataclasses.MISSING else None
        if cls is None:  # a top-level scalar such as seed
            keys.append(section)
            continue
        if key:
            keys.append(entry)
            continue
        cls = type(cls())
        keys.extend(f"{section}.{f.name}" for f in dataclasses.fields(cls) if not is_operational(cls, f.name))
    return keys


def _module_file(module: str) -> Path | None:
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Project modules named by any import statement of ``path`` (functions included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES and _module_file(name) is not None:
                found.add(name)
    return found


def code_deps(stage: str) -> list[str]:
    """The project files (repo-relative, sorted) in the import closure of ``stage``'s module."""
    todo, seen = [STAGES[stage]], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _module_file(module)
        if path is None:
            raise KeyError(f"stage {stage}: module {module} not found")
        todo.extend(_imports(path) - seen)
        parts = module.split(".")
        for i in range(1, len(parts)):  # importing a.b runs a/__init__.py
            todo.append(".".join(parts[:i]))
    files = {str(_module_file(m).relative_to(REPO)) for m in seen}
    return sorted(files)


HEADER = """# The pipeline DAG. `dvc repro` runs it with no Prefect server;
# `python -m flows.pipeline` runs the same stages through DVC (one cache, one lock).
# deps (code: each stage's import closure) and params (key by key, operational knobs left out) come from
# core/stage_deps.py: `python -m core.stage_deps --write` rewrites them; tests/test_stage_deps.py checks this file.
"""


def write_dvc_yaml(path: Path = REPO / "dvc.yaml") -> None:
    """Rewrite the code deps and params of every stage of ``path`` from the code."""
    import yaml

    from core.atomic import write_text_atomic

    stages = yaml.safe_load(path.read_text())["stages"]
    for name, spec in stages.items():
        other = [d for d in spec.get("deps", []) if not str(d).endswith(".py")]
        spec["deps"] = code_deps(name) + other
        keys = params_deps(name)
        if keys:
            spec["params"] = keys
        else:
            spec.pop("params", None)
        order = ("cmd", "always_changed", "deps", "params", "outs", "metrics", "plots")
        stages[name] = {k: spec[k] for k in order if k in spec} | {k: v for k, v in spec.items() if k not in order}
    write_text_atomic(path, HEADER + yaml.safe_dump({"stages": stages}, sort_keys=False, width=110))


def main(argv: list[str] | None = None) -> int:
    if "--write" in (sys.argv[1:] if argv is None else argv):
        write_dvc_yaml()
        print(f"rewrote the deps and params of {REPO / 'dvc.yaml'}")
        return 0
    for stage in STAGES:
        print(f"{stage}:\n  deps:")
        for f in code_deps(stage):
            print(f"    - {f}")
        print("  params:")
        for k in params_deps(stage):
            print(f"    - {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
