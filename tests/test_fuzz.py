"""Hostile artifacts (issue #11): the committed corpus through ``pare.load`` and every CLI command that reads
an artifact, and property-based mutation of valid artifacts. Nothing may write a ``PWNED_*`` marker; every
refusal is one clear line (CLI: exit 2)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import fx, nn

import pare
from pare.cli.main import main
from pare.errors import CheckpointError
from tests.fuzz import make_corpus
from tests.fuzz.mutate import load_and_run, make_bases, markers, mutated_artifacts

REPO = Path(__file__).resolve().parents[1]
# The committed index (file name -> kind) pins the corpus; the files themselves are generated from
# tests/fuzz/make_corpus.py for each run (binary files stay out of the repository).
INDEX: dict[str, str] = json.loads((make_corpus.CORPUS / "index.json").read_text())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "corpus"
    assert make_corpus.generate(folder) == INDEX, "the generator and the committed index.json disagree"
    return folder


def _commands(path: Path, out: Path) -> dict[str, list[str]]:
    """Every CLI command that reads an artifact, with arguments that are valid apart from the artifact."""
    return {
        "count": ["count", str(path), "--input-size", "1x8x8"],
        "count --before": ["count", "small_cnn", "--before", str(path), "--input-size", "1x8x8"],
        "eval": ["eval", str(path), "--data", "digits"],
        "bench": ["bench", str(path), "--input-size", "1x8x8", "--batch-sizes", "1"],
        "export": ["export", str(path), "--output", str(out / "m.onnx")],
        "train": ["train", str(path), "--data", "digits", "--recipe", "cifar-standard", "--epochs", "1",
                  "--out", str(out / "train"), "--quiet"],
        "prune --model": ["prune", "--model", str(path), "--data", "digits", "--criterion", "l1",
                          "--reduce-macs", "0.3", "--out", str(out / "prune"), "--quiet"],
    }


def test_corpus_is_complete(corpus: Path) -> None:
    files = sorted(p.name for p in corpus.glob("*.safetensors"))
    assert files == sorted(INDEX) and len(files) >= 100
    kinds = set(INDEX.values())
    assert {"newline", "carriage-return", "quote", "comment", "lookalike", "long", "deep", "huge", "version",
            "kwarg-exploit", "truncated"} <= kinds


def test_kwarg_exploit_is_live_without_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Positive control: the corpus's key runs its statement when fx compiles a graph nobody validated."""
    monkeypatch.chdir(tmp_path)
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.flatten, (x,), {make_corpus.load_time_kwarg_key("control"): 1}))
    fx.GraphModule(nn.Module(), graph)
    assert markers(tmp_path) == ["PWNED_control"]


def test_corpus_is_refused_by_load(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in INDEX:
        with pytest.raises(CheckpointError) as caught:
            pare.load(corpus / name)
        message = str(caught.value)
        assert "\n" not in message and "\r" not in message and len(message) < 600, name
    assert markers(tmp_path) == []


def _main(argv: list[str]) -> tuple[int, str]:
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stderr.getvalue()


def test_corpus_is_refused_by_every_cli_command_in_process(corpus: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file through ``pare.cli.main.main``; the commands take turns, so each reads ~25 hostile files
    (they all load artifacts through the same function)."""
    monkeypatch.chdir(tmp_path)
    commands = list(_commands(Path("x"), Path("y")))
    for number, name in enumerate(INDEX):
        out = tmp_path / f"out{number}"
        out.mkdir()
        command = commands[number % len(commands)]
        code, stderr = _main(_commands(corpus / name, out)[command])
        lines = stderr.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("pare: error: "), (name, command, stderr)
        assert "artifact" in lines[0] or "safetensors" in lines[0], (name, command, lines[0])
        assert not any(out.iterdir()), (name, command, "left files behind")
    assert markers(tmp_path) == []


# The subprocess check runs four commands (interpreter start-up dominates, ~3 s each); the in-process test above
# covers every file with every command, through the same entry point.
_SUBPROCESS_CASES = (("kwarg-exploit", "count"), ("carriage-return", "prune --model"), ("huge", "eval"),
                     ("version", "count --before"))


def _subprocess_cases() -> list[tuple[str, str]]:
    """(file, command): the first file of each kind in _SUBPROCESS_CASES with its command."""
    firsts: dict[str, str] = {}
    for name, kind in INDEX.items():
        firsts.setdefault(kind, name)
    return [(firsts[kind], command) for kind, command in _SUBPROCESS_CASES]


@pytest.mark.slow
def test_cli_subprocess_every_command(corpus: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    pairs = _subprocess_cases()
    running = []
    for number, (name, command) in enumerate(pairs):
        out = tmp_path / f"out{number}"
        out.mkdir()
        argv = _commands(corpus / name, out)[command]
        process = subprocess.Popen([sys.executable, "-m", "pare.cli.main", *argv], cwd=tmp_path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running.append((name, command, process))
        if number == len(pairs) - 1:
            for name_, command_, process_ in running:
                _, stderr = process_.communicate(timeout=120)
                lines = stderr.splitlines()
                assert process_.returncode == 2, (name_, command_, stderr)
                assert len(lines) == 1 and lines[0].startswith("pare: error: "), (name_, command_, stderr)
            running = []
    assert markers(tmp_path) == []


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory):
    return make_bases(tmp_path_factory.mktemp("bases"))


def test_mutated_artifacts_load_or_fail_cleanly(bases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI-sized sample of the mutation benchmark (bench/fuzz_artifacts.py runs >= 10,000)."""
    monkeypatch.chdir(tmp_path)
    outcomes: dict[str, int] = {}

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(data=mutated_artifacts(bases))
    def check(data: bytes) -> None:
        path = tmp_path / "mutated.safetensors"
        path.write_bytes(data)
        outcome = load_and_run(path)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        assert markers(tmp_path) == []

    check()
    assert outcomes.get("refused", 0) > 0
