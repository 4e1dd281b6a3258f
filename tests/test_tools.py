"""Tools: finding calls in a turn's text, the sandboxed python tool, user functions, and the pool that runs
a step's calls concurrently where a crashing, hanging or flooding tool returns text and never stops the run."""

import time

import pytest

from grpo.rollout.episodes import ToolCall
from grpo.tools import Toolbox, resolve_tool


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def crash() -> None:
    raise RuntimeError("the tool broke")


def hang(seconds: float = 60.0) -> str:
    time.sleep(seconds)
    return "woke up"


def flood() -> str:
    return "x" * 1_000_000


def test_a_fenced_python_call_is_found_only_once_complete():
    box = Toolbox(["python"])
    assert box.find_call("let me compute\n```python\nprint(6*7)\n") is None
    call = box.find_call("let me compute\n```python\nprint(6*7)\n```")
    assert call == ToolCall("python", "print(6*7)\n")


def test_the_python_tool_runs_in_the_sandbox_and_renders_an_output_fence():
    box = Toolbox(["python"], timeout_s=5)
    ok, bad = box.run([ToolCall("python", "print(123 * 4567)"), ToolCall("python", "1/0")])
    assert (ok.output, ok.error) == ("561741\n", False)
    assert bad.error and "ZeroDivisionError" in bad.output
    assert box.render(ToolCall("python", ""), ok) == "```output\n561741\n```\n"


def test_user_functions_are_called_with_their_json_arguments():
    box = Toolbox([multiply])
    call = box.find_call('<tool_call>{"name": "multiply", "arguments": {"a": 123, "b": 45}}</tool_call>')
    assert call == ToolCall("multiply", {"a": 123, "b": 45})
    (result,) = box.run([call])
    assert result.output == "5535" and not result.error
    assert box.render(call, result) == "<tool_response>\n5535\n</tool_response>\n"
    assert resolve_tool("tests.test_tools:multiply").name == "multiply"


def test_malformed_and_unknown_calls_run_as_their_error():
    box = Toolbox([multiply])
    bad_json, unknown = box.find_call("<tool_call>{oops</tool_call>"), box.find_call(
        '<tool_call>{"name": "divide", "arguments": {}}</tool_call>')
    results = box.run([bad_json, unknown, ToolCall("multiply", {"a": 1})])
    assert all(r.error for r in results)
    assert "malformed tool call" in results[0].output and "unknown tool 'divide'" in results[1].output
    assert "TypeError" in results[2].output


def test_crashing_hanging_and_flooding_tools_return_text_and_the_rest_still_run():
    box = Toolbox([multiply, crash, hang, flood], max_workers=4, timeout_s=0.5, max_output_chars=100)
    started = time.perf_counter()
    results = box.run([ToolCall("crash", {}), ToolCall("hang", {}), ToolCall("flood", {}),
                       ToolCall("multiply", {"a": 6, "b": 7})])
    assert time.perf_counter() - started < 2.0
    assert results[0].error and "RuntimeError: the tool broke" in results[0].output
    assert results[1].error and "TimeoutError" in results[1].output
    assert len(results[2].output) < 200 and "999900 more characters" in results[2].output
    assert results[3].output == "42" and not results[3].error


def test_calls_run_concurrently_within_the_worker_bound():
    box = Toolbox([hang], max_workers=4, timeout_s=5)
    started = time.perf_counter()
    results = box.run([ToolCall("hang", {"seconds": 0.3}) for _ in range(8)])
    took = time.perf_counter() - started
    assert [r.output for r in results] == ["woke up"] * 8
    assert 0.55 < took < 1.5  # two waves of four, not eight in a row nor all at once


def test_a_hung_call_frees_its_worker_slot_at_its_timeout():
    box = Toolbox([hang], max_workers=1, timeout_s=0.3)
    started = time.perf_counter()
    results = box.run([ToolCall("hang", {}), ToolCall("hang", {"seconds": 0.0})])
    assert results[0].error and results[1].output == "woke up"
    assert time.perf_counter() - started < 1.5


def test_a_python_tool_that_hangs_or_floods_is_killed_or_cut():
    box = Toolbox(["python"], timeout_s=1.0, max_output_chars=50)
    hung, flooded = box.run([ToolCall("python", "while True: pass"),
                             ToolCall("python", "print('y' * 100000)")])
    assert hung.error and "TimeoutError" in hung.output
    assert not flooded.error and flooded.output.startswith("y" * 50) and "more characters" in flooded.output


def test_unknown_tool_names_are_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match="registered: python"):
        Toolbox(["pythn"])


def test_the_malformed_call_penalty_counts_unreadable_calls_from_the_tool_calls_column():
    import rewards

    reward = rewards.get("malformed_tool_calls", penalty=-0.5)
    calls = [[{"malformed": True}, {"malformed": False}, {"malformed": True}], [], None]
    assert reward(["p"] * 3, ["a", "b", "c"], tool_calls=calls) == [-1.0, 0.0, 0.0]


def test_tool_options_reach_the_registered_factory():
    box = Toolbox(["python"], options={"python": {"syntax": "tags"}})
    assert box.find_call("<python>print(1)</python>") == ToolCall("python", "print(1)")
    with pytest.raises(ValueError, match="not among its tools"):
        Toolbox(["python"], options={"calc": {}})


def test_a_written_episode_splits_into_policy_text_and_tool_outputs():
    from grpo.tools import PYTHON_FENCE, PYTHON_TAGS, split_tool_output

    text = "<think><python>print(2*3)</python><output>6\n</output>so</think><answer>6</answer>"
    assert split_tool_output(text, [PYTHON_TAGS, PYTHON_FENCE]) == [
        (False, "<think><python>print(2*3)</python>"), (True, "<output>6\n</output>"),
        (False, "so</think><answer>6</answer>")]
    assert split_tool_output("no call", [PYTHON_TAGS]) == [(False, "no call")]


def test_calls_in_reads_every_call_of_an_episode_and_skips_their_output():
    box = Toolbox(["python", multiply], options={"python": {"syntax": "tags"}})
    text = ("<think><python>print(2*3)</python><output><python>not a call</python>\n</output>"
            '<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 5}}</tool_call>'
            "<tool_response>\n10\n</tool_response>\n<tool_call>{oops</tool_call>"
            "<python>print(1)</python>"  # complete: counted even with no output after it (the last turn)
            "<python>print(</think>")  # never closed: not a call
    calls = box.calls_in(text)
    assert [c.name for c in calls] == ["python", "multiply", "?", "python"]
    assert calls[0].arguments == "print(2*3)" and calls[1].arguments == {"a": 2, "b": 5}
    assert calls[2].error is not None and calls[3].arguments == "print(1)"
    (columns,) = box.call_columns([text])["tool_calls"]
    assert [c["malformed"] for c in columns] == [False, False, True, False]
    assert box.call_columns(["no calls here"]) == {"tool_calls": [[]]}
