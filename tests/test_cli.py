"""The `grpo` command line."""

import subprocess
import sys

from grpo.cli import main
from model import load_pretrained
from model.tokenizer import load_tokenizer


def test_new_model_writes_a_checkpoint_and_tokenizer_that_load(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["new-model", "--preset", "micro", "--out", str(out), "--mtp", "1"]) == 0
    model, tok = load_pretrained(out), load_tokenizer(out)
    assert model.config.vocab_size == len(tok) and len(model.mtp) == 1
    assert main(["info", str(out)]) == 0
    assert "latent KV cache" in capsys.readouterr().out


def test_new_model_refuses_a_non_empty_directory(tmp_path, capsys):
    (tmp_path / "x").write_text("keep me")
    assert main(["new-model", "--preset", "micro", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x").read_text() == "keep me"


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    assert main(["new-model", "--preset", "huge", "--out", str(tmp_path / "m")]) == 2
    assert "unknown model preset 'huge'" in capsys.readouterr().err


def test_console_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "grpo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "new-model" in result.stdout


def test_plot_command_writes_pngs(tmp_path, capsys):
    import json

    lines = [{"step": i, "reward": i / 10, "completions/mean_length": 10 + i} for i in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert main(["plot", str(tmp_path)]) == 0
    assert list((tmp_path / "plots").glob("*.png"))


def test_check_rewards_passes_a_sound_recipe_and_flags_a_broken_one(tmp_path, capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "ci_tiny.yaml"
    assert main(["check-rewards", str(recipe), "--n", "20"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "format" in out
    (tmp_path / "bad.py").write_text("def never(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    assert main(["check-rewards", str(recipe), f"rewards=[{{name: '{tmp_path / 'bad.py'}:never'}}]", "--n", "20"]) == 1
    assert "never: only 0/20 gold answers get full marks" in capsys.readouterr().out


def test_generate_samples_from_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["new-model", "--preset", "micro", "--out", str(out)]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "12+30=", "--n", "2", "--max-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- '12+30='") == 2
