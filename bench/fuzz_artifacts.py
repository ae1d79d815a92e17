"""Mutation fuzzing of pare artifacts: >= 10,000 hypothesis-mutated artifacts through ``pare.load`` (issue #11).

Each example mutates one to three places of the spec or provenance of a tiny valid artifact (graph, zoo or
skeleton kind; see ``tests/fuzz/mutate.py``) with hostile payloads (line breaks, carriage returns, quotes,
comment starts, look-alikes, dunders, the load-time keyword-argument exploit), arbitrary text, extreme numbers
and nested containers, loads it and, if it loads, runs the model once. Counted: how many loaded, how many were
refused with a ``PareError``, how many raised anything else (``escaped``, must be 0) and how many ``PWNED_*``
marker files appeared (must be 0).

    python bench/fuzz_artifacts.py [--examples 10000] [--seed 0]

writes bench/results/fuzz_artifacts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULT_PATH = REPO / "bench" / "results" / "fuzz_artifacts.json"

from _common import environment, git_commit  # noqa: E402  (bench/ is on sys.path when run as a script)


def run(examples: int, seed: int) -> dict[str, Any]:
    import torch
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.fuzz.mutate import load_and_run, make_bases, markers, mutated_artifacts

    torch.set_num_threads(1)
    counts = {"loaded": 0, "refused": 0, "escaped": 0}
    escapes: list[str] = []
    found: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        bases = make_bases(work / "bases")
        cwd = os.getcwd()
        os.chdir(work)  # markers would be written here
        try:

            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, phases=["generate"],
                      suppress_health_check=list(HealthCheck))
            @given(data=mutated_artifacts(bases))
            def one(data: bytes) -> None:
                path = work / "mutated.safetensors"
                path.write_bytes(data)
                try:
                    counts[load_and_run(path)] += 1
                except Exception:  # an escape is a finding, recorded rather than stopping the run
                    counts["escaped"] += 1
                    if len(escapes) < 20:
                        escapes.append(traceback.format_exc()[-1500:])
                for name in markers(work):
                    found.append(name)
                    (work / name).unlink()

            t0 = time.perf_counter()
            one()
            seconds = time.perf_counter() - t0
        finally:
            os.chdir(cwd)
    return {"counts": counts, "examples": sum(counts.values()), "markers_found": len(found), "markers": found,
            "escapes": escapes, "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="mutated artifacts to try")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    parser.add_argument("--output", type=Path, default=RESULT_PATH)
    args = parser.parse_args()
    result = run(args.examples, args.seed)
    record = {
        "benchmark": "fuzz_artifacts",
        "commit": git_commit(mark_dirty=True),
        "environment": environment(),
        "command": f"python bench/fuzz_artifacts.py --examples {args.examples} --seed {args.seed}",
        "seed": args.seed,
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{record['examples']} mutated artifacts: {result['counts']}; markers found: {result['markers_found']} "
          f"({result['seconds']} s) -> {args.output}")
    return 0 if result["markers_found"] == 0 and result["counts"]["escaped"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
