import pytest

from core.config import ConfigError
from core.overrides import apply_overrides, parse_assignment, parse_assignments


def test_values_are_yaml_and_lists_keep_their_commas():
    assert parse_assignment("train_cls.tau=0.3") == (["train_cls", "tau"], 0.3)
    assert parse_assignments("infer_cam.scales=[0.5, 1.0],export_masks.crf=true,seed_x.y=abc") == [
        (["infer_cam", "scales"], [0.5, 1.0]), (["export_masks", "crf"], True), (["seed_x", "y"], "abc")]


@pytest.mark.parametrize("item", ["train_cls.tau", ".tau=1", "train_cls.=1", "=1", "seed"])
def test_malformed_assignments_are_refused(item):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_assignment(item)


def test_a_top_level_key_is_set_by_its_name_and_a_section_never_as_a_whole():
    params = {"train_cls": {"tau": 0.4}, "seed": 0}
    assert parse_assignment("seed=1") == (["seed"], 1)
    assert apply_overrides(params, [parse_assignment("seed=1")]) == {"train_cls": {"tau": 0.4}, "seed": 1}
    with pytest.raises(ConfigError, match="no key 'tau'"):          # the section forgotten
        apply_overrides(params, [parse_assignment("tau=0.3")])
    with pytest.raises(ConfigError, match="'train_cls' is a section"):
        apply_overrides(params, [parse_assignment("train_cls=1")])
    assert params == {"train_cls": {"tau": 0.4}, "seed": 1}


def test_only_existing_keys_can_be_set():
    params = {"train_cls": {"tau": 0.4, "lam": 0.5}, "seed": 0}
    assert apply_overrides(params, [(["train_cls", "tau"], 0.3)]) == {"train_cls": {"tau": 0.3, "lam": 0.5}, "seed": 0}
    with pytest.raises(ConfigError, match="no key 'train_cls.tua'"):
        apply_overrides(params, [(["train_cls", "tua"], 0.3)])
    with pytest.raises(ConfigError, match="no section 'trian_cls'"):
        apply_overrides(params, [(["trian_cls", "tau"], 0.3)])
    with pytest.raises(ConfigError, match="no section 'seed'"):
        apply_overrides(params, [(["seed", "x"], 1)])


def test_overrides_of_the_project_params_are_typed_and_of_another_project_only_must_exist(tmp_path):
    from pathlib import Path

    from core.overrides import check_overrides

    project = Path(__file__).resolve().parents[1] / "params.yaml"
    assert check_overrides(project, {"train_cls.tau": 0.3})["train_cls"]["tau"] == 0.3
    with pytest.raises(ConfigError, match="'train_cls.tau' = 7.0 is out of range"):
        check_overrides(project, {"train_cls.tau": 7})
    with pytest.raises(ConfigError, match="no key 'tau'"):
        check_overrides(project, {"tau": 0.3})
    with pytest.raises(ConfigError, match="expected a params key"):
        check_overrides(project, {"train_cls.": 0.3})
    assert check_overrides(project, {"seed": 3})["seed"] == 3
    with pytest.raises(ConfigError, match="'seed'"):               # typed: a seed is an integer
        check_overrides(project, {"seed": "x"})
    other = tmp_path / "params.yaml"
    other.write_text("a:\n  value: 1\n")
    assert check_overrides(other, {"a.value": "anything"}) == {"a": {"value": "anything"}}
    with pytest.raises(ConfigError, match="no key 'a.valu'"):
        check_overrides(other, {"a.valu": 1})
