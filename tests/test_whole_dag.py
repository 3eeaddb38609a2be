"""The whole DAG in a copy of the repo at tiny sizes: `dvc repro`, byte-reproducible caching, params
validation, the Prefect flow rerunning one stage onwards, DVC experiments, metrics diffs and a remote."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from models.deeplab import load_segmenter

REPO = Path(__file__).resolve().parents[1]


DAG = ("prepare", "saliency", "train_cls", "infer_cam", "rescue_saliency", "export_masks", "evaluate", "train_affinity",
       "refine_masks", "evaluate_refined", "train_seg", "predict_seg", "evaluate_seg")
TINY_PARAMS = {
    "prepare": {"num_train": 16, "num_val": 8, "image_size": 64, "preview_count": 2},
    "saliency": {"backend": "spectral_residual", "workers": 1},
    "train_cls": {"iterations": 2, "batch_size": 4, "crop_size": 64, "resize_long": [48, 80], "threads": 1,
                  "workers": 0, "checkpoint_every": 1, "log_every": 1},
    "infer_cam": {"scales": [1.0], "threads": 1},
    "rescue_saliency": {"workers": 1},
    "export_masks": {"workers": 1},
    "evaluate": {"workers": 1, "report_images": 2},
    "train_affinity": {"iterations": 2, "batch_size": 4, "crop_size": 64, "threads": 1, "workers": 0,
                       "checkpoint_every": 1, "log_every": 1},
    "refine_masks": {"threads": 1, "logt": 3},
    "train_seg": {"iterations": 2, "batch_size": 4, "crop_size": 64, "aspp_rates": [1, 2], "threads": 1,
                  "workers": 1, "checkpoint_every": 1, "log_every": 1},
    "predict_seg": {"scales": [1.0], "threads": 1, "report_images": 2},
}


def _project_sources() -> list[str]:
    """Tracked and untracked-but-not-ignored files: the project as a fresh clone would have it."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, check=True, capture_output=True).stdout.decode()
    return [rel for rel in filter(None, out.split("\0"))
            if rel != "dvc.lock" and not rel.startswith("data/") and (REPO / rel).is_file()]


def _env() -> dict:
    from flows.dvc_stages import subprocess_env
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("PREFECT_")}
    env.update(OMP_NUM_THREADS="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def _set_params(root: Path, sections: dict) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 or not check, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _first_repro(root: Path, plan: list[str]) -> None:
    """Every stage runs once at tiny sizes and writes what the later stages and the headline read."""
    repro = _dvc(root, "repro")
    for stage in plan:
        assert f"Running stage '{stage}'" in repro.stdout, stage
    metrics = json.loads((root / "data/metrics/eval_seg.json").read_text())
    assert metrics["images"] == 8 and 0.0 <= metrics["miou"] <= 1.0
    assert len(list((root / "data/predict_seg/masks").glob("*.png"))) == 8
    _, meta = load_segmenter(root / "data/train_seg/segmenter.pt")
    assert meta["mask_source"] == "pseudo" and meta["train_seg"]["iterations"] == 2
    train_metrics = json.loads((root / "data/metrics/train_seg.json").read_text())
    assert "perf" not in train_metrics and json.loads((root / "data/timings/train_seg.json").read_text())[
        "perf"]["train_seconds"] > 0


def _check_caching_and_params(root: Path) -> None:
    """A forced retraining writes the same classifier, so nothing downstream reruns; operational knobs
    are not deps; a typo anywhere stops `dvc repro` although every stage is cached."""
    lock = (root / "dvc.lock").read_text()
    _dvc(root, "repro", "-f", "--single-item", "train_cls")
    again = _dvc(root, "repro").stdout
    assert "Running stage" not in again, again[-3000:]
    assert (root / "dvc.lock").read_text() == lock

    _set_params(root, {"train_cls": {"threads": 1, "log_every": 1}, "saliency": {"workers": 1},
                       "infer_cam": {"batch_images": 3}, "evaluate": {"workers": 1}})
    status = _dvc(root, "status", "--json").stdout
    assert list(json.loads(status)) == ["check_params"], status   # only the 1-second validation of params.yaml
    rerun = _dvc(root, "repro").stdout
    assert "Running stage 'check_params'" in rerun and rerun.count("Running stage") == 1, rerun[-3000:]
    params = yaml.safe_load((root / "params.yaml").read_text())
    good = yaml.safe_dump(params, sort_keys=False)
    params["train_seg"]["lrr"] = 0.1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = _dvc(root, "repro", check=False)
    assert bad.returncode != 0 and "train_seg.lrr" in bad.stdout + bad.stderr
    assert "Running stage 'prepare'" not in bad.stdout
    (root / "params.yaml").write_text(good)


def _flow_reruns_train_seg_onwards(root: Path, plan: list[str]) -> None:
    """One train_seg param changes: the Prefect flow reruns train_seg and its descendants only."""
    _set_params(root, {"train_seg": {"iterations": 3}})
    flow = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=root, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert flow.returncode == 0, (flow.stdout + flow.stderr)[-4000:]
    after = {"check_params", "train_seg", "predict_seg", "evaluate_seg"}  # check_params: params.yaml changed
    for stage in plan:
        word = "ran" if stage in after else "skipped"
        assert re.search(rf"^{stage}: {word}\b", flow.stdout, re.M), (stage, flow.stdout[-3000:])
    assert load_segmenter(root / "data/train_seg/segmenter.pt")[1]["train_seg"]["iterations"] == 3
    headline = json.loads((root / "data/metrics/headline.json").read_text())
    assert headline["segmenter"]["val_miou"] == json.loads((root / "data/metrics/eval_seg.json").read_text())["miou"]


def _refine_param_reruns_refine_onwards(root: Path) -> None:
    """One refine_masks param changes: refine_masks and what reads its file rerun, AffinityNet and
    everything before it stay cached."""
    _set_params(root, {"refine_masks": {"logt": 2}})
    rerun = _dvc(root, "repro").stdout
    ran = set(re.findall(r"Running stage '([a-z_]+)'", rerun))
    assert {"refine_masks", "evaluate_refined"} <= ran, rerun[-3000:]
    assert not ran & {"prepare", "saliency", "train_cls", "infer_cam", "rescue_saliency", "export_masks", "evaluate",
                      "train_affinity"}, rerun[-3000:]
    refined = json.loads((root / "data/metrics/eval_refined.json").read_text())
    assert refined["images"] == 16 and 0.0 <= refined["miou"] <= 1.0
    headline = json.loads((root / "data/metrics/headline.json").read_text())
    assert headline["refined_masks"]["miou"] == refined["miou"]


def _experiments_and_a_remote(root: Path, tmp_path: Path) -> None:
    """Metrics are git-tracked, experiments show them, outputs go to a local DVC remote and a fresh
    clone pulls every output from it instead of recomputing it."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _dvc(root, "remote", "add", "-d", "local", str(tmp_path / "remote"))
    subprocess.run(git + ["add", "-A"], cwd=root, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny run"], cwd=root, check=True)
    _dvc(root, "push")
    exp = _dvc(root, "exp", "run", "-n", "more-seg", "-S", "train_seg.iterations=4").stdout
    assert "Running stage 'train_seg'" in exp and "Running stage 'train_cls'" not in exp
    text = json.dumps(json.loads(_dvc(root, "exp", "show", "--json").stdout))
    assert "more-seg" in text and "data/metrics/headline.json" in text and "val_miou" in text
    diff = _dvc(root, "metrics", "diff", "HEAD").stdout
    assert "headline.json" in diff or diff.strip() == "", diff
    _dvc(root, "exp", "apply", "more-seg")
    assert load_segmenter(root / "data/train_seg/segmenter.pt")[1]["train_seg"]["iterations"] == 4
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    _dvc(clone, "pull")
    assert json.loads(_dvc(clone, "status", "--json").stdout or "{}") == {}
    assert (clone / "data/train_seg/segmenter.pt").is_file() and (clone / "data/pseudo_masks.h5").is_file()


def test_whole_dag_in_a_repo_copy_then_a_train_seg_param_reruns_only_train_seg_onwards(tmp_path):
    """`dvc repro` runs prepare -> ... -> evaluate_seg at tiny sizes; outputs are byte-reproducible and
    params validated; after one train_seg param changes, the Prefect flow reruns train_seg onwards; after
    one refine_masks param changes, `dvc repro` reruns refine_masks onwards;
    experiments, metrics diffs and a DVC remote work on the result."""
    from flows.dvc_stages import plan_stages

    root = tmp_path / "project"
    for rel in _project_sources():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _set_params(root, TINY_PARAMS)
    plan = plan_stages(root)
    assert set(DAG) <= set(plan), f"dvc.yaml lacks stages {sorted(set(DAG) - set(plan))}"
    assert plan.index("export_masks") < plan.index("train_seg") < plan.index("predict_seg") \
        < plan.index("evaluate_seg")
    _first_repro(root, plan)
    _check_caching_and_params(root)
    _flow_reruns_train_seg_onwards(root, plan)
    _refine_param_reruns_refine_onwards(root)
    _experiments_and_a_remote(root, tmp_path)
