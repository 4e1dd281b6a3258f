"""Evaluation: the pass@k / maj@k estimators, benchmark loading and grading of every shared benchmark file,
evaluate() on scripted completions, and `grpo eval` end to end on a tiny checkpoint."""

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from grpo.benchmarks import SHARED_DATA_DIR, load_benchmark, load_eval_rows
from grpo.cli import main
from grpo.data import load_rows
from grpo.estimators import majority_at_k, mean_at_n, pass_at_k
from grpo.evaluation import (
    SAMPLE_FIELDS,
    check_sampling,
    evaluate,
    evaluate_policy,
    format_table,
    parse_ks,
    write_eval,
)
from grpo.grading import grade_samples
from grpo.rollout.outputs import Completion, RequestOutput
from grpo.templates import encode_prompt
from model import build_model
from model.presets import preset_config
from model.tokenizer import build_char_tokenizer
from rewards.check import ideal_completion


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model decodes faster on one thread than on two cores shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- estimators -----------------------------------------------------------------------------------------
def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The share of all k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_closed_form_and_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                got = pass_at_k(n, c, k)
                assert got == pytest.approx(float(closed), abs=1e-12), (n, c, k)
                assert got == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_stability():
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(4, 1, 1) == mean_at_n(4, 1) == 0.25
    # Large n: the product form stays finite where C(n, k) has hundreds of digits.
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)
    for bad in [(0, 0, 1), (4, 5, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError, match="not allowed"):
            pass_at_k(*bad)


def test_majority_groups_equivalent_answers_written_differently():
    answers = ["3", "3", "1/2", "0.5", "\\frac{1}{2}"]
    correct = [False, False, True, True, True]
    assert majority_at_k(answers, correct, 5)  # one group of three beats "3" twice
    assert not majority_at_k(answers, correct, 5, equivalent=lambda a, b: False)  # by string, "3" wins
    assert not majority_at_k(answers, correct, 2)  # first k samples only
    assert not majority_at_k(answers, correct, 4)  # "3" x2 vs 1/2 x2: the tie goes to the earliest group


def test_majority_abstentions_and_errors():
    assert majority_at_k([None, None, "0.5"], [False, False, True], 3)
    assert not majority_at_k([None, None], [False, False], 2)
    assert majority_at_k([" 1 / 2", "1/2", "7"], [True, True, False], 3, equivalent=lambda a, b: False)
    with pytest.raises(ValueError, match="k=4"):
        majority_at_k(["1", "2", "3"], [True, False, False], 4)
    with pytest.raises(ValueError, match="correctness flags"):
        majority_at_k(["1"], [True, False], 1)


def test_batched_grouping_agrees_with_majority_at_k_and_a_naive_vote():
    import random

    from grpo.estimators import group_answers_many, majority_vote

    def same_value(a, b):
        return Fraction(a) == Fraction(b)

    rng = random.Random(0)
    pool = ["1/2", "0.5", "2/4", "3", "6/2", "7", None]
    for _ in range(300):
        n = rng.randint(1, 8)
        answers = [rng.choice(pool) for _ in range(n)]
        correct = [a is not None and Fraction(a) == Fraction(1, 2) for a in answers]
        groups = group_answers_many([answers], lambda pairs: [same_value(a, b) for a, b in pairs])[0]
        for k in range(1, n + 1):
            values = [Fraction(a) for a in answers[:k] if a is not None]
            naive = bool(values) and max(values, key=lambda v: (values.count(v), -values.index(v))) == Fraction(1, 2)
            assert majority_at_k(answers, correct, k, equivalent=same_value) == naive, (answers, k)
            assert majority_vote(groups, correct, k) == naive, (answers, k)


def test_sampling_settings_are_checked():
    assert check_sampling(4, None, 0.6) == [1, 4]
    assert parse_ks("8,1, 8") == [1, 8]
    with pytest.raises(ValueError, match="greedy"):
        check_sampling(2, None, 0.0)
    with pytest.raises(ValueError, match=r"each k must be in \[1, 4\]"):
        check_sampling(4, [1, 8], 1.0)
    with pytest.raises(ValueError, match="comma-separated positive integers"):
        parse_ks("1,x")


# ----- benchmarks -----------------------------------------------------------------------------------------
BENCHMARK_FILES = [
    ("gsm8k_test.jsonl", None),
    ("gsm8k_train.jsonl", 1000),
    ("math500.jsonl", None),
    ("aime24.jsonl", None),
    ("amc23.jsonl", None),
]


@pytest.mark.parametrize(("filename", "limit"), BENCHMARK_FILES)
def test_every_shared_benchmark_loads_and_its_gold_answers_grade_correct(filename, limit):
    path = SHARED_DATA_DIR / filename
    if not path.is_file():
        pytest.skip(f"{path} is absent (shared benchmark files are optional)")
    rows = load_benchmark(str(path), limit=limit)
    assert len(rows) == (limit or sum(1 for _ in path.open()))
    assert all(isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["answer"], str) for r in rows)
    assert all("####" not in r["answer"] for r in rows)
    # The gold answer as an ideal R1 completion, graded by the path evaluate() takes.
    completions = [ideal_completion(r) for r in rows]
    assert completions[0].startswith("<think>") and completions[0].endswith("</answer>")
    grades = grade_samples(rows, completions)
    wrong = [(i, rows[i]["answer"], g) for i, g in enumerate(grades) if not (g["correct"] and g["format_ok"])]
    assert not wrong, f"{len(wrong)} gold answers of {filename} not graded correct, e.g. {wrong[:3]}"


def test_benchmark_layouts_are_detected(tmp_path, monkeypatch):
    gsm = SHARED_DATA_DIR / "gsm8k_test.jsonl"
    if gsm.is_file():
        row = load_benchmark(str(gsm), limit=1)[0]
        assert row["answer"] == "18" and row["solution"].endswith("#### 18") and "question" not in row
    math500 = SHARED_DATA_DIR / "math500.jsonl"
    if math500.is_file():
        row = load_benchmark(str(math500), limit=1)[0]
        assert {"prompt", "answer", "level", "subject", "solution"} <= set(row)
    # Named benchmarks resolve to the shared files, or first to files in $GRPO_DATA_DIR.
    monkeypatch.delenv("GRPO_DATA_DIR", raising=False)
    for name, filename in [("gsm8k", "gsm8k_test.jsonl"), ("math500", "math500.jsonl"), ("aime24", "aime24.jsonl")]:
        if (SHARED_DATA_DIR / filename).is_file():
            assert load_benchmark(name, limit=2) == load_benchmark(str(SHARED_DATA_DIR / filename), limit=2)
    # A named benchmark found in $GRPO_DATA_DIR; a field map for an unknown layout.
    (tmp_path / "mine.jsonl").write_text(json.dumps({"query": "1+1?", "label": 2, "level": 1}) + "\n")
    monkeypatch.setenv("GRPO_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="has no answer column"):
        load_benchmark("mine")
    rows = load_benchmark("mine", field_map={"query": "prompt", "label": "answer"})
    assert rows == [{"prompt": "1+1?", "answer": "2", "level": 1}]
    with pytest.raises(ValueError, match="unknown benchmark 'nonesuch'"):
        load_benchmark("nonesuch")
    tasks = load_benchmark("countdown", limit=3)
    assert len(tasks) == 3 and all({"prompt", "answer", "numbers", "target"} <= set(r) for r in tasks)
    assert tasks == load_benchmark("countdown", limit=3)  # fixed seed


def test_training_eval_rows_come_from_the_test_split_or_a_named_benchmark(tmp_path, monkeypatch):
    from grpo.config import DataSection

    # No eval_source: the training source's test split, with its task options and field map.
    d = DataSection(source="addition", task_options={"digits": 3}, eval_limit=5)
    rows = load_eval_rows(d, seed=1)
    assert rows == load_rows("addition", split="test", limit=5, seed=1, task_options={"digits": 3})
    # An eval_source is a benchmark: a GSM8K-layout file in $GRPO_DATA_DIR, question and "#### N" normalized.
    line = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    (tmp_path / "gsm8k_test.jsonl").write_text(json.dumps(line) + "\n")
    monkeypatch.setenv("GRPO_DATA_DIR", str(tmp_path))
    d = DataSection(source="train.jsonl", field_map={"question": "prompt"}, eval_source="gsm8k", eval_limit=5)
    assert load_eval_rows(d) == [{"prompt": line["question"], "answer": "7", "solution": line["answer"]}]


def test_countdown_rows_are_graded_by_the_countdown_reward():
    rows = load_benchmark("countdown", limit=4)
    grades = grade_samples(rows, [ideal_completion(r) for r in rows])
    assert all(g["correct"] for g in grades)
    wrong = grade_samples(rows[:1], ["<think>x</think><answer>1+1</answer>"])[0]
    assert not wrong["correct"] and wrong["format_ok"] and wrong["answer"] == "1+1"


def test_a_hedged_completion_has_no_answer_and_is_wrong():
    rows = [{"prompt": "1+1", "answer": "2"}] * 2
    hedge, plain = "<think>a</think><answer>\\boxed{2} or \\boxed{3}</answer>", "<think>a</think><answer>2</answer>"
    graded = grade_samples(rows, [hedge, plain])
    assert graded[0] == {"answer": None, "correct": False, "score": 0.0, "format_ok": True}
    assert graded[1] == {"answer": "2", "correct": True, "score": 1.0, "format_ok": True}


# ----- evaluate on scripted completions ------------------------------------------------------------------
class ScriptedEngine:
    """Returns fixed completion texts per prompt, in order, as the engine would."""

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts, self.calls = tokenizer, scripts, []

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append((prompts, params))
        return [
            RequestOutput(list(p), [Completion(self.tokenizer(t, add_special_tokens=False).input_ids, [],
                                               "stop" if t.endswith("</answer>") else "length") for t in texts])
            for p, texts in zip(prompts, self.scripts)
        ]


def test_evaluate_metrics_on_scripted_completions(tmp_path):
    tok = build_char_tokenizer()
    rows = [
        {"prompt": "1+1", "answer": "2", "level": 1},
        {"prompt": "half of 1", "answer": "1/2", "level": 2},
        {"prompt": "3*3", "answer": "9", "level": 2},
    ]
    r1 = "<think>ok</think><answer>{}</answer>"
    scripts = [
        [r1.format(2), r1.format(3), r1.format(2), "no tags 2"],
        [r1.format("0.5"), r1.format("1/2"), r1.format(7), r1.format(7)],  # maj groups 0.5 with 1/2
        [r1.format(8), r1.format(8), r1.format(9), "junk"],
    ]
    engine = ScriptedEngine(tok, scripts)
    result = evaluate(engine, tok, rows, template="tiny", n=4, ks=[1, 2, 4], temperature=0.7, max_tokens=32,
                      seed=3, benchmark="scripted")
    s = result.summary
    cs = [2, 2, 1]
    assert s["pass@1"] == pytest.approx(sum(c / 4 for c in cs) / 3) == pytest.approx(s["mean@4"])
    assert s["pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in cs) / 3)
    assert s["pass@4"] == 1.0
    assert s["maj@4"] == pytest.approx(2 / 3)  # 2 wins; 0.5~1/2 ties 7 and comes first; 8 wins
    assert s["format"] == pytest.approx(10 / 12)
    assert s["num_problems"] == 3 and s["num_samples"] == 12 and s["ungraded"] == 0
    assert result.breakdown["level"]["2"]["num_problems"] == 2
    assert result.breakdown["level"]["1"]["mean@4"] == 0.5
    assert len(result.samples) == 12
    assert all(list(r)[: len(SAMPLE_FIELDS)] == list(SAMPLE_FIELDS) for r in result.samples)
    first = result.samples[0]
    assert first["prompt"] == "Q: 1+1\nA:" and first["answer"] == "2" and first["correct"] and first["format_ok"]
    assert first["level"] == 1 and first["length"] == len(tok(scripts[0][0], add_special_tokens=False).input_ids)
    prompts, params = engine.calls[0]
    assert prompts[0] == encode_prompt(tok, "Q: 1+1\nA:", "tiny") and prompts[0][0] == tok.bos_token_id
    assert len({p.seed for p in params}) == 3 and all(p.n == 4 and p.temperature == 0.7 for p in params)
    table = format_table(result)
    assert "maj@4" in table and "by level" in table
    summary_path, samples_path = write_eval(result, tmp_path / "out")
    assert json.loads(summary_path.read_text())["summary"]["pass@4"] == 1.0
    assert len(samples_path.read_text().splitlines()) == 12


# ----- a real checkpoint --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "ckpt"
    tok = build_char_tokenizer()
    model = build_model(preset_config("micro", vocab_size=len(tok)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_grpo_eval_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_checkpoint), "--benchmark", "addition", "--limit", "8", "--n", "2",
            "--k", "1,2", "--temperature", "1.0", "--max-tokens", "16", "--template", "tiny", "--output", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    for metric in ("pass@1", "pass@2", "mean@2", "maj@2", "format", "mean_length"):
        assert metric in stdout
    assert "benchmark addition: 8 problems, n=2" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["n"] == 2 and summary["config"]["grader"] == "accuracy"
    assert summary["summary"]["num_problems"] == 8 and 0 <= summary["summary"]["pass@2"] <= 1
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all(set(SAMPLE_FIELDS) <= set(s) for s in samples)
    assert all(1 <= s["length"] <= 16 and s["prompt"].startswith("Q: ") for s in samples)
    assert [(s["problem"], s["sample"]) for s in samples] == [(i, k) for i in range(8) for k in range(2)]
    # Same seed, same completions; greedy with n > 1 is refused before anything loads.
    assert main(argv + ["--output", str(tmp_path / "again")]) == 0
    again = [json.loads(line) for line in (tmp_path / "again" / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in again] == [s["completion"] for s in samples]
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_checkpoint), "--benchmark", "addition", "--n", "2"]) == 2
    assert "greedy" in capsys.readouterr().err


def test_evaluate_policy_returns_eval_metrics_and_keeps_training_mode(tiny_checkpoint):
    from model import load_pretrained
    from model.tokenizer import load_tokenizer

    model, tok = load_pretrained(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    model.train()
    rows = load_benchmark("addition", limit=3)
    metrics = evaluate_policy(model, tok, rows, "tiny", max_tokens=8)
    assert {"eval/pass@1", "eval/mean@1", "eval/format", "eval/mean_length"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values()) and model.training
