"""Which params.yaml sections and keys each DVC stage reads.

``core.stage_deps`` turns these into dvc.yaml's key-by-key ``params`` (the operational knobs left out);
a stage validates only the sections it reads (``core.stage_cli``), so a bad ``train_seg`` value does not
stop ``infer_cam``.
"""

from __future__ import annotations

# whole sections or dotted keys
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "check_params": (),
    # saliency.backend: the saliency input size prepare lists under auto_sizes depends on the detector
    "prepare": ("dataset", "prepare", "saliency.backend"),
    "saliency": ("saliency",),
    "train_cls": ("seed", "train_cls"),
    "infer_cam": ("infer_cam",),
    # the detector's keys that decide its maps (splits, workers and devices do not)
    "rescue_saliency": ("rescue_saliency", "saliency.backend", "saliency.model_path", "saliency.isnet_variant",
                        "saliency.mean", "saliency.std", "saliency.channel_order", "saliency.output_scaling"),
    "export_masks": ("export_masks",),
    "evaluate": ("evaluate",),
    "train_affinity": ("seed", "train_affinity"),
    "refine_masks": ("refine_masks",),
    # the refined masks' evaluation: the evaluate keys that act without CAMs
    "evaluate_refined": ("evaluate.splits", "evaluate.boundary_tolerance", "evaluate.report_images",
                         "evaluate.report_tile"),
    "train_seg": ("seed", "train_seg"),
    "predict_seg": ("predict_seg",),
    # the segmenter's evaluation: the split it predicted and the evaluate keys that act without CAMs
    "evaluate_seg": ("predict_seg.split", "evaluate.boundary_tolerance", "evaluate.report_images",
                     "evaluate.report_tile"),
    "headline": (),
}


def stage_sections(stage: str) -> tuple[str, ...]:
    """The params.yaml sections ``stage`` reads (what its ``load_params`` validates)."""
    return tuple(dict.fromkeys(entry.partition(".")[0] for entry in STAGE_PARAMS[stage]))
