"""The headline metrics file: the values dvc exp show displays, from the detailed metrics files."""

from __future__ import annotations

import json

from tasks import headline


def test_headline_values_by_hand(tmp_path):
    put = {}
    for name, obj in {"cls": {"val": {"mAP": 0.9, "AP": {"a": 0.9}}, "step": 5},
                      "pseudo": {"miou": 0.5, "boundary": {"f1": 0.4}, "cooccurrence": {"mean_ratio": 1.2},
                                 "threshold_sweep": {"oracle_miou": 0.45, "oracle_threshold": 0.6},
                                 "per_class_iou": {"background": 0.8}},
                      "refined": {"miou": 0.55, "boundary": {"f1": 0.35}, "cooccurrence": {"mean_ratio": 1.1}},
                      "seg": {"miou": 0.6, "boundary": {"f1": 0.3}}}.items():
        put[name] = tmp_path / f"{name}.json"
        put[name].write_text(json.dumps(obj))
    out = tmp_path / "headline.json"
    values = headline.run({"train_cls": put["cls"], "pseudo": put["pseudo"], "refined": put["refined"],
                           "seg": put["seg"]}, out)
    assert values == {"classifier": {"val_mAP": 0.9},
                      "pseudo_masks": {"miou": 0.5, "boundary_f1": 0.4, "mean_mkc": 1.2,
                                       "oracle_threshold_miou": 0.45, "oracle_threshold": 0.6},
                      "refined_masks": {"miou": 0.55, "boundary_f1": 0.35, "mean_mkc": 1.1},
                      "segmenter": {"val_miou": 0.6, "val_boundary_f1": 0.3}}
    assert json.loads(out.read_text()) == values
    assert sum(len(v) for v in values.values()) <= 12


def test_missing_stages_give_nulls_and_corrupt_files_name_themselves(tmp_path):
    missing = {"train_cls": tmp_path / "a.json", "pseudo": tmp_path / "b.json", "seg": tmp_path / "c.json"}
    values = headline.run(missing, tmp_path / "h.json")
    assert values["classifier"]["val_mAP"] is None and values["segmenter"]["val_miou"] is None
    assert values["refined_masks"]["miou"] is None                    # a run without the refinement stages
    (tmp_path / "b.json").write_text("{not json")
    try:
        headline.run(missing, tmp_path / "h.json")
    except ValueError as e:
        assert "b.json" in str(e)
    else:
        raise AssertionError("a corrupt metrics file must be an error")
