"""Time the code sandbox: one trivial program, and one 64-completion code reward call.

    python bench/sandbox.py [--runs 100] [--steps 5]

The per-run figure is the median of ``--runs`` sandboxed ``print(1)`` programs, one after another; the
reward figure is the median of ``--steps`` calls of the ``code`` reward on 64 completions (three assert
tests each, as many at once as there are CPUs). The machine may be shared, hence medians.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards
from rewards import code

SOLUTION = "<think>add</think>\n```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="trivial programs timed")
    parser.add_argument("--steps", type=int, default=5, help="64-completion reward calls timed")
    args = parser.parse_args()

    mode = getattr(code, "sandbox_mode", lambda: "none")()
    run_seconds = []
    code.run_program("print(1)")  # warm-up: the one-off checks of what this machine allows
    for _ in range(args.runs):
        start = time.perf_counter()
        result = code.run_program("print(1)")
        run_seconds.append(time.perf_counter() - start)
        assert result.stdout.strip() == "1", result.stderr
    reward = rewards.get("code")
    step_seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        scores = reward(prompts=["q"] * 64, completions=[SOLUTION] * 64, test_cases=[TESTS] * 64)
        step_seconds.append(time.perf_counter() - start)
        assert scores == [1.0] * 64, scores
    result = {
        "mode": mode,
        "run_median_ms": round(1000 * statistics.median(run_seconds), 1),
        "run_p90_ms": round(1000 * sorted(run_seconds)[int(0.9 * len(run_seconds))], 1),
        "reward_64_median_s": round(statistics.median(step_seconds), 3),
        "runs": args.runs,
        "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
