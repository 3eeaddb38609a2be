"""dvc.yaml's deps and params agree with the code (core/stage_deps.py); params loading per stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, load_params
from core.stage_deps import STAGES, code_deps, params_deps
from core.stage_params import stage_sections

REPO = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_is_known_and_has_a_module():
    assert list(DVC) == list(STAGES)
    for stage, spec in DVC.items():
        assert f"python -m {STAGES[stage]}" in spec["cmd"], stage


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure(stage):
    listed = sorted(d for d in DVC[stage]["deps"] if d.endswith(".py"))
    assert listed == code_deps(stage)


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_deps_are_the_result_affecting_keys(stage):
    assert DVC[stage].get("params", []) == params_deps(stage)


def test_operational_knobs_are_not_deps_and_method_knobs_are():
    cls = params_deps("train_cls")
    for key in ("threads", "workers", "device", "log_every", "checkpoint_every", "eval_every"):
        assert f"train_cls.{key}" not in cls
    for key in ("tau", "lam", "map_selection", "empty_maps", "iterations"):
        assert f"train_cls.{key}" in cls
    assert "saliency.workers" not in params_deps("saliency") and "saliency.input_size" in params_deps("saliency")
    assert "infer_cam.max_batch_pixels" not in params_deps("infer_cam")


def test_import_closure_follows_lazy_imports():
    # evaluate imports artifacts.saliency_maps inside a function; predict_seg reads pseudo-mask PNGs
    assert "artifacts/saliency_maps.py" in code_deps("evaluate")
    assert "artifacts/pseudo_masks.py" in code_deps("predict_seg")
    assert all("core/config.py" in code_deps(s) for s in STAGES if s != "headline")  # headline reads no params


def test_a_stage_validates_only_its_own_sections(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train_seg"]["lr"] = "fast"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    assert load_params(path, sections=stage_sections("infer_cam")).infer_cam.scales == params["infer_cam"]["scales"]
    with pytest.raises(ConfigError, match="train_seg.lr"):
        load_params(path, sections=stage_sections("train_seg"))
    with pytest.raises(ConfigError, match="train_seg.lr"):
        load_params(path)                                   # the check_params stage: the whole file
    params["trian_cls"] = params.pop("train_cls")
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="unknown params key 'trian_cls'"):
        load_params(path, sections=stage_sections("infer_cam"))


def test_check_params_stage_names_the_bad_key(tmp_path, capsys):
    from tasks import check_params
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["infer_cam"]["scale"] = [1.0]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    out = tmp_path / "checked.txt"
    assert check_params.main(["--params", str(bad), "--out", str(out)]) == 2
    assert "infer_cam.scale" in capsys.readouterr().err and not out.exists()
    assert check_params.main(["--params", str(REPO / "params.yaml"), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert check_params.main(["--params", str(REPO / "params.yaml"), "--out", str(out)]) == 0
    assert out.read_bytes() == first                        # constant: downstream stages never rerun for it


def test_every_data_path_in_dvc_yaml_is_one_of_core_paths():
    """One source per path: a path dvc.yaml names under data/ is spelled as in core/paths.py."""
    from core import paths

    known = {v for k, v in vars(paths).items() if k.isupper()}
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    named = {(e if isinstance(e, str) else next(iter(e)))
             for st in stages.values() for key in ("deps", "outs", "metrics", "plots") for e in st.get(key) or []}
    assert {p for p in named if p.startswith("data/")} - known == set()
