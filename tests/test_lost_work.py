"""Lost work and reproducible files (issue #11): --resume never replaces a finished run, temporaries of a
killed write are removed on the next start, failed checks leave no empty --out folder, and two identical
prune runs give byte-identical artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pare
from pare.cli.main import main
from pare.models import create

REPO = Path(__file__).resolve().parents[1]
PRUNE = ["--quiet", "prune", "--model", "small_cnn", "--input-size", "1x8x8", "--latency-runs", "0",
         "--reduce-macs", "0.3"]


def test_resume_without_finetune_keeps_the_earlier_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main([*PRUNE, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*PRUNE, "--criterion", "l2", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _killed_writer(*targets: Path) -> list[Path]:
    """Run one process that dies by SIGKILL in the middle of atomic writes of all ``targets``; return the
    temporary files it left."""
    script = textwrap.dedent(f"""
        import contextlib, os, signal
        from pare.io._atomic import atomic_path
        with contextlib.ExitStack() as stack:
            for target in {[str(t) for t in targets]!r}:
                stack.enter_context(atomic_path(target)).write_bytes(b"half of a file")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = []
    for target in targets:
        found = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
        assert len(found) == 1 and found[0].name.endswith(".tmp") and not target.exists()
        left += found
    return left


def test_temporaries_of_a_killed_write_are_removed_next_time(tmp_path: Path) -> None:
    """SIGKILL while writing the artifact and a checkpoint: the next atomic write of the same file removes its
    stale temporary; the next run started on the folder removes all of them."""
    out = tmp_path / "run"
    (out / "finetune").mkdir(parents=True)
    model_tmp, checkpoint_tmp = _killed_writer(out / "model.safetensors", out / "finetune" / "checkpoint.pt")
    pare.save(create("small_cnn"), out / "model.safetensors")
    assert not model_tmp.exists() and checkpoint_tmp.exists()
    assert main([*PRUNE, "--out", str(out), "--overwrite"]) == 0
    assert not checkpoint_tmp.exists() and not list(out.rglob("*.tmp"))


def test_failed_checks_leave_no_empty_out_folder(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "run"
    assert main([*PRUNE, "--criterion", "nope", "--out", str(out)]) == 2
    assert main(["--quiet", "prune", "--model", "nope_model", "--reduce-macs", "0.3", "--out", str(out)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_two_identical_prune_runs_give_identical_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    for name in ("one", "two"):
        assert main([*PRUNE, "--out", str(tmp_path / name)]) == 0
    first, second = ((tmp_path / n / "model.safetensors").read_bytes() for n in ("one", "two"))
    assert first == second
    assert pare.read_metadata(tmp_path / "one" / "model.safetensors")["provenance"]["created_utc"] == (
        "2023-11-14T22:13:20+00:00")


def test_reproducible_save_without_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    torch.manual_seed(0)
    model = create("small_cnn")
    paths = [pare.save(model, tmp_path / f"{i}.safetensors", metadata={"b": 1, "a": [1, 2]}, reproducible=True)
             for i in range(2)]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert pare.read_metadata(paths[0])["provenance"]["created_utc"] is None
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(pare.ConfigError, match="SOURCE_DATE_EPOCH"):
        pare.save(model, tmp_path / "x.safetensors")
