"""params.yaml is validated before any stage runs; errors name the dotted key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from core.config import ConfigError, Params, build, load_params, to_dict

REPO = Path(__file__).resolve().parents[1]


def _load_with(tmp_path, mutate):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_params(path)


def test_repo_params_load_and_match_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.dataset.kind == "synthetic"
    assert params.prepare.num_train >= 600 and params.prepare.num_val >= 200
    assert params.prepare.image_size >= 128
    assert params.prepare.co_occurrence_rate >= 0.8
    # every section of Params is present in the repo's params.yaml (nothing hidden in code)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(to_dict(params)) == set(data)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d["prepare"].update(bogus=1), "prepare.bogus"),
    (lambda d: d.update(extra_section={}), "extra_section"),
    (lambda d: d["prepare"].update(num_train="many"), "prepare.num_train"),
    (lambda d: d["prepare"].update(num_train=True), "prepare.num_train"),
    (lambda d: d["prepare"].update(co_occurrence_rate=1.5), "prepare.co_occurrence_rate"),
    (lambda d: d["prepare"].update(num_classes=3), "prepare.num_classes"),
    (lambda d: d["prepare"].update(min_objects=3, max_objects=2), "prepare.min_objects"),
    (lambda d: d["dataset"].update(kind="imagenet"), "dataset.kind"),
    (lambda d: d["dataset"].update(kind="voc", root=""), "dataset.root"),
    (lambda d: d["saliency"].update(backend="onnx", model_path=""), "saliency.model_path"),
    (lambda d: d["saliency"].update(mean=[1, 2]), "saliency.mean"),
    (lambda d: d["saliency"].update(splits="train"), "saliency.splits"),
])
def test_bad_params_name_the_key(tmp_path, mutate, key):
    with pytest.raises(ConfigError) as err:
        _load_with(tmp_path, mutate)
    assert f"'{key}" in str(err.value)
    assert "params.yaml" in str(err.value)


def test_int_is_accepted_for_float_and_configs_are_frozen():
    p = build(Params, {"prepare": {"co_occurrence_rate": 1}})
    assert p.prepare.co_occurrence_rate == 1.0 and isinstance(p.prepare.co_occurrence_rate, float)
    with pytest.raises(Exception):
        p.prepare.seed = 3  # type: ignore[misc]


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_the_dataclass_defaults_are_the_values_in_params_yaml():
    """One default per knob: a section built from an empty mapping equals the one params.yaml gives."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    given = load_params(REPO / "params.yaml")
    for field in dataclasses.fields(Params):
        section = getattr(Params(), field.name)
        if not dataclasses.is_dataclass(section):
            assert section == getattr(given, field.name), field.name
            continue
        for knob_field in dataclasses.fields(section):
            if knob_field.name in (raw.get(field.name) or {}):
                assert getattr(section, knob_field.name) == getattr(getattr(given, field.name), knob_field.name), \
                    f"{field.name}.{knob_field.name}"
