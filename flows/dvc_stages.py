"""Talking to DVC for the flow: which stages to run, in what order, and running one.

No Prefect in here, so it tests alone. The stage order comes from DVC itself
(the same graph and plan ``dvc repro`` uses), so a stage added to ``dvc.yaml``
is picked up with no change to the flow. Each stage runs as a
``dvc repro --single-item <stage>`` subprocess: one cache and one repo lock,
shared with a plain ``dvc repro`` run from a shell.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PROJECT_FILE = "dvc.yaml"
METRICS_GLOB = "data/metrics/*.json"

RAN = "ran"
SKIPPED = "skipped"


class PipelineError(RuntimeError):
    """The pipeline cannot be planned (unknown stage, broken dvc.yaml, DVC lock held)."""


class StageFailedError(RuntimeError):
    """A stage's ``dvc repro`` exited non-zero; the message carries its last output lines."""

    def __init__(self, stage: str, returncode: int, tail: list[str]):
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        shown = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        super().__init__(
            f"DVC stage '{stage}' failed (`dvc repro --single-item {stage}` exited with code "
            f"{returncode}). Last output lines:\n{shown}\n"
            f"Fix the cause above, then rerun the stage with "
            f"`python -m flows.pipeline --stage {stage}` or `dvc repro {stage}`.")


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: ``status`` is ``ran`` or ``skipped``; ``reason`` says why."""

    stage: str
    status: str
    reason: str
    seconds: float

    @property
    def ran(self) -> bool:
        return self.status == RAN


# --------------------------------------------------------------------------- planning


def _open_repo(root: Path):
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except DvcException as e:
        raise PipelineError(f"{root} is not a usable DVC repository: {e}. "
                            f"Run `dvc init` in the project root first.") from e


def _target(root: Path, stage: str) -> str:
    """A stage name as DVC's Python API wants it: anchored at ``root``, not at the cwd."""
    if ":" in stage:
        path, name = stage.rsplit(":", 1)
        return f"{root / path}:{name}"
    if stage.endswith(".dvc") or stage.endswith(PROJECT_FILE):
        return str(root / stage)
    return f"{root / PROJECT_FILE}:{stage}"


def _address(stage, root: Path) -> str:
    """The name ``dvc repro`` takes for a stage when run from ``root``."""
    from dvc.stage import PipelineStage

    rel = Path(os.path.relpath(stage.path, root)).as_posix()
    if isinstance(stage, PipelineStage):
        return stage.name if rel == PROJECT_FILE else f"{rel}:{stage.name}"
    return rel


def plan_stages(root: str | Path, stage: str | None = None, downstream: bool = False) -> list[str]:
    """Stage names (DVC addressing) to run, in the order ``dvc repro`` would run them.

    ``stage=None``: the whole pipeline of ``dvc.yaml`` (what plain ``dvc repro``
    runs). ``stage=NAME``: only that stage (a ``foreach``/``matrix`` group name
    selects all its items), or with ``downstream=True`` that stage and every
    stage that depends on it, directly or not.
    """
    root = _checked_root(root, stage, downstream)
    with _open_repo(root) as repo:
        return _plan(repo, root, stage, downstream)


def plan_and_status(root: str | Path, stage: str | None = None, downstream: bool = False
                    ) -> tuple[list[str], set[str]]:
    """:func:`plan_stages` and every stage ``dvc status`` sees a change in (what a run must look at
    again), from one opening of the repo: a run's start."""
    root = _checked_root(root, stage, downstream)
    with _open_repo(root) as repo:
        return _plan(repo, root, stage, downstream), _status(repo, root)


def check_project(root: str | Path, stage: str | None = None, downstream: bool = False) -> Path:
    """``root`` resolved, after the checks that need no DVC: a dvc.yaml, a stage to go downstream from."""
    return _checked_root(root, stage, downstream)


def _checked_root(root: str | Path, stage: str | None, downstream: bool) -> Path:
    root = Path(root).resolve()
    if downstream and not stage:
        raise PipelineError("'downstream' needs a stage to start from (--stage NAME)")
    if not (root / PROJECT_FILE).is_file():
        raise PipelineError(f"no {PROJECT_FILE} in {root}: nothing to run")
    return root


def _plan(repo, root: Path, stage: str | None, downstream: bool) -> list[str]:
    from dvc.exceptions import DvcException
    from dvc.repo.reproduce import get_active_graph, plan_repro

    try:
        graph = get_active_graph(repo.index.graph)
        if stage:
            targets = repo.stage.collect(_target(root, stage))
        else:   # the stages of dvc.yaml, as collect would give them, without parsing it again
            project = str(root / PROJECT_FILE)
            targets = [s for s in graph.nodes if getattr(s, "path", None) == project]
    except DvcException as e:
        if stage:
            known = ", ".join(_address(s, root) for s in _all_stages(repo)) or "(none)"
            raise PipelineError(f"unknown DVC stage '{stage}' in {root / PROJECT_FILE}; "
                                f"stages: {known}") from e
        raise PipelineError(f"cannot read the DVC pipeline in {root}: {e}") from e
    if stage and not downstream:
        chosen = set(targets)
        steps = [s for s in plan_repro(graph, targets) if s in chosen]
    else:
        steps = plan_repro(graph, targets, downstream=downstream)
    return [_address(s, root) for s in steps]


def _all_stages(repo) -> list:
    try:
        return list(repo.index.stages)
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


def is_stale(root: str | Path, stage: str) -> bool:
    """True when DVC sees a change in the stage's command, deps, params or outs."""
    from dvc.exceptions import DvcException

    root = Path(root).resolve()
    with _open_repo(root) as repo:
        try:
            return bool(repo.status(targets=[_target(root, stage)]))
        except DvcException as e:
            raise PipelineError(f"`dvc status {stage}` failed in {root}: {e}") from e


def _status(repo, root: Path) -> set[str]:
    from dvc.exceptions import DvcException

    try:
        keys = list(repo.status())
    except DvcException as e:
        raise PipelineError(f"`dvc status` failed in {root}: {e}") from e
    return {_address_of_key(key, root) for key in keys}


def _address_of_key(key: str, root: Path) -> str:
    """A ``dvc status`` key (a path relative to the cwd, ``:name`` for a pipeline stage) in the
    addressing of :func:`plan_stages`."""
    path, _, name = key.rpartition(":") if ":" in key else (key, "", "")
    rel = Path(os.path.relpath(Path(os.path.abspath(path)), root)).as_posix()
    if not name:
        return rel
    return name if rel == PROJECT_FILE else f"{rel}:{name}"


# --------------------------------------------------------------------------- running


def _dvc_markers(stage: str) -> list[tuple[re.Pattern, str, str]]:
    """DVC's own log lines (dvc/stage/__init__.py, run.py, cache.py) naming what happened."""
    q = re.escape(stage)
    return [
        (re.compile(rf"^Running stage '{q}':$"), RAN, "command executed"),
        (re.compile(rf"^Stage '{q}' is cached - skipping run"), SKIPPED, "restored from run-cache"),
        (re.compile(rf"^(Stage )?'{q}' didn't change, skipping$"), SKIPPED, "up to date"),
        (re.compile(r"^Verifying outputs in frozen stage"), SKIPPED, "frozen: outputs verified"),
        (re.compile(r"^Verifying data sources in"), SKIPPED, "data source verified"),
    ]


def classify(stage: str, lines: list[str], was_stale: bool, forced: bool) -> tuple[str, str]:
    """(status, reason) of a finished stage.

    DVC's own status line in the repro output decides; if none is found (a DVC
    that words it differently), the ``dvc status`` taken just before decides.
    """
    markers = _dvc_markers(stage)
    for line in lines:
        for pattern, status, reason in markers:
            if pattern.match(line):
                return status, reason
    if was_stale or forced:
        return RAN, "command executed (stage was changed)" if was_stale else "command executed (forced)"
    return SKIPPED, "up to date"


def subprocess_env() -> dict[str, str]:
    """Environment for DVC and the stage commands it starts.

    The running interpreter's ``bin/`` goes first on PATH so ``python -m tasks.x``
    in ``dvc.yaml`` uses this venv even when it is not activated.
    """
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _split_output(chunks: Iterator[bytes], progress_every: float) -> Iterator[str]:
    """Non-blank lines from a byte stream; ``\\r`` progress redraws (tqdm) thinned to one per interval."""
    buf = b""
    pending = ""  # latest progress redraw not yet shown
    last_shown: float | None = None
    for chunk in chunks:
        buf += chunk
        while True:
            i_n, i_r = buf.find(b"\n"), buf.find(b"\r")
            if i_n < 0 and i_r < 0:
                break
            if 0 <= i_r < i_n or (i_r >= 0 and i_n < 0):
                if i_r + 1 == len(buf):
                    break  # wait: this may be the start of "\r\n"
                if buf[i_r + 1:i_r + 2] != b"\n":
                    frag = buf[:i_r].decode("utf-8", "replace").strip()
                    buf = buf[i_r + 1:]
                    pending = frag  # a blank redraw erased the bar: nothing left to show
                    if frag:
                        now = time.monotonic()
                        if last_shown is None or now - last_shown >= progress_every:
                            last_shown, pending = now, ""
                            yield frag
                    continue
                line, buf = buf[:i_r], buf[i_r + 2:]
            else:
                line, buf = buf[:i_n], buf[i_n + 1:]
            pending = ""
            text = line.decode("utf-8", "replace").rstrip()
            if text.strip():
                yield text
    if buf.endswith(b"\r"):  # the stream ended on a redraw: it is the latest progress state
        pending, buf = buf[:-1].decode("utf-8", "replace").strip(), b""
    rest = buf.decode("utf-8", "replace").strip() or pending
    if rest:
        yield rest


def _read_chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, 65536):
        yield chunk


def _pump(stream, name: str, out: queue.Queue, progress_every: float) -> None:
    try:
        for line in _split_output(_read_chunks(stream.fileno()), progress_every):
            out.put((name, line))
    finally:
        out.put((name, None))


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt DVC and the stage command it started (its own process group), then insist."""
    for sig, grace in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def _run_dvc(root: Path, args: list[str], on_line: Callable[[str, str], None] | None, tail_lines: int,
             progress_every: float) -> tuple[int, list[str], list[str], float]:
    """Run ``dvc <args>`` in ``root``, streaming its lines; (exit code, lines, last lines, seconds)."""
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=tail_lines)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=subprocess_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        lines_q: queue.Queue = queue.Queue()
        readers = [threading.Thread(target=_pump, args=(s, n, lines_q, progress_every), daemon=True)
                   for s, n in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))]
        for t in readers:
            t.start()
        open_streams = len(readers)
        while open_streams:
            name, line = lines_q.get()
            if line is None:
                open_streams -= 1
                continue
            lines.append(line)
            if not line.strip():
                continue
            tail.append(line)
            if on_line is not None:
                on_line(name, line)
        returncode = proc.wait()
        for t in readers:
            t.join()
    finally:
        _stop(proc)
        for s in (proc.stdout, proc.stderr):
            s.close()
    return returncode, lines, list(tail), time.monotonic() - start


def run_stage(root: str | Path, stage: str, force: bool = False,
              on_line: Callable[[str, str], None] | None = None,
              tail_lines: int = 40, progress_every: float = 5.0, was_stale: bool | None = None) -> StageResult:
    """Run ``dvc repro --single-item <stage>`` in ``root``, streaming its output.

    ``on_line(stream, line)`` gets every stdout/stderr line as it arrives
    (``stream`` is ``"stdout"`` or ``"stderr"``). Raises :class:`StageFailedError`
    with the output tail when DVC exits non-zero. ``was_stale``: what ``dvc status`` said of the
    stage just before, when the caller knows it (else it is asked here).
    """
    root = Path(root)
    was_stale = is_stale(root, stage) if was_stale is None else was_stale
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    returncode, lines, tail, seconds = _run_dvc(root, args, on_line, tail_lines, progress_every)
    if returncode != 0:
        raise StageFailedError(stage, returncode, tail)
    status, reason = classify(stage, lines, was_stale, force)
    return StageResult(stage=stage, status=status, reason=reason, seconds=seconds)


@dataclass(frozen=True)
class ExperimentResult:
    """A ``dvc exp run``: the experiment's name and what happened to each planned stage."""

    name: str
    stages: list[StageResult]
    seconds: float


def run_experiment(root: str | Path, overrides: dict[str, object], plan: list[str], *, name: str = "",
                   targets: list[str] | None = None, downstream: bool = False, force: bool = False,
                   on_line: Callable[[str, str], None] | None = None, tail_lines: int = 40,
                   progress_every: float = 5.0) -> ExperimentResult:
    """``dvc exp run --temp -S key=value ...``: the overrides become a DVC experiment (params, deps and
    metrics recorded by DVC; ``dvc exp show`` lists it) run in a temporary copy, so the user's
    workspace and params.yaml stay as they are. ``plan`` names the stages to report on."""
    args = ["exp", "run", "--temp"] + [a for k, v in overrides.items() for a in ("-S", f"{k}={_yaml_value(v)}")]
    args += (["--name", name] if name else []) + (["--downstream"] if downstream else [])
    args += (["--force"] if force else []) + list(targets or [])
    returncode, lines, tail, seconds = _run_dvc(Path(root), args, on_line, tail_lines, progress_every)
    if returncode != 0:
        shown = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        raise PipelineError(f"`dvc exp run` exited with code {returncode}. Last output lines:\n{shown}")
    ran = [m.group(1) for line in lines if (m := re.search(r"Ran experiment\(s\): (.+)$", line))]
    stages = [StageResult(stage, *classify(stage, lines, False, force), seconds=0.0) for stage in plan]
    return ExperimentResult(name=ran[-1].strip() if ran else name, stages=stages, seconds=seconds)


def _yaml_value(value: object) -> str:
    """A value as ``-S`` wants it: YAML, on one line."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------- metrics


def experiment_metrics(root: str | Path, name: str) -> dict[str, object]:
    """The metrics DVC recorded for experiment ``name`` (``dvc exp show --json``), by file name as
    :func:`read_metrics` gives the workspace's; empty when DVC lists no such experiment."""
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=Path(root),
                           env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if shown.returncode != 0:
        raise PipelineError(f"`dvc exp show --json` failed in {root}: {shown.stderr.strip()[-500:]}")
    for baseline in json.loads(shown.stdout or "[]"):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") == name or exp.get("name") == name:
                    files = ((rev.get("data") or {}).get("metrics") or {})
                    return {Path(path).name: (content or {}).get("data", content) for path, content in files.items()}
    return {}


def read_metrics(root: str | Path) -> dict[str, object]:
    """``data/metrics/*.json`` of the repo, by file name; an unreadable file maps to its error."""
    found: dict[str, object] = {}
    for path in sorted(Path(root).glob(METRICS_GLOB)):
        try:
            found[path.name] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            found[path.name] = f"unreadable: {e}"
    return found
