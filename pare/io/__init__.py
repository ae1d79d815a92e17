"""Reading and writing models: third-party checkpoints, pickle-free pare artifacts and ONNX export."""

from __future__ import annotations

from pare.io.artifact import load, read_metadata, save
from pare.io.checkpoint import load_checkpoint, sha256_file
from pare.io.onnx import ExportError, export_onnx

__all__ = ["ExportError", "export_onnx", "load", "load_checkpoint", "read_metadata", "save", "sha256_file"]
