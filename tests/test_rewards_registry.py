"""The reward registry: built-in names, options, and users' own functions given as module or file paths."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rewards

BUILTINS = {
    "accuracy",
    "format",
    "tag_count",
    "gsm8k",
    "multiple_choice",
    "countdown",
    "cosine_length",
    "kimi_length",
    "overlong",
    "repetition",
    "language_consistency",
    "code",
}


def test_registry_lists_every_builtin_reward():
    assert set(rewards.names()) >= BUILTINS


def test_get_returns_the_same_named_function_every_time():
    fn = rewards.get("accuracy")
    assert fn is rewards.get("accuracy")
    assert fn.__name__ == "accuracy"
    assert rewards.get("math_accuracy") is fn
    assert callable(fn) and fn.__doc__


def test_unknown_reward_name_lists_what_exists_and_suggests_a_close_one():
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy' \(did you mean 'accuracy'") as info:
        rewards.get("acuracy")
    message = str(info.value)
    assert all(name in message for name in BUILTINS)
    assert "package.module:function" in message


def test_unknown_option_lists_the_options_the_reward_takes():
    with pytest.raises(ValueError, match="extract='auto'.*gold_column"):
        rewards.get("accuracy", mode="boxed")
    with pytest.raises(ValueError, match="allowed: auto"):
        rewards.get("accuracy", extract="first_box")


def test_options_change_the_built_reward():
    boxed = rewards.get("accuracy", extract="boxed")
    tagged = rewards.get("accuracy", extract="answer_tag")
    completion = "<think>x</think> \\boxed{4}"
    assert boxed(prompts=["q"], completions=[completion], answer=["4"]) == [1.0]
    assert tagged(prompts=["q"], completions=[completion], answer=["4"]) == [0.0]


def test_resolve_loads_a_users_function_from_a_module(tmp_path, monkeypatch):
    package = tmp_path / "my_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text(
        "def length_reward(prompts, completions, completion_ids=None, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = rewards.resolve("my_pkg.scoring:length_reward")
    assert fn(prompts=["q"], completions=["abc"]) == [3.0]


def test_resolve_loads_a_users_function_from_a_file_relative_to_a_base_dir(tmp_path):
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "mine.py").write_text(
        textwrap.dedent("""
        def make(bonus=0.0):
            def shout(prompts, completions, completion_ids=None, **kw):
                return [bonus + float(c.isupper()) for c in completions]
            return shout

        def plain(prompts, completions, **kw):
            return [1.0 for _ in completions]
    """)
    )
    assert rewards.resolve("extra/mine.py:plain", base_dir=tmp_path)(prompts=["q"], completions=["a"]) == [
        1.0
    ]
    built = rewards.resolve("extra/mine.py:make", {"bonus": 0.5}, base_dir=tmp_path)
    assert built(prompts=["q", "q"], completions=["HEY", "hey"]) == [1.5, 0.5]


def test_resolve_errors_say_what_is_missing_and_what_exists(tmp_path):
    (tmp_path / "mine.py").write_text("def real(prompts, completions, **kw):\n    return [0.0]\n")
    with pytest.raises(ValueError, match="has no attribute 'missing'.*real"):
        rewards.resolve(f"{tmp_path / 'mine.py'}:missing")
    with pytest.raises(ValueError, match="no file"):
        rewards.resolve("nowhere/none.py:fn")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg_xyz.mod' \(No module named"):
        rewards.resolve("no_such_pkg_xyz.mod:fn")


def test_rewards_imports_nothing_from_the_model_or_the_trainer():
    package = Path(rewards.__file__).parent
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            assert not any(m.split(".")[0] in ("model", "grpo", "torch") for m in modules), (
                path.name,
                modules,
            )
    probe = "import sys, rewards; rewards.names(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'grpo', 'torch')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
