"""The file of a trained network: ``{"format", "meta", "state_dict"}``, written atomically with bytes
that depend only on the weights and metadata, read back with errors that name the file and the stage
that writes it. The classifier and the segmenter differ only in their format string and metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.atomic import save_torch_atomic
from core.hashing import file_sha256


def save_model_file(path: str | Path, model: nn.Module, meta: dict, file_format: str) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch_atomic({"format": file_format, "meta": meta, "state_dict": state}, path)


def read_model_file(path: Path, file_format: str, what: str, stage: str, error: type[Exception]) -> dict:
    """The saved dict (loaded on the CPU); ``what`` (e.g. "classifier") and ``stage`` word the errors."""
    if not path.is_file():
        raise error(f"{what} file not found: {path} (run the {stage} stage first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file is the same user error
        raise error(f"cannot read {what} file {path}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != file_format:
        raise error(f"{path} is not a {what} written by {stage} (expected format {file_format})")
    return obj


def load_weights(model: nn.Module, obj: dict, path: Path, description: str, error: type[Exception]) -> dict:
    """Put the saved weights into ``model``; returns the metadata with the file's sha256 added."""
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise error(f"{path}: weights do not fit a {description}: {e}") from e
    return dict(obj["meta"], sha256=file_sha256(path))
