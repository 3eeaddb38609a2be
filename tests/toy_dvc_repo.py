"""A toy git + DVC project for the Prefect flow's tests and screenshots: ``a -> b -> report``.

Trivial Python stages (``python stage.py NAME``), declared out of order in ``dvc.yaml`` so a flow must
follow DVC's graph, not the file order; ``b.fail: true`` makes stage ``b`` fail; ``report`` writes
``data/metrics/report.json``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from flows.dvc_stages import subprocess_env

STAGE_SCRIPT = '''\
"""Toy stages for the flow tests: python stage.py NAME."""
import json, pathlib, sys
import yaml

name = sys.argv[1]
params = yaml.safe_load(open("params.yaml"))
print(f"toy stage {name} says hello", flush=True)
print(f"toy stage {name} note on stderr", file=sys.stderr, flush=True)
if (params.get(name) or {}).get("fail"):
    print(f"toy stage {name} failed on purpose", file=sys.stderr)
    sys.exit(3)
out = pathlib.Path("out")
out.mkdir(exist_ok=True)
if name == "a":
    (out / "a.txt").write_text(str(params["a"]["value"]))
elif name == "b":
    (out / "b.txt").write_text((out / "a.txt").read_text() + "+b")
elif name == "report":
    metrics = pathlib.Path("data/metrics")
    metrics.mkdir(parents=True, exist_ok=True)
    text = (out / "b.txt").read_text()
    (metrics / "report.json").write_text(json.dumps({"length": len(text), "parts": {"b": text}}))
'''

# `report` is declared first: the flow must follow the graph, not the file order.
DVC_YAML = '''\
stages:
  report:
    cmd: python stage.py report
    deps: [stage.py, out/b.txt]
    metrics:
      - data/metrics/report.json:
          cache: false
  a:
    cmd: python stage.py a
    deps: [stage.py]
    params: [a.value]
    outs: [out/a.txt]
  b:
    cmd: python stage.py b
    deps: [stage.py, out/a.txt]
    params: [b.fail]
    outs: [out/b.txt]
'''


def git_dvc_init(root: Path) -> None:
    env = subprocess_env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                   cwd=root, check=True, env=env)


def make_toy_repo(root: Path) -> Path:
    """The toy project in ``root`` (created): git and DVC initialised, nothing run yet."""
    root.mkdir(parents=True, exist_ok=True)
    git_dvc_init(root)
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(yaml.safe_dump({"a": {"value": 1}, "b": {"fail": False}}))
    return root
