"""Benchmarks: held-out problems read from a built-in task's test split, a file (GSM8K, MATH-500, AIME, AMC
layouts are recognized), a named benchmark in a data directory or a Hub dataset, normalized to ``prompt`` and
``answer`` columns; and the held-out rows a training run evaluates on. Loading goes through `grpo.data`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rewards.extract import gold_answer_text

from .data import DataError, check_columns, load_rows, rename_columns
from .tasks import TASKS, is_task

if TYPE_CHECKING:
    from .config import DataSection

BENCHMARK_SEED = 0
"""Generation seed of built-in task benchmarks (their ``test`` split is disjoint from training for any seed)."""
DATA_DIR_VARIABLE = "GRPO_DATA_DIR"
"""Environment variable: a directory searched first for named benchmarks (``gsm8k`` -> ``gsm8k_test.jsonl``)."""
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The shared benchmark directory next to the repository, searched after :data:`DATA_DIR_VARIABLE`."""
BENCHMARK_FILES: dict[str, tuple[str, ...]] = {
    "gsm8k": ("gsm8k_test.jsonl", "gsm8k.jsonl"),
    "math500": ("math500.jsonl", "math500_test.jsonl"),
    "aime24": ("aime24.jsonl", "aime24_test.jsonl"),
    "amc23": ("amc23.jsonl", "amc23_test.jsonl"),
}
"""Named benchmarks and the file names tried for each in the data directories; any other name ``x`` is
looked up as ``x.jsonl`` and ``x_test.jsonl``."""
HUB_BENCHMARKS: dict[str, tuple[str, str]] = {
    "gsm8k": ("openai/gsm8k:main", "test"),
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "amc23": ("math-ai/amc23", "test"),
}
"""Hub datasets (``owner/name[:config]``, split) that named benchmarks fall back to when no file is found."""
QUESTION_FIELDS = ("prompt", "problem", "question", "Problem", "Question", "input", "query")
"""Columns tried, in order, for a benchmark's question."""
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "gold", "target_answer", "solution", "Solution")
"""Columns tried, in order, for a benchmark's gold answer (a worked solution is reduced to its final answer)."""


def data_dirs() -> list[Path]:
    """Return the directories searched for named benchmarks: ``$GRPO_DATA_DIR`` (when set), then
    :data:`SHARED_DATA_DIR`."""
    dirs = [Path(os.environ[DATA_DIR_VARIABLE]).expanduser()] if os.environ.get(DATA_DIR_VARIABLE) else []
    return [*dirs, SHARED_DATA_DIR]


def find_benchmark_file(name: str) -> Path | None:
    """Return the file a named benchmark resolves to in :func:`data_dirs`, or None when there is none."""
    candidates = BENCHMARK_FILES.get(name, (f"{name}.jsonl", f"{name}_test.jsonl"))
    for directory in data_dirs():
        for candidate in candidates:
            if (directory / candidate).is_file():
                return directory / candidate
    return None


def benchmark_name(name_or_file: str) -> str:
    """Return a short name for a benchmark: the file's stem for a path, else the name itself."""
    path = Path(name_or_file)
    return path.stem if path.suffix else name_or_file.replace("/", "_").replace(":", "_")


def _first_present(columns: Sequence[str], tried: Sequence[str]) -> str | None:
    return next((c for c in tried if c in columns), None)


def normalize_benchmark_rows(rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Return rows with ``prompt`` (the question) and ``answer`` (the gold answer text), other fields kept.

    The question is the first of :data:`QUESTION_FIELDS` the rows have, the gold the first of
    :data:`ANSWER_FIELDS`, reduced to its final answer (``#### N`` of GSM8K, the last ``\\boxed{}`` of a
    worked solution, numbers as text). When the gold field was a worked solution, it is kept as
    ``solution`` (unless the rows already have one).

    Raises:
        DataError: no question or answer column (the message lists the columns and the ones tried), or a
            row whose gold answer is empty.
    """
    if not rows:
        raise DataError(f"benchmark {source!r} has no rows")
    columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
    question, answer = _first_present(columns, QUESTION_FIELDS), _first_present(columns, ANSWER_FIELDS)
    if question is None or answer is None:
        lacking = "question" if question is None else "answer"
        tried = QUESTION_FIELDS if question is None else ANSWER_FIELDS
        raise DataError(
            f"benchmark {source!r} has no {lacking} column (tried {', '.join(tried)}); its columns are: "
            f"{', '.join(columns)}. Map one with field_map, e.g. {{'my_question': 'prompt', 'my_gold': 'answer'}}"
        )
    check_columns(rows, [question, answer], source)
    out = []
    for i, row in enumerate(rows):
        raw = row[answer]
        gold = gold_answer_text(raw)
        if gold is None:
            raise DataError(
                f"benchmark {source!r}, row {i}: the gold answer ({answer!r}) is empty or not text: {raw!r}"
            )
        extras = {k: v for k, v in row.items() if k not in (question, answer, "prompt", "answer")}
        if isinstance(raw, str) and raw.strip() != gold and "solution" not in extras:
            extras["solution"] = raw
        out.append({"prompt": row[question], "answer": gold, **extras})
    return out


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Return the first ``limit`` (all when None) JSON objects of a JSON-lines file, values as written
    (``"025"`` stays a string, ``27.0`` a float); blank lines are skipped.

    Raises:
        DataError: a line that is not a JSON object (the message gives the line number).
    """
    rows: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{str(path)!r}, line {number}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{str(path)!r}, line {number}: a {type(row).__name__}, not a JSON object")
            rows.append(row)
    return rows


def _load_file(path: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit={limit!r} is not allowed; use an integer >= 0 or None (all rows)")
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return read_jsonl(path, limit)
    return load_rows(str(path), split=split, limit=limit)


def load_benchmark(
    name_or_file: str,
    limit: int | None = None,
    field_map: Mapping[str, str] | None = None,
    *,
    split: str = "test",
) -> list[dict[str, Any]]:
    """Load a benchmark as rows with ``prompt``, ``answer`` (gold answer text) and the source's other fields.

    Args:
        name_or_file: one of
            - a built-in task (:data:`grpo.tasks.TASKS`): its ``test`` split, seed :data:`BENCHMARK_SEED`
              (1000 rows unless ``limit``);
            - a ``.jsonl`` (read as written, :func:`read_jsonl`), ``.json``, ``.parquet`` or ``.csv`` file, or
              a directory of them (:func:`grpo.data.load_rows`); GSM8K
              (``question``/``answer`` with ``#### N``), MATH-500, AIME and AMC (``problem``/``answer``)
              layouts are recognized (see :func:`normalize_benchmark_rows`);
            - a named benchmark (``gsm8k``, ``math500``, ``aime24``, ``amc23``, or any ``x`` with an
              ``x.jsonl`` / ``x_test.jsonl``) in :func:`data_dirs`; when no file is found the four named
              ones fall back to their Hub copies (:data:`HUB_BENCHMARKS`);
            - a Hub dataset ``owner/name[:config]`` (split ``split``).
        limit: at most this many rows, the first ones.
        field_map: renames applied to the source's columns before detection, e.g. ``{"query": "prompt",
            "label": "answer"}``.
        split: the split of a Hub dataset or directory.

    Raises:
        FileNotFoundError: a path that does not exist.
        DataError: an unknown name, an unreachable Hub, or rows without a usable question or answer.
    """
    path = Path(name_or_file).expanduser()
    if is_task(name_or_file):
        rows = load_rows(name_or_file, split="test", limit=limit, seed=BENCHMARK_SEED)
    elif path.exists():
        rows = _load_file(path, split, limit)
    elif (found := find_benchmark_file(name_or_file)) is not None:
        rows = _load_file(found, split, limit)
    elif name_or_file in HUB_BENCHMARKS:
        hub, hub_split = HUB_BENCHMARKS[name_or_file]
        try:
            rows = load_rows(hub, split=hub_split, limit=limit)
        except DataError as exc:
            searched = ", ".join(str(d) for d in data_dirs())
            raise DataError(
                f"benchmark {name_or_file!r}: no file {' or '.join(BENCHMARK_FILES[name_or_file])} in {searched} "
                f"(set {DATA_DIR_VARIABLE} to a directory holding one), and the Hub copy failed: {exc}"
            ) from exc
    elif "/" not in name_or_file and not path.suffix:
        raise DataError(
            f"unknown benchmark {name_or_file!r}; allowed: a built-in task ({', '.join(TASKS)}), a named "
            f"benchmark ({', '.join(BENCHMARK_FILES)}, or any x with x.jsonl in {DATA_DIR_VARIABLE} or "
            f"{SHARED_DATA_DIR}), a data file, or a Hub dataset 'owner/name[:config]'"
        )
    else:
        rows = load_rows(name_or_file, split=split, limit=limit)
    if field_map:
        rows = rename_columns(rows, field_map, name_or_file)
    return normalize_benchmark_rows(rows, name_or_file)


def load_eval_rows(data: DataSection, seed: int = 0) -> list[dict[str, Any]]:
    """Return the held-out rows a training run evaluates on (``data.eval_limit`` of them).

    Without ``data.eval_source``: the ``test`` split of the training source, with its ``task_options``
    and ``field_map``. With one: that benchmark, read like ``grpo eval --benchmark`` (:func:`load_benchmark`:
    ``gsm8k``, ``math500``, a task, a file, a Hub dataset), so its question and gold answer columns are
    found whatever they are called.
    """
    if data.eval_source is None:
        return load_rows(data.source, split="test", limit=data.eval_limit, seed=seed,
                         task_options=data.task_options, field_map=data.field_map)
    return load_benchmark(data.eval_source, limit=data.eval_limit)
