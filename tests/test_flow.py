"""The Prefect flow that runs DVC stages, on a tiny self-made git+DVC repo.

The toy pipeline (``a -> b -> report``, declared out of order in dvc.yaml) has
trivial Python stages, so these tests check the flow itself: DVC's order,
ran vs skipped as cached, single-stage and downstream selection, output
streamed into the Prefect logs, the summary artifact, and a clear failure.
All flow runs go to one temporary Prefect API (``prefect_test_harness``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from toy_dvc_repo import make_toy_repo

import flows  # noqa: F401  (offline Prefect defaults before prefect is imported)
from flows.dvc_stages import PipelineError, StageFailedError, _split_output, is_stale, plan_stages, subprocess_env
from flows.pipeline import ARTIFACT_KEY, dvc_pipeline, main


def _set_params(root: Path, **sections) -> None:
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params))


def _snapshot(root: Path) -> dict[str, int]:
    files = [p for d in ("out", "data") for p in (root / d).rglob("*") if p.is_file()]
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in files + [root / "dvc.lock"]}


@pytest.fixture(scope="module")
def toy_repo(tmp_path_factory) -> Path:
    return make_toy_repo(tmp_path_factory.mktemp("toy_repo"))


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # generous: a busy 2-core machine
        yield


def _flow_run_id(state):
    return state.state_details.flow_run_id


def _logs(state) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[_flow_run_id(state)])))
    return [log.message for log in logs]


def _artifact(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[_flow_run_id(state)]),
            key=ArtifactFilterKey(any_=[ARTIFACT_KEY])))
    assert len(found) == 1, found
    return found[0].data


@pytest.fixture(scope="module")
def two_runs(toy_repo, prefect_api):
    """The whole toy pipeline run twice: (state, files' mtimes after) for each run."""
    first = dvc_pipeline(repo=str(toy_repo), return_state=True)
    after_first = _snapshot(toy_repo)
    second = dvc_pipeline(repo=str(toy_repo), return_state=True)
    return first, after_first, second, _snapshot(toy_repo)


@pytest.fixture
def ran_copy(two_runs, toy_repo, tmp_path) -> Path:
    """A private copy of the toy repo after the two runs (cache, lock and outputs included)."""
    dest = tmp_path / "repo"
    shutil.copytree(toy_repo, dest, symlinks=True)
    return dest


def _outcomes(results) -> list[tuple[str, str]]:
    return [(r.stage, r.status) for r in results]


# --------------------------------------------------------------------------- planning (no Prefect)


def test_plan_follows_the_dvc_graph_not_the_file_order(toy_repo):
    assert plan_stages(toy_repo) == ["a", "b", "report"]
    assert plan_stages(toy_repo, "b") == ["b"]
    assert plan_stages(toy_repo, "b", downstream=True) == ["b", "report"]
    assert plan_stages(toy_repo, "a", downstream=True) == ["a", "b", "report"]


def test_plan_rejects_an_unknown_stage_naming_the_known_ones(toy_repo):
    with pytest.raises(PipelineError, match=r"unknown DVC stage 'nope'.*stages: .*report"):
        plan_stages(toy_repo, "nope")
    with pytest.raises(PipelineError, match="downstream"):
        plan_stages(toy_repo, None, downstream=True)


def test_a_stage_added_to_dvc_yaml_is_picked_up(toy_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(toy_repo, repo, symlinks=True)
    with open(repo / "dvc.yaml", "a") as f:
        f.write(textwrap.indent(textwrap.dedent('''\
            extra:
              cmd: python -c "print('extra')"
              deps: [data/metrics/report.json]
            '''), "  "))
    assert plan_stages(repo) == ["a", "b", "report", "extra"]
    assert plan_stages(repo, "b", downstream=True) == ["b", "report", "extra"]


def test_progress_redraws_are_thinned_and_lines_kept_whole():
    chunks = [b"first line\nsecond", b" half\r\n\r 10%|#", b"   |\r 50%|##  |", b"\r100%|####|\n",
              b"\n  indented\nlast"]
    assert list(_split_output(iter(chunks), progress_every=3600)) == [
        "first line", "second half", "10%|#   |", "100%|####|", "  indented", "last"]
    # the first redraw shows at once; the latest unshown one is flushed at the end
    assert list(_split_output(iter([b"\r 1%|\r 2%|\r 3%|"]), progress_every=3600)) == ["1%|", "3%|"]
    # a bar erased at the end (tqdm leave=False) leaves no stale redraw behind
    assert list(_split_output(iter([b"\r 1%|\r 2%|\r    \r"]), progress_every=3600)) == ["1%|"]


# --------------------------------------------------------------------------- flow runs


def test_first_run_runs_every_stage_and_second_skips_all(two_runs):
    first, after_first, second, after_second = two_runs
    assert first.is_completed() and second.is_completed()
    assert _outcomes(first.result()) == [("a", "ran"), ("b", "ran"), ("report", "ran")]
    assert _outcomes(second.result()) == [("a", "skipped"), ("b", "skipped"), ("report", "skipped")]
    assert {r.reason for r in second.result()} == {"up to date"}
    assert after_second == after_first  # nothing was rewritten by the cached run


def test_stage_output_is_streamed_into_the_prefect_logs(two_runs):
    first, _, second, _ = two_runs
    logs = _logs(first)
    for name in ("a", "b", "report"):
        assert f"toy stage {name} says hello" in logs          # stdout
        assert f"toy stage {name} note on stderr" in logs      # stderr
        assert f"Running stage '{name}':" in logs              # DVC's own line
    assert any("stage 'a' RAN" in m for m in logs)
    assert any("stage 'a' SKIPPED (up to date)" in m for m in _logs(second))


def test_summary_artifact_lists_stages_and_metrics(two_runs):
    first, _, second, _ = two_runs
    text = _artifact(first)
    assert "| a | ran |" in text and "| report | ran |" in text
    assert "3 ran, 0 skipped as cached" in text
    assert "| report.json | length | 3 |" in text  # out/b.txt is "1+b"
    assert "| report.json | parts.b | 1+b |" in text
    assert "| b | skipped | up to date |" in _artifact(second)


def test_single_stage_downstream_force_and_run_cache(ran_copy, prefect_api):
    _set_params(ran_copy, a={"value": 22})
    assert _outcomes(dvc_pipeline(stage="a", repo=str(ran_copy))) == [("a", "ran")]
    assert (ran_copy / "out/a.txt").read_text() == "22"
    assert is_stale(ran_copy, "b")  # only `a` was selected
    assert _outcomes(dvc_pipeline(stage="b", downstream=True, repo=str(ran_copy))) == [
        ("b", "ran"), ("report", "ran")]
    assert (ran_copy / "out/b.txt").read_text() == "22+b"

    forced = dvc_pipeline(stage="b", force=True, repo=str(ran_copy))
    assert [(r.stage, r.status, r.reason) for r in forced] == [("b", "ran", "command executed")]

    _set_params(ran_copy, a={"value": 1})  # back to a value DVC has already run
    restored = dvc_pipeline(stage="a", repo=str(ran_copy))
    assert [(r.stage, r.status, r.reason) for r in restored] == [
        ("a", "skipped", "restored from run-cache")]
    assert (ran_copy / "out/a.txt").read_text() == "1"


def test_a_failing_stage_fails_the_flow_with_its_error_tail(ran_copy, prefect_api):
    _set_params(ran_copy, b={"fail": True})
    state = dvc_pipeline(repo=str(ran_copy), return_state=True)
    assert state.is_failed()
    err = state.result(raise_on_failure=False)
    assert isinstance(err, StageFailedError)
    assert err.stage == "b" and err.returncode != 0
    message = str(err)
    assert "DVC stage 'b' failed" in message
    assert "toy stage b failed on purpose" in message  # the stage's own stderr, in the tail
    assert "--stage b" in message                      # tells the user how to rerun it
    assert "failed on purpose" in state.message
    text = _artifact(state)
    assert "| a | skipped | up to date |" in text
    assert "| b | **failed** |" in text
    assert "| report | not run | an upstream stage failed |" in text


def test_cli_rejects_bad_arguments_with_a_clear_message(toy_repo, capsys):
    assert main(["--repo", str(toy_repo), "--stage", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown DVC stage 'nope'" in err and "report" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--repo", str(toy_repo), "--downstream"])
    assert exit_info.value.code == 2
    assert "--downstream needs --stage" in capsys.readouterr().err


# --------------------------------------------------------------------------- states, graph, experiments


def _task_runs(state) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[_flow_run_id(state)])))
        flow_run = client.read_flow_run(_flow_run_id(state))
    return sorted(runs, key=lambda r: r.expected_start_time), flow_run


def test_cached_stages_end_cached_ran_ones_completed_and_each_waits_for_the_last(two_runs):
    first, _, second, _ = two_runs
    runs, flow_run = _task_runs(first)
    assert [(r.name, r.state.name) for r in runs] == [("a", "Completed"), ("b", "Completed"), ("report", "Completed")]
    assert flow_run.name == "all"
    cached, _ = _task_runs(second)
    assert [r.state.name for r in cached] == ["Cached", "Cached", "Cached"]
    assert all(r.state.is_completed() for r in cached)
    # the graph's edges: each stage's task run waits for the one before it
    ids = [r.id for r in cached]
    for previous, run in zip(ids, cached[1:]):
        upstream = {i.id for inputs in run.task_inputs.values() for i in inputs}
        assert previous in upstream, run.task_inputs


def _committed_copy(ran_copy: Path) -> Path:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=ran_copy, check=True)
    subprocess.run(git + ["commit", "-qm", "toy"], cwd=ran_copy, check=True)
    return ran_copy


def test_a_params_override_runs_as_a_dvc_experiment_and_leaves_params_yaml_alone(ran_copy, prefect_api):
    import json

    repo = _committed_copy(ran_copy)
    before = (repo / "params.yaml").read_text()
    state = dvc_pipeline(repo=str(repo), params={"a.value": 5}, experiment="five", return_state=True)
    assert state.is_completed(), state
    assert _outcomes(state.result()) == [("a", "ran"), ("b", "ran"), ("report", "ran")]
    _, flow_run = _task_runs(state)
    assert flow_run.name == "all a.value=5"
    summary = _artifact(state)   # the experiment's metrics as DVC recorded them, not the workspace's files
    assert "DVC experiment five" in summary and "dvc exp apply five" in summary
    assert "| report.json | length | 3 |" in summary and "| report.json | length | 1 |" not in summary
    assert "exp:five" in flow_run.tags
    assert (repo / "params.yaml").read_text() == before and (repo / "out/a.txt").read_text() == "1"
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, env=subprocess_env(),
                           capture_output=True, text=True, check=True).stdout
    exps = [e for rev in json.loads(shown) for e in (rev.get("experiments") or [])
            for e in e.get("revs", [])]
    five = next(e for e in exps if e.get("name") == "five")
    assert five["data"]["params"]["params.yaml"]["data"]["a"]["value"] == 5
    assert five["data"]["metrics"]["data/metrics/report.json"]["data"]["length"] == len("5+b")


def test_a_bad_override_fails_the_run_before_any_stage_naming_the_key(ran_copy, prefect_api):
    from core.config import ConfigError

    before = _snapshot(ran_copy)
    state = dvc_pipeline(repo=str(ran_copy), params={"a.valu": 5}, return_state=True)
    assert state.is_failed()
    with pytest.raises(ConfigError, match="no key 'a.valu'"):
        state.result()
    runs, _ = _task_runs(state)
    assert runs == [] and _snapshot(ran_copy) == before
    assert any("bad params override, nothing ran" in line and "a.valu" in line for line in _logs(state))


def test_cli_overrides_are_checked_before_prefect_starts(toy_repo, capsys):
    assert main(["--repo", str(toy_repo), "--set", "a.valu=1"]) == 2
    assert "no key 'a.valu'" in capsys.readouterr().err
    assert main(["--repo", str(toy_repo), "--set", "novalue"]) == 2
    assert "expected section.key=value" in capsys.readouterr().err


# --------------------------------------------------------------------------- the served deployment


@pytest.fixture
def served(ran_copy, prefect_api):
    """``python -m flows.serve`` for a committed toy copy, against the test API; yields the repo."""
    import contextlib
    import os
    import signal
    import time

    from prefect.settings import PREFECT_API_URL

    repo = _committed_copy(ran_copy)
    env = dict(subprocess_env(), PREFECT_API_URL=PREFECT_API_URL.value())
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--repo", str(repo), "--name", "toy"],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + 240
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name("dvc-pipeline/toy")
                break
            except Exception:  # noqa: BLE001 - not registered yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"flows.serve did not register the deployment:\n{proc.stdout.read()}")
                time.sleep(1)
    try:
        yield repo
    finally:   # Ctrl-C as a user stops it; a slow shutdown (it pauses the deployment) gets SIGTERM, then SIGKILL
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue


def test_the_served_deployment_runs_an_override_as_an_experiment_and_refuses_a_bad_one(served):
    import json

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:   # the run form's stage: a choice of the repo's stages
        schema = client.read_deployment_by_name("dvc-pipeline/toy").parameter_openapi_schema
    assert schema["properties"]["stage"]["enum"] == ["all", "a", "b", "report"]
    assert schema["properties"]["stage"]["default"] == "all"
    assert schema["properties"]["shards"]["minimum"] == 1 and "Dask" in schema["properties"]["shards"]["description"]
    run = run_deployment("dvc-pipeline/toy", parameters={"params": {"a.value": 7}, "experiment": "seven"},
                         timeout=600)
    assert run.state.is_completed(), run.state
    assert run.name == "all a.value=7" and {"eps", "dvc", "exp:seven"} <= set(run.tags)
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=served, env=subprocess_env(),
                           capture_output=True, text=True, check=True).stdout
    names = {e.get("name") for rev in json.loads(shown) for e in (rev.get("experiments") or [])}
    assert "seven" in names
    before = _snapshot(served)
    with pytest.raises(Exception, match="nope"):     # not a stage of the served repo: refused, no run
        run_deployment("dvc-pipeline/toy", parameters={"stage": "nope"}, timeout=600)
    with pytest.raises(Exception, match="minimum"):  # 0 shards: refused, no run
        run_deployment("dvc-pipeline/toy", parameters={"shards": 0}, timeout=600)
    bad = run_deployment("dvc-pipeline/toy", parameters={"params": {"b.fial": True}}, timeout=600)
    assert bad.state.is_failed() and _snapshot(served) == before
    assert any("b.fial" in line for line in _logs(bad.state))



def test_runs_are_tagged_with_the_method_and_backbone_their_params_give(tmp_path):
    from flows.pipeline import run_tags

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train_cls": {"method": "eps", "backbone": "efficientnet_lite0"}}))
    assert run_tags(params, None) == ["method:eps", "backbone:efficientnet_lite0"]
    assert run_tags(params, {"train_cls.method": "cam"}) == ["method:cam", "backbone:efficientnet_lite0"]
    params.write_text(yaml.safe_dump({"a": {"value": 1}}))     # a project without those keys: no tags
    assert run_tags(params, None) == []


def test_the_summary_gives_the_headline_with_its_stage_and_whether_it_is_from_this_run():
    from flows.dvc_stages import RAN, SKIPPED, StageResult
    from flows.report import summary_markdown

    metrics = {"headline.json": {"classifier": {"val_mAP": 0.99444}, "pseudo_masks": {"miou": 0.5408},
                                 "segmenter": {"val_miou": None}},
               "prepare.json": {"classes": 5}, "eval_pseudo.json": {"miou": 0.5408}}
    results = [StageResult("train_cls", SKIPPED, "up to date", 0.0), StageResult("evaluate", RAN, "command executed", 3.0)]
    text = summary_markdown("DVC pipeline", results, ["evaluate_seg"], "train_seg", metrics)
    assert "| classifier.val_mAP | 0.9944 | train_cls | no: from an earlier run |" in text
    assert "| pseudo_masks.miou | 0.5408 | evaluate | yes |" in text
    assert "| segmenter.val_miou | null | evaluate_seg | no: from an earlier run |" in text
    assert "Details: `data/metrics/eval_pseudo.json`, `data/metrics/prepare.json`." in text
    assert "classes" not in text   # the dataset statistics stay in their own file


def test_the_summary_embeds_the_report_images_it_finds_with_their_stage(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image

    from flows.report import report_images

    (tmp_path / "data/eval").mkdir(parents=True)
    Image.fromarray(np.full((900, 300, 3), 200, np.uint8)).save(tmp_path / "data/eval/report.png")
    text = "\n".join(report_images(tmp_path, {"evaluate"}))
    assert "### pseudo-masks (`data/eval/report.png`, stage evaluate, this run)" in text
    assert "segmenter" not in text and report_images(tmp_path / "none", set()) == []
    thumb = Image.open(io.BytesIO(base64.b64decode(text.split("base64,")[1].rstrip(")"))))
    assert thumb.size == (213, 640)    # shrunk to 640 px on its long side, proportions kept
    assert "an earlier run" in "\n".join(report_images(tmp_path, set()))
