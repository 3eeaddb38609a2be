"""Where the pipeline's files live, relative to the project root: the one source of each path.

Stage entry points take these as defaults; ``dvc.yaml`` names the same files as deps and outs
(``tests/test_stage_deps.py`` checks that every path here that dvc.yaml uses is spelled the same).
"""

from __future__ import annotations

PREPARED_DIR = "data/prepared"
MANIFEST = "data/prepared/dataset.json"
SYNTHETIC_DIR = "data/prepared/synthetic"
PARAMS_CHECKED = "data/params_checked.txt"
SALIENCY_DIR = "data/saliency"
TRAIN_CLS_DIR = "data/train_cls"
CLASSIFIER = "data/train_cls/classifier.pt"
TRAIN_CLS_METRICS = "data/train_cls/live/metrics.json"
TRAIN_CLS_PLOTS = "data/train_cls/live/plots/metrics"
CAMS_DIR = "data/cams"
RESCUED_SALIENCY_DIR = "data/saliency_rescued"  # the maps the masks are made from (rescue_saliency)
PSEUDO_MASKS = "data/pseudo_masks.h5"
TRAIN_AFFINITY_DIR = "data/train_affinity"
AFFINITY_NET = "data/train_affinity/affinity.pt"
TRAIN_AFFINITY_METRICS = "data/train_affinity/live/metrics.json"
TRAIN_AFFINITY_PLOTS = "data/train_affinity/live/plots/metrics"
REFINED_MASKS = "data/refined_masks.h5"
EVAL_REFINED_DIR = "data/eval_refined"
EVAL_REFINED_METRICS = "data/metrics/eval_refined.json"
EVAL_DIR = "data/eval"
EVAL_SEG_DIR = "data/eval_seg"
TRAIN_SEG_DIR = "data/train_seg"
SEGMENTER = "data/train_seg/segmenter.pt"
TRAIN_SEG_PLOTS = "data/train_seg/live/plots/metrics"
PREDICT_DIR = "data/predict_seg"
METRICS_DIR = "data/metrics"
PREPARE_METRICS = "data/metrics/prepare.json"
SALIENCY_METRICS = "data/metrics/saliency.json"
RESCUE_SALIENCY_METRICS = "data/metrics/rescue_saliency.json"
EVAL_PSEUDO_METRICS = "data/metrics/eval_pseudo.json"
TRAIN_SEG_METRICS = "data/metrics/train_seg.json"
EVAL_SEG_METRICS = "data/metrics/eval_seg.json"
HEADLINE_METRICS = "data/metrics/headline.json"
THRESHOLD_SWEEP_PLOT = "data/plots/eval_pseudo_threshold_sweep.csv"
TIMINGS_DIR = "data/timings"

STATE_DIR = ".state"                 # git-ignored: resume checkpoints, fetched models, Prefect home
TRAIN_CLS_STATE = ".state/train_cls"
TRAIN_SEG_STATE = ".state/train_seg"
TRAIN_AFFINITY_STATE = ".state/train_affinity"
PREDICT_SEG_STATE = ".state/predict_seg"
MODELS_STATE = ".state/models"
