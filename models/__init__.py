"""Torch modules and losses: backbones, the EPS / CAM classifier, DeepLab, L_cls and L_sal, the trained-network file."""
