"""Torch modules and losses: backbones, the EPS / CAM classifier, L_cls and L_sal."""

from models.classifier import build_classifier, load_classifier, save_classifier
from models.losses import classification_loss, image_logits, saliency_loss, select_maps

__all__ = ["build_classifier", "load_classifier", "save_classifier", "classification_loss",
           "image_logits", "saliency_loss", "select_maps"]
