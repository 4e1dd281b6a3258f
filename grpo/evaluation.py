"""Evaluation of a policy on reasoning benchmarks: pass@k, mean@n (R1's sampled pass@1), maj@k, format
compliance and completion length, graded by the same reward functions that train the policy.

Benchmarks are built-in tasks (their ``test`` split), benchmark files (GSM8K, MATH-500, AIME, AMC layouts
are recognized), named benchmarks looked up in a data directory, or Hub datasets; ``grpo eval`` runs
:func:`evaluate` on a checkpoint, and the trainer calls :func:`evaluate_policy` on a held-out set.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rewards as rewards_lib
from rewards.extract import EXTRACT_MODES, THINK_OPEN, extract_answers, gold_answer_text
from rewards.math import answers_equivalent, grade_many

from .data import DataError, check_columns, load_rows, rename_columns
from .rollout.sampling_params import SamplingParams
from .tasks import TASKS, is_task
from .templates import CHAT, render_prompt

if TYPE_CHECKING:
    from .config import DataSection

# ----- constants ------------------------------------------------------------------------------------------
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
BREAKDOWN_FIELDS = ("level", "subject")
"""Columns broken down by automatically when every row has them (MATH-500's level and subject)."""
MATH_GRADERS = ("accuracy", "math_accuracy", "gsm8k", "numeric")
"""Graders whose answers are grouped by mathematical equivalence for maj@k; other graders group by string."""
SAMPLE_FIELDS = (
    "problem", "sample", "prompt", "completion", "answer", "gold", "correct", "score", "format_ok", "length",
    "finish_reason",
)
"""Fields of every per-sample record (followed by the row's breakdown fields, when any):
``problem`` (row index), ``sample`` (index among the n), ``prompt`` (the rendered prompt text),
``completion`` (decoded text), ``answer`` (the extracted final answer; None when there is none or
several different ones, and then the sample abstains from maj@k), ``gold`` (the gold
answer), ``correct`` (the grader gave full marks), ``score`` (the grader's raw score; None when it does
not apply, e.g. an unparsable gold), ``format_ok`` (the R1 ``format`` reward is 1), ``length``
(completion tokens, a final EOS included), ``finish_reason`` (``stop`` or ``length``)."""

_FULL_MARKS = 1.0 - 1e-9
_WHITESPACE = re.compile(r"\s+")


# ----- estimators -----------------------------------------------------------------------------------------
def _check_counts(n: int, c: int) -> None:
    for name, value in (("n", n), ("c", c)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} is not allowed; use an integer")
    if n < 1:
        raise ValueError(f"n={n} is not allowed; the number of samples must be >= 1")
    if not 0 <= c <= n:
        raise ValueError(f"c={c} is not allowed with n={n}; the number correct must be in [0, {n}]")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k), the probability that a random k-subset of the n samples holds at
    least one correct one, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no large binomials).

    Raises:
        ValueError: ``n < 1``, ``c`` outside ``[0, n]``, or ``k`` outside ``[1, n]``.
    """
    _check_counts(n, c)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} is not allowed with n={n}; pass@k needs an integer k in [1, {n}]")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_at_n(n: int, c: int) -> float:
    """Return the fraction of ``n`` samples that are correct, ``c / n``: R1's pass@1 "with k sampled
    responses" (mean@n), equal to :func:`pass_at_k` with ``k=1``."""
    _check_counts(n, c)
    return c / n


def paired_standard_error(after: Sequence[float], before: Sequence[float]) -> float:
    """Return the standard error of mean(after) - mean(before) over the same problems: the sample standard
    deviation of the per-problem differences over sqrt(problems). Pairing removes the spread of problem
    difficulty, which both checkpoints share, so a real gain stands out of far less noise than two
    independent error bars would allow.

    Raises:
        ValueError: the two lists differ in length or hold fewer than 2 problems.
    """
    if len(after) != len(before) or len(after) < 2:
        raise ValueError(f"paired_standard_error needs two equal-length lists of >= 2 problems, got "
                         f"{len(after)} and {len(before)}")
    diffs = [a - b for a, b in zip(after, before)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return math.sqrt(variance / len(diffs))


def _same_string(a: str, b: str) -> bool:
    return _WHITESPACE.sub("", a) == _WHITESPACE.sub("", b)


EquivalentMany = Callable[[list[tuple[str, str]]], list[bool]]
"""Batched equivalence: ``[(representative, answer), ...] -> [equal?, ...]`` (one round of grading)."""


def math_equivalent_many(pairs: list[tuple[str, str]]) -> list[bool]:
    """Batched :func:`rewards.math.answers_equivalent`: one :func:`rewards.math.grade_many` call, each
    answer graded against its representative as the gold."""
    if not pairs:
        return []
    return [r is True for r in grade_many([b for _, b in pairs], [a for a, _ in pairs])]


def group_answers_many(
    answer_lists: Sequence[Sequence[str | None]], equivalent_many: EquivalentMany
) -> list[list[int | None]]:
    """Group each problem's answers for majority voting; return a group id per sample (None: no answer).

    Samples are taken in order; an answer joins the first group whose representative (first answer) it
    equals up to whitespace, else the first for which ``equivalent_many`` says equal, else opens a new
    group. The grouping of the first k samples is therefore the prefix of the grouping of all n. All
    problems advance together, one ``equivalent_many`` call per sample position, so a batched grader
    sees many pairs at once.
    """
    reps: list[list[int]] = [[] for _ in answer_lists]  # per problem: sample index of each group's representative
    ids: list[list[int | None]] = [[None] * len(a) for a in answer_lists]
    for t in range(max((len(a) for a in answer_lists), default=0)):
        pending: list[int] = []
        for p, answers in enumerate(answer_lists):
            if t >= len(answers) or answers[t] is None:
                continue
            answer = answers[t]
            hit = next((g for g, r in enumerate(reps[p]) if _same_string(answers[r] or "", answer or "")), None)
            if hit is None and reps[p]:
                pending.append(p)
            elif hit is None:
                reps[p].append(t)
                ids[p][t] = 0
            else:
                ids[p][t] = hit
        pairs = [(answer_lists[p][r] or "", answer_lists[p][t] or "") for p in pending for r in reps[p]]
        verdicts = iter(equivalent_many(pairs))
        for p in pending:
            found = [next(verdicts) for _ in reps[p]]
            if any(found):
                ids[p][t] = found.index(True)
            else:
                reps[p].append(t)
                ids[p][t] = len(reps[p]) - 1
    return ids


def majority_vote(groups: Sequence[int | None], correct: Sequence[bool], k: int) -> bool:
    """Return whether the majority of the first ``k`` samples' groups (:func:`group_answers_many`) is correct:
    most votes wins, a tie goes to the group voted for earliest, abstentions (None) do not count, no vote
    at all fails; the winning group is correct when its first sample is."""
    first: dict[int, int] = {}
    votes: dict[int, int] = {}
    for i, g in enumerate(groups[:k]):
        if g is not None:
            first.setdefault(g, i)
            votes[g] = votes.get(g, 0) + 1
    if not votes:
        return False
    winner = max(votes, key=lambda g: (votes[g], -first[g]))
    return bool(correct[first[winner]])


def majority_at_k(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    k: int,
    *,
    equivalent: Callable[[str, str], bool] = answers_equivalent,
) -> bool:
    """Return whether majority voting over the first ``k`` samples picks a correct answer (maj@k).

    Rules:
        - The first ``k`` samples vote (not an average over all k-subsets), so maj@k is reproducible and
          maj@n uses every sample.
        - Answers are grouped by ``equivalent(representative, answer)`` (default: mathematical
          equivalence, :func:`rewards.math.answers_equivalent`, so ``1/2``, ``0.5`` and ``\\frac{1}{2}``
          are one group); a group's representative is its first answer. Answers equal up to whitespace
          always share a group.
        - A sample with no answer (None) abstains. If every sample abstains, the vote fails (False).
        - The group with the most votes wins; a tie goes to the group whose first vote came earliest.
        - The winning group is correct when its representative sample is (``correct`` is the grader's
          verdict per sample).

    :func:`evaluate` applies the same rules to all problems at once (:func:`group_answers_many`, then
    :func:`majority_vote`), batching the equivalence checks.

    Raises:
        ValueError: ``answers`` and ``correct`` differ in length, or ``k`` is outside ``[1, len(answers)]``.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_at_k got {len(answers)} answers but {len(correct)} correctness flags")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(answers):
        m = len(answers)
        raise ValueError(f"k={k!r} is not allowed with {m} samples; use an integer in [1, {m}]")
    groups = group_answers_many([answers[:k]], lambda pairs: [equivalent(a, b) for a, b in pairs])[0]
    return majority_vote(groups, correct, k)


# ----- benchmarks -----------------------------------------------------------------------------------------
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


# ----- grading --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grader:
    """The reward function that decides correctness, and how its answers are read and grouped."""

    name: str
    reward: Callable[..., Any]
    extract: str = "auto"
    """Where the recorded answer is read (:data:`rewards.extract.EXTRACT_MODES`), the reward's own mode."""
    math_equivalence: bool = True
    """maj@k groups answers by :func:`rewards.math.answers_equivalent` (else by string)."""

    def equivalent_many(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Return, per ``(representative, answer)`` pair, whether the two fall in one maj@k group."""
        return math_equivalent_many(pairs) if self.math_equivalence else [_same_string(a, b) for a, b in pairs]


def auto_grader_name(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return the reward that grades these rows: ``countdown`` when every row has ``target`` and
    ``numbers`` (or ``nums``), else ``accuracy`` (math answers, math-verify)."""
    if rows and all("target" in r and ("numbers" in r or "nums" in r) for r in rows):
        return "countdown"
    return "accuracy"


def resolve_grader(grader: str | Grader, rows: Sequence[Mapping[str, Any]]) -> Grader:
    """Return the :class:`Grader` for ``grader``: ``"auto"`` (:func:`auto_grader_name`), a registered
    reward name (``accuracy``, ``countdown``, ``gsm8k``...) or ``package.module:function``.

    Raises:
        ValueError: an unknown reward (the message lists the registered ones).
    """
    if isinstance(grader, Grader):
        return grader
    name = auto_grader_name(rows) if grader == "auto" else grader
    reward = rewards_lib.resolve(name)
    extract = "auto"
    if name in rewards_lib.names():
        extract = str(rewards_lib.options(name).get("extract", "auto"))
    return Grader(name, reward, extract if extract in EXTRACT_MODES else "auto", name in MATH_GRADERS)


def _single_answer(text: str, mode: str) -> str | None:
    answers = extract_answers(text, mode)
    return answers[0] if len(answers) == 1 else None


def grade_samples(
    rows: Sequence[Mapping[str, Any]],
    completions: Sequence[str],
    grader: str | Grader = "auto",
    *,
    prompts: Sequence[str] | None = None,
    think_in_prompt: bool = False,
) -> list[dict[str, Any]]:
    """Grade completions exactly as training rewards them: the grader's reward function (the ``accuracy``
    reward for math) decides ``correct`` (full marks), the R1 ``format`` reward decides ``format_ok``.

    Args:
        rows: the data row of each completion (one per completion; repeat a row for its n samples).
        completions: the completion texts.
        grader: see :func:`resolve_grader`.
        prompts: the prompt texts passed to the rewards (default: the rows' ``prompt``).
        think_in_prompt: the prompt ends with ``<think>`` (the format reward then expects no opening tag).

    Returns:
        Per completion: ``answer`` (the final answer, read as the grader reads it; None when there is none
        or several different ones, a hedge the graders score wrong), ``correct``, ``score`` (raw; None
        when the reward does not apply) and ``format_ok``.

    Raises:
        ValueError: ``rows`` and ``completions`` differ in length, or an unknown grader.
        rewards.RewardError: the reward function failed.
    """
    if len(rows) != len(completions):
        raise ValueError(f"grade_samples got {len(rows)} rows for {len(completions)} completions")
    if not rows:
        return []
    g = resolve_grader(grader, rows)
    texts = list(completions)
    prompt_list = list(prompts) if prompts is not None else [r.get("prompt") for r in rows]
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "prompt"]
    columns = {k: [r.get(k) for r in rows] for k in keys}
    scores = rewards_lib.call_reward(g.reward, prompt_list, texts, None, columns, name=g.name)
    fmt = rewards_lib.get("format", think_in_prompt=True) if think_in_prompt else rewards_lib.get("format")
    formats = rewards_lib.call_reward(fmt, prompt_list, texts, None, columns, name="format")
    return [
        {
            "answer": _single_answer(text, g.extract),
            "correct": score is not None and score >= _FULL_MARKS,
            "score": score,
            "format_ok": f is not None and f >= _FULL_MARKS,
        }
        for text, score, f in zip(texts, scores, formats)
    ]


# ----- evaluation -----------------------------------------------------------------------------------------
def encode_prompt(tokenizer: Any, text: str, template: str) -> list[int]:
    """Return a rendered prompt's token ids as training feeds them to the engine: the text tokenized
    without special tokens, with BOS prepended (if the tokenizer has one and the text does not start
    with it) unless the template is ``chat`` (the chat template writes its own)."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos) and template != CHAT:
        ids = [bos, *ids]
    return ids


def parse_ks(text: str) -> list[int]:
    """Parse ``"1,8"`` into ``[1, 8]`` (sorted, without repeats).

    Raises:
        ValueError: anything but comma-separated positive integers.
    """
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise ValueError(f"k={text!r} is not allowed; use comma-separated positive integers such as 1,8")
    return ks


def check_sampling(n: int, ks: Sequence[int] | None, temperature: float) -> list[int]:
    """Validate the sampling settings of an evaluation and return the ks (default: 1 and n).

    Raises:
        ValueError: ``n < 1``; ``temperature`` 0 (greedy) with ``n > 1`` (the samples would be identical);
            or a k outside ``[1, n]``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} is not allowed; use an integer >= 1 (samples per problem)")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is not allowed; use 0 (greedy) or a positive value")
    if temperature == 0 and n > 1:
        raise ValueError(
            f"temperature 0 is greedy decoding, so n={n} samples would be identical; use n=1, or a "
            f"temperature > 0 (R1 evaluates with 0.6) for pass@k and maj@k"
        )
    chosen = sorted(set(ks)) if ks else sorted({1, n})
    bad = [k for k in chosen if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ValueError(f"k={', '.join(map(str, bad))} is not allowed with n={n}; each k must be in [1, {n}]")
    return chosen


@dataclass
class EvalResult:
    """What :func:`evaluate` returns.

    ``summary``: metric -> value over all problems (``pass@k`` per k, ``mean@n``, ``maj@k`` per k > 1,
    ``format``, ``mean_length``, ``clipped_ratio``, ``ungraded``, ``num_problems``, ``num_samples``).
    ``breakdown``: field -> field value -> the same metrics over that value's problems.
    ``samples``: one record per completion (:data:`SAMPLE_FIELDS`). ``config``: the settings used.
    """

    summary: dict[str, float]
    breakdown: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def problem_metrics(
    samples: Sequence[Mapping[str, Any]], ks: Sequence[int], groups: Sequence[int | None]
) -> dict[str, float]:
    """Return one problem's metrics from its n sample records (``correct``, ``format_ok``, ``length``,
    ``finish_reason``, ``score``) and their answers' vote groups (:func:`group_answers_many`): pass@k per
    k, mean@n, maj@k per k > 1, format rate, mean length, clipped rate, ungraded count."""
    n = len(samples)
    correct = [bool(s["correct"]) for s in samples]
    c = sum(correct)
    metrics: dict[str, float] = {f"pass@{k}": pass_at_k(n, c, k) for k in ks}
    metrics[f"mean@{n}"] = mean_at_n(n, c)
    for k in ks:
        if k > 1:
            metrics[f"maj@{k}"] = float(majority_vote(groups, correct, k))
    metrics["format"] = sum(bool(s["format_ok"]) for s in samples) / n
    metrics["mean_length"] = sum(s["length"] for s in samples) / n
    metrics["clipped_ratio"] = sum(s["finish_reason"] == "length" for s in samples) / n
    metrics["ungraded"] = float(sum(s["score"] is None for s in samples))
    return metrics


def aggregate(per_problem: Sequence[Mapping[str, float]], n: int) -> dict[str, float]:
    """Average per-problem metrics over problems (``ungraded`` is summed); adds ``num_problems`` and
    ``num_samples``. Every problem has the same n, so sample-level rates equal their per-problem means."""
    if not per_problem:
        return {"num_problems": 0, "num_samples": 0}
    out: dict[str, float] = {}
    for key in per_problem[0]:
        total = sum(p[key] for p in per_problem)
        out[key] = int(total) if key == "ungraded" else total / len(per_problem)
    return {**out, "num_problems": len(per_problem), "num_samples": len(per_problem) * n}


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def breakdown_fields(rows: Sequence[Mapping[str, Any]], requested: str | Sequence[str] | None) -> list[str]:
    """Return the fields to break down by: ``requested`` (checked to exist in every row), or, when None,
    those of :data:`BREAKDOWN_FIELDS` every row has.

    Raises:
        KeyError: a requested field some row lacks (the message lists the row's columns).
    """
    if requested is None:
        return [f for f in BREAKDOWN_FIELDS if rows and all(f in r for r in rows)]
    fields = [requested] if isinstance(requested, str) else list(requested)
    for f in fields:
        lacking = next((i for i, r in enumerate(rows) if f not in r), None)
        if lacking is not None:
            columns = ", ".join(map(str, rows[lacking]))
            raise KeyError(f"breakdown field {f!r} is missing from row {lacking}; its columns are: {columns}")
    return fields


def evaluate(
    engine: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    template: str = "r1_zero",
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int = 0,
    grader: str | Grader = "auto",
    breakdown_field: str | Sequence[str] | None = None,
    stop: Sequence[str] = (),
    benchmark: str | None = None,
    use_tqdm: bool = False,
) -> EvalResult:
    """Sample ``n`` completions per row with ``engine``, grade them, and compute the metrics.

    Args:
        engine: an object with ``generate(prompt_token_ids, params)`` (:class:`grpo.rollout.engine.Engine`
            or the vLLM backend).
        tokenizer: the policy's tokenizer (renders chat templates, encodes prompts, decodes completions).
        rows: benchmark rows (:func:`load_benchmark`) with ``prompt`` and the columns the grader reads.
        template: the prompt template (:data:`grpo.templates.TEMPLATES` or a format string).
        n: samples per problem. ks: the k of pass@k / maj@k, each in [1, n] (default 1 and n).
        temperature: 0 is greedy (then n must be 1). top_p, max_tokens, stop: sampling settings.
        seed: sampling seed; problem i's samples use a seed derived from (seed, i), so a problem's
            completions do not depend on which other problems share the batch.
        grader: ``"auto"``, a reward name or ``module:function`` (:func:`resolve_grader`).
        breakdown_field: field(s) to break metrics down by; None: ``level``/``subject`` when present.
        benchmark: the benchmark's name, recorded in the config.
        use_tqdm: show the engine's progress bar.

    Raises:
        ValueError: bad sampling settings (:func:`check_sampling`), no rows, or a prompt that does not fit.
        KeyError: a template or breakdown field the rows lack.
    """
    ks = check_sampling(n, ks, temperature)
    if not rows:
        raise ValueError("evaluate got no rows; load a benchmark with at least one problem")
    fields = breakdown_fields(rows, breakdown_field)
    g = resolve_grader(grader, rows)
    prompts = [render_prompt(r, template, tokenizer) for r in rows]
    prompt_ids = [encode_prompt(tokenizer, p, template) for p in prompts]
    greedy = temperature == 0
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop),
                       seed=None if greedy else seed * 1_000_033 + i)
        for i in range(len(rows))
    ]
    outputs = engine.generate(prompt_ids, params, use_tqdm=use_tqdm)
    completions = [c for out in outputs for c in out.completions]
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    sample_rows = [rows[i] for i in range(len(rows)) for _ in range(n)]
    think_in_prompt = all(p.rstrip().endswith(THINK_OPEN) for p in prompts)
    grades = grade_samples(sample_rows, texts, g, prompts=[prompts[i] for i in range(len(rows)) for _ in range(n)],
                           think_in_prompt=think_in_prompt)
    samples: list[dict[str, Any]] = []
    for j, (completion, text, grade) in enumerate(zip(completions, texts, grades)):
        i = j // n
        samples.append({
            "problem": i, "sample": j % n, "prompt": prompts[i], "completion": text, "answer": grade["answer"],
            "gold": rows[i].get("answer"), "correct": grade["correct"], "score": grade["score"],
            "format_ok": grade["format_ok"], "length": len(completion.token_ids),
            "finish_reason": completion.finish_reason,
            **{f: rows[i][f] for f in fields},
        })
    by_problem = [samples[i * n : (i + 1) * n] for i in range(len(rows))]
    if max(ks) > 1:
        groups = group_answers_many([[s["answer"] for s in ss] for ss in by_problem], g.equivalent_many)
    else:
        groups = [[None] * n for _ in by_problem]
    per_problem = [problem_metrics(ss, ks, gs) for ss, gs in zip(by_problem, groups)]
    breakdown: dict[str, dict[str, dict[str, float]]] = {}
    for f in fields:
        values = sorted({str(r[f]) for r in rows}, key=_sort_key)
        breakdown[f] = {
            v: aggregate([m for m, r in zip(per_problem, rows) if str(r[f]) == v], n) for v in values
        }
    config = {
        "benchmark": benchmark, "template": template, "n": n, "ks": ks, "temperature": temperature, "top_p": top_p,
        "max_tokens": max_tokens, "seed": seed, "grader": g.name, "stop": list(stop),
    }
    return EvalResult(aggregate(per_problem, n), breakdown, samples, config)


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    template: str = "r1_zero",
    *,
    engine: Any = None,
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
    grader: str | Grader = "auto",
    stop: Sequence[str] = (),
) -> dict[str, float]:
    """Evaluate the policy on held-out rows during training and return flat metrics named ``eval/...``
    (``eval/pass@1``, ``eval/mean@n``, ``eval/maj@k``, ``eval/format``, ``eval/mean_length``, ...).

    ``engine``: the trainer's engine, reused when given (it runs ``model`` in place); otherwise a
    fresh :class:`grpo.rollout.engine.Engine` over ``model``. The model is put in eval mode for the
    generation and its training mode restored afterwards. Other arguments: see :func:`evaluate`.
    """
    if engine is None:
        from .build import build_engine

        engine = build_engine(model, tokenizer, seed=seed)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        result = evaluate(engine, tokenizer, rows, template=template, n=n, ks=ks, temperature=temperature,
                          top_p=top_p, max_tokens=max_tokens, seed=seed, grader=grader, breakdown_field=[],
                          stop=stop)
    finally:
        model.train(was_training)
    return {f"eval/{k}": float(v) for k, v in result.summary.items()}


# ----- output ---------------------------------------------------------------------------------------------
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.jsonl"


def write_eval(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``summary.json`` (config, summary, breakdown) and ``samples.jsonl`` (one record per
    completion) into ``out_dir`` (created if needed); return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, samples_path = out / SUMMARY_FILE, out / SAMPLES_FILE
    summary = {"config": result.config, "summary": result.summary, "breakdown": result.breakdown}
    summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with samples_path.open("w") as f:
        for record in result.samples:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return summary_path, samples_path


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float) and key in ("mean_length", "length"):
        return f"{value:.1f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _rate_keys(summary: Mapping[str, float]) -> list[str]:
    return [k for k in summary if k.startswith(("pass@", "mean@", "maj@"))] + ["format"]


def format_table(result: EvalResult) -> str:
    """Return a plain-text report: a header line with the settings, the summary metrics, then one table
    per breakdown field (problems and rate metrics per value)."""
    c, s = result.config, result.summary
    header = (
        f"benchmark {c.get('benchmark') or '(rows)'}: {s.get('num_problems', 0)} problems, n={c.get('n')}, "
        f"temperature {c.get('temperature')}, top_p {c.get('top_p')}, max_tokens {c.get('max_tokens')}, "
        f"template {c.get('template')}, grader {c.get('grader')}"
    )
    keys = [*_rate_keys(s), "mean_length", "clipped_ratio", "ungraded"]
    width = max(len(k) for k in keys) + 2
    lines = [header, f"{'metric':<{width}}value", *(f"{k:<{width}}{_cell(k, s[k])}" for k in keys if k in s)]
    for name, table in result.breakdown.items():
        rate = _rate_keys(s)
        first = max([len(name), *(len(v) for v in table)]) + 2
        cols = ["problems", *rate]
        lines += ["", f"by {name}", f"{name:<{first}}" + "".join(f"{col:>10}" for col in cols)]
        for value, m in table.items():
            cells = [str(m.get("num_problems", 0)), *(_cell(k, m[k]) if k in m else "-" for k in rate)]
            label = value if len(value) <= 40 else value[:37] + "..."
            lines.append(f"{label:<{first}}" + "".join(f"{cell:>10}" for cell in cells))
    return "\n".join(lines)


def resolve_model_dir(path: str | Path) -> Path:
    """Return the model directory of ``path``: itself when it holds ``config.json``, its ``model/``
    (a trainer checkpoint ``step-N``), or the newest checkpoint's model under a run directory.

    Raises:
        FileNotFoundError: none of these exists (the message says what was looked for).
    """
    from .checkpointing import latest_checkpoint

    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    if (p / "model" / "config.json").is_file():
        return p / "model"
    latest = latest_checkpoint(p) if p.is_dir() else None
    if latest is not None and (latest / "model" / "config.json").is_file():
        return latest / "model"
    raise FileNotFoundError(
        f"no checkpoint at {str(p)!r}: expected a model directory with config.json, a trainer checkpoint "
        f"(step-N/model/config.json) or a run directory with checkpoints/step-N"
    )


__all__ = [
    "BENCHMARK_FILES",
    "HUB_BENCHMARKS",
    "SAMPLE_FIELDS",
    "EvalResult",
    "Grader",
    "aggregate",
    "auto_grader_name",
    "benchmark_name",
    "check_sampling",
    "data_dirs",
    "encode_prompt",
    "evaluate",
    "evaluate_policy",
    "find_benchmark_file",
    "format_table",
    "grade_samples",
    "group_answers_many",
    "load_benchmark",
    "load_eval_rows",
    "majority_at_k",
    "majority_vote",
    "math_equivalent_many",
    "mean_at_n",
    "normalize_benchmark_rows",
    "parse_ks",
    "pass_at_k",
    "problem_metrics",
    "read_jsonl",
    "resolve_grader",
    "resolve_model_dir",
    "write_eval",
]
