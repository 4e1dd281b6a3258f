"""Synthetic reasoning tasks (addition, arithmetic, countdown, multiplication with a tool), generated offline and deterministic by seed.

Each row has ``prompt`` (the question), ``answer`` (the gold answer the ``accuracy`` / ``countdown``
rewards compare against) and ``reasoning`` (a correct step-by-step trace), so that
:func:`reference_completion` (``<think>{reasoning}</think><answer>{answer}</answer>``) is an ideal
completion for cold-start SFT. Every character is in the built-in character tokenizer's alphabet.
``reasoning_gym:<name>`` draws rows from the optional ``reasoning-gym`` package instead.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]
RowSampler = Callable[[random.Random], Row]

SPLITS = ("train", "test")
"""Splits a task can be drawn from; a problem belongs to one of them by a hash of its prompt."""
TEST_SHARE = 0.1
"""Share of all possible problems that belong to the ``test`` split (the rest are ``train``)."""
REASONING_GYM_PREFIX = "reasoning_gym:"
_MAX_DRAWS_PER_ROW = 50
_ARITHMETIC_OPS = "+-*"
_COUNTDOWN_OPS = "+-*/"


def _check_int(task: str, option: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"task {task!r}: option {option}={value!r} is not allowed; use an integer in [{low}, {high}]")
    return value


def _check_ops(task: str, ops: Any, allowed: str) -> str:
    if not isinstance(ops, str) or not ops or any(op not in allowed for op in ops):
        raise ValueError(
            f"task {task!r}: option ops={ops!r} is not allowed; use a non-empty string of operators from {allowed!r}"
        )
    return "".join(dict.fromkeys(ops))


# ----- addition -------------------------------------------------------------------------------------------
def addition_trace(a: int, b: int) -> str:
    """Return the column-by-column trace of ``a + b`` (non-negative), least significant digit first.

    Each column is ``x+y[+1]=s c<carry>``: ``47+85`` gives ``7+5=12 c1, 4+8+1=13 c1`` (the sum's digits
    are the last digit of each column read backwards, after the final carry: 132).
    """
    if a < 0 or b < 0:
        raise ValueError(f"addition_trace needs non-negative numbers, got {a} and {b}")
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}{'+1' if carry else ''}={total} c{total // 10}")
        carry = total // 10
    return ", ".join(steps)


def addition(digits: int = 2) -> RowSampler:
    """Add two ``digits``-digit numbers: prompt ``47+85``, answer ``132``, reasoning :func:`addition_trace`."""
    _check_int("addition", "digits", digits, 1, 18)
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1

    def sample(rng: random.Random) -> Row:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return {"prompt": f"{a}+{b}", "answer": str(a + b), "reasoning": addition_trace(a, b)}

    return sample


# ----- arithmetic -----------------------------------------------------------------------------------------
def arithmetic_trace(numbers: list[int], ops: list[str]) -> tuple[str, int]:
    """Evaluate ``numbers[0] ops[0] numbers[1] ...`` (``+ - *``, usual precedence) one operation a step.

    Returns the trace and the value: products first, left to right, then sums and differences, left
    to right; ``12+7*3-5`` gives ``7*3=21, 12+21=33, 33-5=28`` and 28.
    """
    if len(ops) != len(numbers) - 1 or any(op not in _ARITHMETIC_OPS for op in ops):
        raise ValueError(f"arithmetic_trace needs n numbers and n-1 operators from {_ARITHMETIC_OPS!r}")
    steps: list[str] = []
    terms, signs = [numbers[0]], []  # the expression with its products evaluated
    for op, number in zip(ops, numbers[1:]):
        if op == "*":
            product = terms[-1] * number
            steps.append(f"{terms[-1]}*{number}={product}")
            terms[-1] = product
        else:
            terms.append(number)
            signs.append(op)
    value = terms[0]
    for op, term in zip(signs, terms[1:]):
        result = value + term if op == "+" else value - term
        steps.append(f"{value}{op}{term}={result}")
        value = result
    return ", ".join(steps), value


def arithmetic(min_terms: int = 2, max_terms: int = 4, max_value: int = 20, ops: str = _ARITHMETIC_OPS) -> RowSampler:
    """Evaluate ``min_terms``-``max_terms`` numbers in [1, ``max_value``] joined by ``ops`` (``12+7*3-5``)."""
    _check_int("arithmetic", "min_terms", min_terms, 2, 8)
    _check_int("arithmetic", "max_terms", max_terms, min_terms, 8)
    _check_int("arithmetic", "max_value", max_value, 1, 10**6)
    ops = _check_ops("arithmetic", ops, _ARITHMETIC_OPS)

    def sample(rng: random.Random) -> Row:
        count = rng.randint(min_terms, max_terms)
        numbers = [rng.randint(1, max_value) for _ in range(count)]
        chosen = [rng.choice(ops) for _ in range(count - 1)]
        trace, value = arithmetic_trace(numbers, chosen)
        prompt = str(numbers[0]) + "".join(op + str(n) for op, n in zip(chosen, numbers[1:]))
        return {"prompt": prompt, "answer": str(value), "reasoning": trace}

    return sample


# ----- countdown ------------------------------------------------------------------------------------------
Node = int | tuple[str, "Node", "Node"]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _precedence(node: Node) -> int:
    return 3 if isinstance(node, int) else _PRECEDENCE[node[0]]


def render_expression(node: Node) -> str:
    """Write an expression tree with only the parentheses its value needs (``(25-5)*4+3``)."""
    if isinstance(node, int):
        return str(node)
    op, left, right = node
    lhs, rhs = render_expression(left), render_expression(right)
    if _precedence(left) < _PRECEDENCE[op]:
        lhs = f"({lhs})"
    if _precedence(right) < _PRECEDENCE[op] or (_precedence(right) == _PRECEDENCE[op] and op in "-/"):
        rhs = f"({rhs})"
    return f"{lhs}{op}{rhs}"


def _combine(a: int, op: str, b: int) -> int | None:
    """Return ``a op b`` if it is a positive integer, else None (no negatives or fractions on the way)."""
    if op == "+":
        return a + b
    if op == "*":
        return a * b
    if op == "-":
        return a - b if a > b else None
    return a // b if a % b == 0 else None


def countdown(count: int = 3, max_number: int = 20, max_target: int = 100, ops: str = _COUNTDOWN_OPS) -> RowSampler:
    """Reach a target from ``count`` numbers in [1, ``max_number``], each used once, with ``ops``.

    Instances are solvable by construction: two numbers of the pool are combined until one is left
    (every intermediate a positive integer), and the result, if in [1, ``max_target``], is the target.
    ``answer`` is that equation (``(25-5)*4+3``), ``reasoning`` its steps (``25-5=20, 20*4=80, 80+3=83``),
    ``numbers`` and ``target`` the columns the ``countdown`` reward reads.
    """
    _check_int("countdown", "count", count, 2, 6)
    _check_int("countdown", "max_number", max_number, 1, 1000)
    _check_int("countdown", "max_target", max_target, 1, 10**6)
    ops = _check_ops("countdown", ops, _COUNTDOWN_OPS)
    allowed = " ".join(ops)

    def attempt(rng: random.Random) -> Row | None:
        numbers = [rng.randint(1, max_number) for _ in range(count)]
        pool: list[tuple[int, Node]] = [(n, n) for n in numbers]
        steps = []
        while len(pool) > 1:
            a, left = pool.pop(rng.randrange(len(pool)))
            b, right = pool.pop(rng.randrange(len(pool)))
            options = [(op, r) for op in ops if (r := _combine(a, op, b)) is not None]
            if not options:
                return None
            op, result = rng.choice(options)
            steps.append(f"{a}{op}{b}={result}")
            pool.append((result, (op, left, right)))
        target, tree = pool[0]
        if not 1 <= target <= max_target:
            return None
        return {
            "prompt": f"Make {target} from {', '.join(map(str, numbers))} with {allowed}, each number once.",
            "answer": render_expression(tree),
            "reasoning": ", ".join(steps),
            "numbers": numbers,
            "target": target,
        }

    def sample(rng: random.Random) -> Row:
        for _ in range(10_000):
            row = attempt(rng)
            if row is not None:
                return row
        raise ValueError(
            f"task 'countdown': no instance reaches a target in [1, {max_target}] with count={count}, "
            f"max_number={max_number}, ops={ops!r}; raise max_target or allow more operators"
        )

    return sample


# ----- multiplication with a tool -------------------------------------------------------------------------
def python_tool_trace(code: str, output: str) -> str:
    """A call of the python tool in its tag syntax and the output it returns, exactly as an episode renders it
    (`grpo.tools.PYTHON_TAGS`): ``<python>{code}</python><output>{output}</output>``."""
    return f"<python>{code}</python><output>{output}</output>"


def multiplication(min_digits: int = 3, max_digits: int = 4, tool_share: float = 1.0) -> RowSampler:
    """Multiply two numbers of ``min_digits``-``max_digits`` digits (``123*4567``): too hard for a tiny model in
    its head, easy with the python tool. The reasoning of a ``tool_share`` of the rows calls the tool
    (:func:`python_tool_trace`); the others' is empty (the answer is stated outright)."""
    _check_int("multiplication", "min_digits", min_digits, 1, 9)
    _check_int("multiplication", "max_digits", max_digits, min_digits, 9)
    if not 0 <= tool_share <= 1:
        raise ValueError(f"task 'multiplication': option tool_share={tool_share!r} must be in [0, 1]")

    def number(rng: random.Random) -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def sample(rng: random.Random) -> Row:
        a, b = number(rng), number(rng)
        trace = python_tool_trace(f"print({a}*{b})", f"{a * b}\n") if rng.random() < tool_share else ""
        return {"prompt": f"{a}*{b}", "answer": str(a * b), "reasoning": trace}

    return sample


# ----- the registry ---------------------------------------------------------------------------------------
TASKS: dict[str, Callable[..., RowSampler]] = {
    "addition": addition,
    "arithmetic": arithmetic,
    "countdown": countdown,
    "multiplication": multiplication,
}
"""Built-in tasks: ``name -> factory(**options)``, the factory returning ``sample(rng) -> row``."""


def split_of(prompt: str) -> str:
    """Return the split (``train`` or ``test``) a problem belongs to: fixed by a hash of its prompt text."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 10_000
    return "test" if bucket < TEST_SHARE * 10_000 else "train"


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not allowed for a generated task; allowed: {', '.join(SPLITS)} or None")


def _task_names() -> str:
    return ", ".join(TASKS) + f", or {REASONING_GYM_PREFIX}<name> (needs the reasoning-gym package)"


def is_task(name: str) -> bool:
    """Return True if ``name`` names a built-in task or a ``reasoning_gym:<name>`` task."""
    return name in TASKS or name.startswith(REASONING_GYM_PREFIX)


def make_task(name: str, n: int, seed: int = 0, *, split: str | None = None, **options: Any) -> list[Row]:
    """Generate ``n`` rows of task ``name``; the same ``(name, n, seed, split, options)`` gives the same rows.

    Args:
        name: a key of :data:`TASKS` or ``reasoning_gym:<dataset>``.
        n: number of rows.
        seed: random seed; different seeds give different rows.
        split: ``train`` or ``test`` keeps only problems of that split (:func:`split_of`), so the two
            are disjoint whatever the seeds; None draws from all problems.
        options: the task's options (see its factory in :data:`TASKS`).

    Raises:
        ValueError: unknown task or option, a bad option value, or a problem space too small to give
            ``n`` rows of ``split``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"make_task: n={n!r} is not allowed; use an integer >= 0")
    _check_split(split)
    if name.startswith(REASONING_GYM_PREFIX):
        return _reasoning_gym_rows(name[len(REASONING_GYM_PREFIX) :], n, seed, split, options)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; allowed: {_task_names()}")
    factory = TASKS[name]
    allowed = list(inspect.signature(factory).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"task {name!r} has no option {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed) or '(none)'}"
        )
    sample = factory(**options)
    rng = random.Random(f"{name}:{seed}")
    rows: list[Row] = []
    for _ in range(_MAX_DRAWS_PER_ROW * n + 1000):
        if len(rows) == n:
            return rows
        row = sample(rng)
        if split is None or split_of(row["prompt"]) == split:
            rows.append({"task": name, **row})
    if len(rows) == n:
        return rows
    raise ValueError(
        f"task {name!r} with options {options} gave only {len(rows)} of {n} {split!r} rows: its problem space "
        "is too small for this split; use larger options or split=None"
    )


def reference_completion(row: Row) -> str:
    """Return the ideal completion of a generated row: ``<think>{reasoning}</think><answer>{answer}</answer>``."""
    missing = [c for c in ("reasoning", "answer") if c not in row]
    if missing:
        raise KeyError(f"row lacks column(s) {', '.join(missing)}; its columns are: {', '.join(map(str, row))}")
    return f"<think>{row['reasoning']}</think><answer>{row['answer']}</answer>"


# ----- reasoning-gym --------------------------------------------------------------------------------------
_RG_SKIPPED_METADATA = ("source_dataset", "source_index", "difficulty")


def _plain(value: Any) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(value, scalar) or (isinstance(value, list) and all(isinstance(v, scalar) for v in value))


def _reasoning_gym_rows(task: str, n: int, seed: int, split: str | None, options: dict[str, Any]) -> list[Row]:
    """Rows from ``reasoning_gym.create_dataset(task, seed=seed, **options)``.

    ``prompt`` is the question, ``answer`` the oracle answer, ``metadata`` the entry's metadata as JSON;
    plain metadata fields (numbers, lists of numbers, strings) are also copied as columns when their
    names are free, so ``reasoning_gym:countdown`` rows have the ``numbers`` and ``target`` columns.
    There is no ``reasoning`` column.
    """
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise ValueError(
            f"task {REASONING_GYM_PREFIX}{task} needs the reasoning-gym package (pip install reasoning-gym); "
            f"built-in tasks: {', '.join(TASKS)}"
        ) from exc
    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; allowed: {', '.join(sorted(DATASETS))}")
    size = n if split is None else _MAX_DRAWS_PER_ROW * n + 1000
    dataset = reasoning_gym.create_dataset(task, seed=seed, size=max(size, 1), **options)
    rows: list[Row] = []
    for i in range(size):
        if len(rows) == n:
            break
        entry = dataset[i]
        if split is not None and split_of(entry["question"]) != split:
            continue
        metadata = entry.get("metadata") or {}
        row: Row = {
            "task": REASONING_GYM_PREFIX + task,
            "prompt": entry["question"],
            "answer": None if entry["answer"] is None else str(entry["answer"]),
            "metadata": json.dumps(metadata, default=str, sort_keys=True),
        }
        for key, value in metadata.items():
            if key not in row and key not in _RG_SKIPPED_METADATA and _plain(value):
                row[key] = value
        rows.append(row)
    if len(rows) < n:
        raise ValueError(f"reasoning-gym task {task!r} gave only {len(rows)} of {n} {split!r} rows")
    return rows
