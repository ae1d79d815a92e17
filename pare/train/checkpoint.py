"""Atomic training checkpoints and RNG state capture, loadable with ``torch.load(..., weights_only=True)``.

Everything stored is a tensor or a primitive container, so the safe unpickler can read it back: the Python and
NumPy RNG states are converted to lists/tensors and rebuilt on restore.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pare.errors import CheckpointError
from pare.io._atomic import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same directory (same file system, so ``os.replace`` is atomic),
    is flushed and fsync'ed, then renamed over ``path``; the directory is fsync'ed so the rename itself is
    durable.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by the trainer (``weights_only=True``); bad files raise
    :class:`CheckpointError`."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointError(f"checkpoint {target} does not exist")
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/unsafe files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {target}: {first_line}") from exc
    if not isinstance(state, dict) or state.get("format") != "pare.train" or "version" not in state:
        raise CheckpointError(f"{target} is not a pare training checkpoint")
    if state["version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{target} has checkpoint version {state['version']}, expected {FORMAT_VERSION}"
        )
    return state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA, when initialised) RNG states as tensors and primitive
    containers."""
    py_version, py_internal, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        # MT19937 keys are uint32; int64 holds them exactly and is a dtype every torch version can load.
        "numpy_key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    try:
        py_version, py_internal, py_gauss = state["python"]
        random.setstate((int(py_version), tuple(int(v) for v in py_internal), py_gauss))
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {
                    "key": state["numpy_key"].numpy().astype(np.uint32),
                    "pos": int(state["numpy_pos"]),
                },
                "has_gauss": int(state["numpy_has_gauss"]),
                "gauss": float(state["numpy_gauss"]),
            }
        )
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint RNG state is malformed: {exc}") from exc
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


class RngFork:
    """Context manager: run a block on a private RNG stream and leave the global Python/NumPy/torch states
    untouched.

    With ``seed`` given, the torch CPU generator is reseeded inside the block (used to make data order and
    worker seeds depend only on (seed, epoch)); evaluation runs inside a fork without a seed so it cannot
    perturb training.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self._saved: dict[str, Any] | None = None

    def __enter__(self) -> RngFork:
        self._saved = capture_rng_state()
        if self.seed is not None:
            # default_generator only: torch.manual_seed would also reseed CUDA generators that we do not
            # restore.
            torch.default_generator.manual_seed(self.seed)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            restore_rng_state(self._saved)
            self._saved = None
