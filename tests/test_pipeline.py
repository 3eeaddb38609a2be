"""The real DVC pipeline, in a temporary copy of the project at tiny params.

``dvc repro prepare`` runs the stage, a second repro runs nothing and rewrites
nothing, a changed ``prepare`` param reruns it; the Prefect flow's command line
sees the same cache. The copy is made once per session; nothing here touches
the project's own ``data/`` or ``dvc.lock``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.dvc_stages import plan_stages, subprocess_env

PROJECT = Path(__file__).resolve().parents[1]
TINY_PREPARE = {"num_train": 30, "num_val": 10, "image_size": 64, "preview_count": 4}
# Nothing may talk to Prefect during `dvc repro`: an API URL nobody listens on proves it.
NO_PREFECT = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}


def _source_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files (no .venv, .state, data outputs)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=PROJECT, check=True, capture_output=True).stdout.decode()
    keep = []
    for rel in filter(None, out.split("\0")):
        if rel == "dvc.lock" or (rel.startswith("data/") and rel != "data/.gitkeep"):
            continue
        if (PROJECT / rel).is_file():
            keep.append(rel)
    return keep


def _dvc(root: Path, *args: str, env_extra: dict | None = None, check: bool = True):
    env = subprocess_env() | (env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{output}")
    return output


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every stage output and of dvc.lock."""
    found = {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
             for p in (root / "data").rglob("*") if p.is_file()}
    found["dvc.lock"] = ((root / "dvc.lock").stat().st_mtime_ns, (root / "dvc.lock").stat().st_size)
    return found


def _locked_outs(root: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {o["path"]: o.get("md5") for o in lock["stages"][stage]["outs"]}


@pytest.fixture(scope="session")
def project_copy(tmp_path_factory) -> Path:
    """The project's sources in a fresh git repo with its .dvc/config, at tiny prepare params."""
    root = tmp_path_factory.mktemp("project")
    for rel in _source_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"].update(TINY_PREPARE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert (root / ".dvc" / "config").is_file(), "the project has no .dvc/config: run `dvc init`"
    return root


@pytest.fixture(scope="session")
def prepared_copy(project_copy) -> tuple[Path, str]:
    """``project_copy`` after a first ``dvc repro prepare``; also returns that run's output."""
    output = _dvc(project_copy, "repro", "prepare", env_extra=NO_PREFECT)
    return project_copy, output


def test_dvc_analytics_are_off_in_the_project_config():
    assert _dvc(PROJECT, "config", "core.analytics").strip() == "false"


def test_stage_commands_do_not_import_prefect_or_dvc(project_copy):
    """`dvc repro` needs no Prefect server: no stage module imports prefect (nor dvc)."""
    stages = yaml.safe_load((project_copy / "dvc.yaml").read_text())["stages"]
    modules = sorted({m for s in stages.values()
                      for m in re.findall(r"python -m ([\w.]+)", str(s.get("cmd", "")))})
    assert modules, "no `python -m` stage commands found in dvc.yaml"
    check = ("import importlib, sys\n"
             f"for m in {modules!r}: importlib.import_module(m)\n"
             "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('prefect', 'dvc'))\n"
             "assert not bad, bad[:5]\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=project_copy, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_stage_in_dvc_yaml_is_in_the_flow_plan(project_copy):
    stages = yaml.safe_load((project_copy / "dvc.yaml").read_text())["stages"]
    plan = plan_stages(project_copy)
    assert sorted(plan) == sorted(stages)
    assert plan[:2] == ["check_params", "prepare"]
    # each stage comes after the stages whose outputs it reads
    outs = {name: [str(o if isinstance(o, str) else next(iter(o))) for o in s.get("outs", [])]
            for name, s in stages.items()}
    for name, spec in stages.items():
        for dep in map(str, spec.get("deps", [])):
            for other, paths in outs.items():
                if any(dep == p or dep.startswith(p.rstrip("/") + "/") for p in paths):
                    assert plan.index(other) < plan.index(name), (other, name)


def test_repro_caches_then_reruns_on_a_param_change(prepared_copy):
    root, first = prepared_copy
    assert "Running stage 'prepare'" in first
    assert (root / "data/prepared/dataset.json").is_file()
    assert (root / "data/metrics/prepare.json").is_file()
    before = _files(root)
    outs_before = _locked_outs(root, "prepare")

    again = _dvc(root, "repro", "prepare", env_extra=NO_PREFECT)
    assert "Stage 'prepare' didn't change, skipping" in again
    assert "Running stage" not in again
    assert _files(root) == before  # nothing rewritten

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["prepare"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(root, "repro", "prepare", env_extra=NO_PREFECT)
    assert "Running stage 'prepare'" in changed
    assert _locked_outs(root, "prepare")["data/prepared"] != outs_before["data/prepared"]


def test_flow_command_line_skips_the_cached_stage(prepared_copy, tmp_path):
    """`python -m flows.pipeline --stage prepare` in ephemeral mode (no server) after `dvc repro`."""
    root, _ = prepared_copy
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("PREFECT_")}
    # a fresh Prefect database is migrated on first start; allow for a busy 2-core machine
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "300"
    before = _files(root)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stage", "prepare"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert re.search(r"^prepare: skipped \(up to date", proc.stdout, re.M), proc.stdout
    assert _files(root) == before
    # Prefect kept its state in the (git-ignored) .state/prefect of that checkout
    assert (root / ".state" / "prefect").is_dir()
