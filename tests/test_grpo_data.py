"""Data: synthetic tasks with correct answers and traces, prompt templates, loading rows, the prompt sampler."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

import rewards
from grpo.data import DataError, PromptSampler, check_columns, load_rows
from grpo.tasks import (
    TASKS,
    addition_trace,
    make_task,
    reference_completion,
    render_expression,
    split_of,
)
from grpo.templates import R1_ZERO, TEMPLATES, render_prompt, template_columns
from model.tokenizer import build_char_tokenizer

SHARED_DATA = Path("/work/shared/data")
REWARD_FOR = {"addition": "accuracy", "arithmetic": "accuracy", "countdown": "countdown"}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def task_rows():
    return {
        "addition": make_task("addition", 60, seed=1) + make_task("addition", 30, seed=2, digits=3),
        "arithmetic": make_task("arithmetic", 80, seed=1),
        "countdown": make_task("countdown", 60, seed=1) + make_task("countdown", 30, seed=2, count=4),
    }


# ----- tasks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_by_seed_and_differ_across_seeds(name):
    first, again, other = make_task(name, 20, seed=7), make_task(name, 20, seed=7), make_task(name, 20, seed=8)
    assert first == again
    assert [r["prompt"] for r in first] != [r["prompt"] for r in other]
    assert all({"task", "prompt", "answer", "reasoning"} <= set(r) for r in first)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_train_and_test_splits_are_disjoint_whatever_the_seeds(name):
    train = make_task(name, 200, seed=0, split="train")
    test = make_task(name, 40, seed=0, split="test")
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert all(split_of(r["prompt"]) == "test" for r in test)


def test_every_generated_answer_is_right(task_rows):
    # eval is used here only, as an independent check of the generator's arithmetic.
    for row in task_rows["addition"] + task_rows["arithmetic"]:
        assert re.fullmatch(r"[0-9+\-*]+", row["prompt"])
        assert int(row["answer"]) == eval(row["prompt"])
    for row in task_rows["countdown"]:
        assert eval(row["answer"]) == row["target"]
        assert sorted(int(t) for t in re.findall(r"\d+", row["answer"])) == sorted(row["numbers"])
        assert str(row["target"]) in row["prompt"] and all(str(n) in row["prompt"] for n in row["numbers"])


def test_every_reasoning_step_is_right(task_rows):
    for name, rows in task_rows.items():
        for row in rows:
            for step in row["reasoning"].split(", "):
                expression, value = step.split(" c")[0].split("=")
                assert eval(expression) == int(value), (name, row)


def test_addition_trace_goes_column_by_column_with_carries():
    assert addition_trace(47, 85) == "7+5=12 c1, 4+8+1=13 c1"
    assert addition_trace(403, 25) == "3+5=8 c0, 0+2=2 c0, 4+0=4 c0"


def test_expressions_get_only_the_parentheses_they_need():
    assert render_expression(("+", ("*", ("-", 25, 5), 4), 3)) == "(25-5)*4+3"
    assert render_expression(("-", 9, ("-", 5, 2))) == "9-(5-2)"
    assert render_expression(("/", 24, ("*", 2, 3))) == "24/(2*3)"
    assert render_expression(("+", 1, ("+", 2, 3))) == "1+2+3"


@pytest.mark.parametrize("name", sorted(REWARD_FOR))
def test_the_reference_completion_gets_full_marks_from_the_task_reward_and_format(name, task_rows):
    rows = task_rows[name]
    completions = [reference_completion(r) for r in rows]
    columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    prompts = [r["prompt"] for r in rows]
    for reward in (REWARD_FOR[name], "format"):
        assert rewards.get(reward)(prompts, completions, **columns) == [1.0] * len(rows), reward
    shifted = completions[1:] + completions[:1]  # another row's answer
    assert sum(rewards.get(REWARD_FOR[name])(prompts, shifted, **columns)) < len(rows) / 2


def test_every_character_is_in_the_char_tokenizer_vocabulary(task_rows, tokenizer):
    for rows in task_rows.values():
        for row in rows:
            for text in (row["prompt"], reference_completion(row)):
                ids = tokenizer(text, add_special_tokens=False).input_ids
                assert tokenizer.pad_token_id not in ids, text
                assert tokenizer.decode(ids) == text
    ids = tokenizer(reference_completion(task_rows["addition"][0]), add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<think>")  # the tags are single tokens


def test_bad_task_names_and_options_are_named_with_what_is_allowed():
    with pytest.raises(ValueError, match="unknown task 'additon'; allowed: addition, arithmetic, countdown"):
        make_task("additon", 3)
    with pytest.raises(ValueError, match="no option 'digit'; allowed: digits"):
        make_task("addition", 3, digit=3)
    with pytest.raises(ValueError, match=r"ops='\+/' is not allowed"):
        make_task("arithmetic", 3, ops="+/")
    with pytest.raises(ValueError, match="split 'dev' is not allowed"):
        make_task("addition", 3, split="dev")


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym is not installed")
def test_reasoning_gym_tasks_give_rows_the_rewards_can_read():
    rows = make_task("reasoning_gym:countdown", 4, seed=3)
    assert rows == make_task("reasoning_gym:countdown", 4, seed=3)
    assert all(isinstance(r["prompt"], str) and r["answer"] for r in rows)
    completions = [f"<think>x</think><answer>{r['answer']}</answer>" for r in rows]
    columns = {"numbers": [r["numbers"] for r in rows], "target": [r["target"] for r in rows]}
    assert rewards.get("countdown")([r["prompt"] for r in rows], completions, **columns) == [1.0] * 4
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'nope'; allowed: .*countdown"):
        make_task("reasoning_gym:nope", 1)


# ----- templates ------------------------------------------------------------------------------------------
def test_templates_render_the_question(tokenizer):
    row = {"prompt": "47+85", "answer": "132", "numbers": [1, 2]}
    assert render_prompt(row, "r1_zero").endswith("<answer> answer here </answer>. User: 47+85. Assistant:")
    assert render_prompt(row, "r1_zero") == R1_ZERO.format(prompt="47+85")
    assert render_prompt(row, "plain") == "47+85"
    assert render_prompt(row, "tiny") == "Q: 47+85\nA:"
    assert render_prompt(row, "chat", tokenizer) == "<bos>User: 47+85\nAssistant:"
    assert render_prompt(row, "Add {prompt} (uses {numbers})") == "Add 47+85 (uses [1, 2])"
    for name in TEMPLATES:
        ids = tokenizer(render_prompt(row, name, tokenizer), add_special_tokens=False).input_ids
        assert tokenizer.pad_token_id not in ids, name


def test_conversational_rows_use_the_chat_template(tokenizer):
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1"}]}
    assert render_prompt(row, "r1_zero", tokenizer) == "<bos>Be brief.\nUser: 1+1\nAssistant:"
    with pytest.raises(ValueError, match="no tokenizer was given"):
        render_prompt(row, "r1_zero")


def test_template_errors_name_the_missing_column_or_the_allowed_templates():
    with pytest.raises(KeyError, match="needs column\\(s\\) 'target'; the row's columns are: prompt"):
        render_prompt({"prompt": "x"}, "{prompt} to {target}")
    with pytest.raises(ValueError, match="unknown prompt template 'r1'; allowed: r1_zero, chat, plain, tiny"):
        render_prompt({"prompt": "x"}, "r1")
    with pytest.raises(ValueError, match="must be column names"):
        template_columns("{prompt.__class__}")
    with pytest.raises(ValueError, match="not a valid format string"):
        template_columns("{prompt")


# ----- loading --------------------------------------------------------------------------------------------
def test_load_rows_generates_built_in_tasks_with_options():
    rows = load_rows("addition", limit=5, seed=3, task_options={"digits": 3})
    assert rows == make_task("addition", 5, 3, split="train", digits=3)
    assert load_rows("countdown", split="test", limit=4) == make_task("countdown", 4, 0, split="test")
    with pytest.raises(DataError, match="no option 'digit'"):
        load_rows("addition", limit=2, task_options={"digit": 3})


def test_jsonl_files_load_with_field_map_and_limit(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(5)))
    rows = load_rows(str(path), field_map={"question": "prompt"}, limit=3)
    assert rows == [{"prompt": f"{i}+1", "answer": str(i + 1)} for i in range(3)]
    with pytest.raises(DataError, match="renames 'query' but .* has no such column; its columns are: question, answer"):
        load_rows(str(path), field_map={"query": "prompt"})
    with pytest.raises(DataError, match="rename onto 'answer'"):
        load_rows(str(path), field_map={"question": "answer"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="task_options .* apply to built-in tasks only"):
        load_rows(str(path), task_options={"digits": 2})


def test_hub_sources_fail_fast_and_clearly_when_the_hub_is_unreachable(monkeypatch):
    import grpo.data

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(grpo.data, "_hub_unreachable", lambda: "cannot connect to huggingface.co:443 (no route)")
    with pytest.raises(DataError, match="taken for a Hugging Face Hub dataset, but the Hub is unreachable"):
        load_rows("openai/gsm8k:main", split="test")
    with pytest.raises(DataError, match="not recognized; a source is a built-in task"):
        load_rows("not a source!")
    with pytest.raises(DataError, match="did you mean 'addition'"):
        load_rows("additon")


def test_missing_columns_are_listed_with_the_columns_present():
    rows = [{"question": "1+1", "answer": "2"}, {"question": "2+2"}]
    check_columns(rows, ["question"], "q.jsonl")
    with pytest.raises(DataError, match=r"lacks column\(s\): prompt, answer \(in 1 of 2 rows\); its columns are: question, answer"):
        check_columns(rows, ["prompt", "answer"], "q.jsonl")
    with pytest.raises(DataError, match="has no rows"):
        check_columns([], ["prompt"], "q.jsonl")


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_test.jsonl").exists(), reason="shared data /work/shared/data is absent")
def test_gsm8k_loads_with_a_field_map():
    rows = load_rows(str(SHARED_DATA / "gsm8k_test.jsonl"), field_map={"question": "prompt"}, limit=8)
    assert len(rows) == 8 and set(rows[0]) == {"prompt", "answer"}
    check_columns(rows, ["prompt", "answer"], "gsm8k")
    assert rows[0]["prompt"].startswith("Janet") and rows[0]["answer"].rstrip().endswith("#### 18")


# ----- sampling -------------------------------------------------------------------------------------------
def drain(sampler, steps):
    return [sampler.next_indices() for _ in range(steps)]


def test_the_sampler_is_deterministic_and_reshuffles_every_epoch():
    a, b = drain(PromptSampler(10, 4, seed=1), 6), drain(PromptSampler(10, 4, seed=1), 6)
    assert a == b and a != drain(PromptSampler(10, 4, seed=2), 6)
    for epoch in (a[0:2], a[2:4], a[4:6]):  # 2 batches an epoch: the 2 left-over rows are skipped
        seen = [i for batch in epoch for i in batch]
        assert len(set(seen)) == 8
    assert a[0:2] != a[2:4]
    rows = [{"prompt": str(i)} for i in range(10)]
    assert next(iter(PromptSampler(rows, 4, seed=1))) == [rows[i] for i in a[0]]


def test_a_resumed_sampler_continues_with_exactly_the_same_prompts():
    uninterrupted = drain(PromptSampler(11, 3, seed=5), 12)
    first = PromptSampler(11, 3, seed=5)
    head = drain(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(11, 3, seed=0)
    resumed.load_state_dict(state)
    assert head + drain(resumed, 7) == uninterrupted
    with pytest.raises(DataError, match="saved with prompts_per_step=3 but this sampler has prompts_per_step=4"):
        PromptSampler(11, 4).load_state_dict(state)


def test_ranks_get_disjoint_shares_that_cover_each_global_batch():
    world = [PromptSampler(20, 8, seed=3, rank=r, world_size=4) for r in range(4)]
    whole = PromptSampler(20, 8, seed=3)
    for _ in range(5):
        shares = [s.next_indices() for s in world]
        assert all(len(share) == 2 for share in shares)
        assert [i for share in shares for i in share] == whole.next_indices()
    with pytest.raises(DataError, match="prompts_per_step=6 is not divisible by world_size=4"):
        PromptSampler(20, 6, world_size=4)
    with pytest.raises(DataError, match="3 rows are fewer than prompts_per_step=4"):
        PromptSampler(3, 4)
