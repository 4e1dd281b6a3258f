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
