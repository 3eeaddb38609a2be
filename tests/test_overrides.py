import pytest

from core.config import ConfigError
from core.overrides import apply_overrides, parse_assignment, parse_assignments


def test_values_are_yaml_and_lists_keep_their_commas():
    assert parse_assignment("train_cls.tau=0.3") == (["train_cls", "tau"], 0.3)
    assert parse_assignments("infer_cam.scales=[0.5, 1.0],export_masks.crf=true,seed_x.y=abc") == [
        (["infer_cam", "scales"], [0.5, 1.0]), (["export_masks", "crf"], True), (["seed_x", "y"], "abc")]


@pytest.mark.parametrize("item", ["tau=0.3", "train_cls.tau", ".tau=1", "train_cls.=1"])
def test_malformed_assignments_are_refused(item):
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_assignment(item)


def test_only_existing_keys_can_be_set():
    params = {"train_cls": {"tau": 0.4, "lam": 0.5}, "seed": 0}
    assert apply_overrides(params, [(["train_cls", "tau"], 0.3)]) == {"train_cls": {"tau": 0.3, "lam": 0.5}, "seed": 0}
    with pytest.raises(ConfigError, match="no key 'train_cls.tua'"):
        apply_overrides(params, [(["train_cls", "tua"], 0.3)])
    with pytest.raises(ConfigError, match="no section 'trian_cls'"):
        apply_overrides(params, [(["trian_cls", "tau"], 0.3)])
    with pytest.raises(ConfigError, match="no section 'seed'"):
        apply_overrides(params, [(["seed", "x"], 1)])
