"""Property-based tests: no input crashes the answer parsers or makes them slower than their timeout."""

import time
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.choice import extract_choice, gold_letter
from rewards.code import _split_assert, extract_code, parse_tests
from rewards.countdown import ExpressionError, check_equation, evaluate
from rewards.extract import EXTRACT_MODES, extract_answers, find_boxed, gold_answer_text
from rewards.format import is_r1_format, tag_count_score
from rewards.math import grade_many
from rewards.numeric import last_number, parse_number, predicted_numbers
from rewards.shaping import language_share, reasoning_text, repetition_penalty

PARSER_TIMEOUT = timedelta(milliseconds=500)
PIECES = [
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "\\boxed{",
    "\\boxed ",
    "\\fbox{",
    "{",
    "}",
    "\\{",
    "\\",
    "####",
    "$",
    "\\(",
    "\\)",
    " ",
    "\n",
    "```python\n",
    "```",
    "1",
    "23",
    "-",
    "+",
    "*",
    "/",
    "**",
    "^",
    "(",
    ")",
    "=",
    ".",
    ",",
    "x",
    "A",
    "(B)",
    "answer is ",
    "\\frac{1}{2}",
    "9" * 40,
    "我",
    "é",
]
texts = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(PIECES), max_size=80).map("".join),
    st.lists(st.sampled_from(PIECES), max_size=8).map(lambda parts: "".join(parts) * 500),  # long, repetitive
)
fast = settings(
    max_examples=150, deadline=PARSER_TIMEOUT, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@fast
@given(texts)
def test_answer_extraction_never_crashes_and_returns_strings(text):
    for mode in EXTRACT_MODES:
        answers = extract_answers(text, mode)
        assert all(isinstance(a, str) and a for a in answers)
    assert all(isinstance(b, str) for b in find_boxed(text))
    gold = gold_answer_text(text)
    assert gold is None or isinstance(gold, str)


@fast
@given(texts)
def test_format_checks_never_crash(text):
    assert isinstance(is_r1_format(text), bool)
    assert is_r1_format(text, think_in_prompt=True) in (True, False)
    assert tag_count_score(text) in (0.0, 0.25, 0.5, 0.75, 1.0)


@fast
@given(texts)
def test_countdown_parser_only_ever_refuses_with_an_expression_error(text):
    try:
        value, literals = evaluate(text)
    except ExpressionError:
        return
    assert all(0 <= n < 10**6 for n in literals)
    assert isinstance(check_equation(text, literals, value), bool)


@fast
@given(texts)
def test_numeric_choice_code_and_shaping_parsers_never_crash(text):
    parse_number(text)
    last_number(text)
    for mode in ("auto", "last_number"):
        predicted_numbers(text, mode)
    extract_choice(text)
    gold_letter(text)
    extract_code(text)
    _split_assert(text)
    try:
        parse_tests(text)
    except ValueError:
        pass
    share = language_share(reasoning_text(text), "en")
    assert share is None or 0.0 <= share <= 1.0
    assert -1.0 <= repetition_penalty(text) <= 0.0


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(PIECES[13:]), min_size=1, max_size=12).map("".join),
    st.sampled_from(["\\frac{1}{2}", "x^2", "[1,2)", "7"]),
)
def test_math_grading_never_crashes_and_respects_its_timeout(answer, gold):
    start = time.monotonic()
    (result,) = grade_many([[answer]], [gold], timeout=1)
    assert result in (True, False)
    assert time.monotonic() - start < 2 * 1 + 1 + 2  # the worker's hard deadline, plus slack
