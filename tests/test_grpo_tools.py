"""GRPO with tool episodes: the trainer sees exactly the engine's tokens, tool tokens get no loss and no KL,
the step logs tool metrics and the rewards see the whole episode and its calls."""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grpo.config import RecipeError, load_recipe
from grpo.losses import policy_loss
from grpo.rollout.episodes import ToolCall
from grpo.tools import Toolbox
from grpo.trainer import GRPOTrainer

CALLS_REWARD = '''
def calls(prompts, completions, completion_ids=None, tool_calls=None, **kw):
    """1 per call whose output the episode's text shows."""
    return [sum(f"={c['output'].strip()};" in text for c in calls) for text, calls in zip(completions, tool_calls)]
'''

# A chat template that, like R1's, drops earlier assistant turns' reasoning: re-rendering a conversation
# would change earlier tokens; an episode never re-renders.
R1_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
    "{% else %}{{ '<|assistant|>' + m['content'].split('</think>')[-1] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|><think>' }}{% endif %}"
)


def build_bpe_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer with a chat template, trained here on a few lines (nothing downloaded)."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["12+34=46 then 123*45=5535;", "print(6 * 11) = 66; the answer is 5535"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|bos|>", eos_token="<|eos|>",
                                  unk_token="<unk>", pad_token="<unk>")
    tok.chat_template = R1_LIKE_TEMPLATE
    tok.save_pretrained(directory)
    return directory


class EveryN(Toolbox):
    """The sandboxed python tool, called whenever a turn holds n characters (a random policy writes no fences):
    the call prints the turn's length times 11, shown as '=<value>;'."""

    def __init__(self, n: int):
        super().__init__(["python"], timeout_s=5)
        self.n = n

    def find_call(self, text):
        return ToolCall("python", f"print({len(text)} * 11)") if len(text) >= self.n else None

    def render(self, call, result):
        return f"={result.output.strip()};"


def tool_trainer(micro_recipe, tmp_path, n=4, overlap=False, **sections):
    (tmp_path / "calls_reward.py").write_text(CALLS_REWARD)
    recipe = load_recipe(micro_recipe(
        rewards=[{"name": f"{tmp_path / 'calls_reward.py'}:calls"}],
        sampling={"num_generations": 4, "max_completion_length": 24},
        tools={"names": ["python"], "max_tool_calls": 2, "overlap": overlap}, **sections))
    trainer = GRPOTrainer(recipe)
    trainer.toolbox = EveryN(n)
    seen = []
    generate = trainer.engine.generate

    def spy(*args, **kwargs):
        outputs = generate(*args, **kwargs)
        seen.append(outputs)
        return outputs

    trainer.engine.generate = spy
    return trainer, seen


@pytest.mark.parametrize("tokenizer", ["char", "chat-bpe"])
def test_trained_tokens_equal_the_engines_tokens_turn_by_turn(micro_recipe, tmp_path, tokenizer):
    sections = {}
    if tokenizer == "chat-bpe":
        sections = {"model": {"preset": "micro", "tokenizer": str(build_bpe_tokenizer(tmp_path / "tok"))},
                    "data": {"source": "addition", "template": "chat", "limit": 64}}
    trainer, seen = tool_trainer(micro_recipe, tmp_path, **sections)
    ro = trainer.rollout([0, 1])
    engine_completions = [c for o in seen[0] for c in o.completions]
    assert sum(ro.tool_calls) > 0
    for j, c in enumerate(engine_completions):
        assert ro.completion_ids[j] == c.token_ids == [t for _, ids in c.turns for t in ids]
        assert ro.prompt_ids[j] == seen[0][j // 4].prompt_token_ids
        b = ro.micro_batch([j])
        P, C = len(ro.prompt_ids[j]), len(c.token_ids)
        assert b["ids"][0, :P + C].tolist() == ro.prompt_ids[j] + c.token_ids
        assert b["targets"][0, :C].tolist() == c.token_ids
        at = 0
        for kind, ids in c.turns:  # turn by turn: policy turns trained, tool turns masked
            assert b["mask"][0, at:at + len(ids)].tolist() == [kind == "policy"] * len(ids)
            at += len(ids)
        assert ro.texts[j] == trainer.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_a_conversational_dataset_is_rendered_once_and_later_turns_are_appended_as_tokens(micro_recipe, tmp_path):
    """Rows whose prompt is a list of messages: the chat template renders the first turn once (the prompt ids
    the trainer sees are its tokens), every later turn (the tool's output) is appended as tokens, never a
    re-rendered conversation."""
    import json

    from transformers import AutoTokenizer

    tok_dir = build_bpe_tokenizer(tmp_path / "tok")
    conversations = [[{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": "<think>x</think>ok"},
                      {"role": "user", "content": f"and {a}*{b}?"}] for a, b in [(12, 34), (5, 66), (7, 8), (40, 2)]]
    rows = tmp_path / "chats.jsonl"
    rows.write_text("\n".join(json.dumps({"prompt": c, "answer": "0"}) for c in conversations))
    trainer, seen = tool_trainer(micro_recipe, tmp_path, model={"preset": "micro", "tokenizer": str(tok_dir)},
                                 data={"source": str(rows)})
    ro = trainer.rollout([0, 1])
    tok = AutoTokenizer.from_pretrained(tok_dir)
    rendered = {tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations}
    assert sum(ro.tool_calls) > 0
    for j, c in enumerate(c for o in seen[0] for c in o.completions):
        assert tok.decode(ro.prompt_ids[j]) in rendered  # the template's rendering of the conversation, once
        assert ro.completion_ids[j] == c.token_ids == [t for _, ids in c.turns for t in ids]
        assert any(kind == "tool" for kind, _ in c.turns) or not c.tool_calls


def test_tool_tokens_get_no_gradient_from_the_loss_or_the_kl(micro_recipe, tmp_path):
    trainer, _ = tool_trainer(micro_recipe, tmp_path, algorithm={"beta": 0.1})
    ro = trainer.rollout([0, 1])
    b = ro.micro_batch(list(range(len(ro.completion_ids))))
    tool = torch.zeros_like(b["mask"])
    for j, m in enumerate(ro.tool_masks):
        tool[j, :len(m)] = torch.tensor(m)
    assert tool.any()
    lp, _ = trainer.completion_logprobs(trainer.train_model, b)
    lp.retain_grad()
    with torch.no_grad():
        ref = trainer.completion_logprobs(trainer.reference_model, b)[0] + 0.3  # a KL term everywhere
    advantages = torch.linspace(-1, 1, len(ro.completion_ids))
    loss = policy_loss(lp, lp.detach(), advantages, b["mask"], loss_type="grpo", epsilon=0.2, ref_logprobs=ref,
                       beta=0.1)[0]
    loss.backward()
    assert lp.grad[tool].abs().max() == 0
    assert lp.grad[b["mask"]].abs().min() > 0  # every trained token has a gradient


def test_a_step_logs_tool_metrics_and_rewards_see_the_episode_and_its_calls(micro_recipe, tmp_path):
    trainer, _ = tool_trainer(micro_recipe, tmp_path)
    metrics = trainer.train_step()
    ro = trainer._last_rollout
    assert metrics["tools/calls_per_completion"] == sum(ro.tool_calls) / len(ro.tool_calls) > 0
    assert 0 < metrics["tools/call_frequency"] <= 1 and metrics["tools/errors"] == 0
    assert metrics["time/tools_s"] > 0 and metrics["tools/call_seconds"] > 0
    tool_tokens = [sum(m) for m in ro.tool_masks if m]
    assert metrics["tools/output_tokens_per_completion"] == sum(tool_tokens) / len(ro.tool_calls) > 0
    # The reward counts the calls whose output shows in the text it got: the whole episode, every call.
    assert ro.rewards.tolist() == [float(k) for k in ro.tool_calls]


def test_overlapped_tool_calls_train_on_the_completions_a_waiting_step_samples(micro_recipe, tmp_path):
    """tools.overlap: the other sequences decode while the sandboxed calls run; the step's rollout is the one
    the waiting trainer samples, and the step logs how many engine steps ran beside a call."""
    rollouts, logged = [], []
    for overlap in (False, True):
        (tmp_path / str(overlap)).mkdir()
        trainer, _ = tool_trainer(micro_recipe, tmp_path / str(overlap), overlap=overlap)
        logged.append(trainer.train_step())
        rollouts.append(trainer._last_rollout)
    waited, overlapped = rollouts
    assert sum(waited.tool_calls) > 0 and overlapped.completion_ids == waited.completion_ids
    assert overlapped.tool_masks == waited.tool_masks and overlapped.rewards.tolist() == waited.rewards.tolist()
    assert "tools/steps_beside_calls" not in logged[0] and logged[1]["tools/steps_beside_calls"] > 0


def test_tools_with_the_vllm_backend_are_refused_naming_the_key(micro_recipe):
    with pytest.raises(RecipeError, match="^tools: .*rollout.backend: ours"):
        load_recipe(micro_recipe(tools={"names": ["python"]}, rollout={"backend": "vllm"}))


def test_evaluation_with_tools_reports_the_call_rate_and_grades_the_whole_episode(micro_recipe, tmp_path):
    from grpo.evaluation import evaluate

    trainer, _ = tool_trainer(micro_recipe, tmp_path)
    rows = [{"prompt": "12+34", "answer": "46"}, {"prompt": "5+5", "answer": "10"}]
    result = evaluate(trainer.engine, trainer.tokenizer, rows, template="{prompt}=", max_tokens=16,
                      toolbox=trainer.toolbox, max_tool_calls=2)
    assert result.summary["tool_calls_per_sample"] == sum(x["tool_calls"] for x in result.samples) / 2 > 0
    assert result.summary["tool_call_frequency"] == 1.0 and result.config["max_tool_calls"] == 2
    assert all("=" in x["completion"] and ";" in x["completion"] for x in result.samples)  # tool output included
    plain = evaluate(trainer.engine, trainer.tokenizer, rows, template="{prompt}=", max_tokens=16)
    assert "tool_call_frequency" not in plain.summary


def test_sft_traces_tokenize_tool_output_as_episodes_do_and_do_not_train_on_it(micro_recipe):
    from grpo.sft import SFTTrainer

    recipe = load_recipe(micro_recipe(
        data={"source": "multiplication", "template": "{prompt}=", "limit": 8, "task_options": {"tool_share": 1.0}},
        tools={"names": ["python"], "options": {"python": {"syntax": "tags"}}}))
    sft = SFTTrainer(recipe)
    tok = sft.tokenizer
    ids, _, tool = sft.examples[0]
    output = tok.decode([ids[i] for i in tool])
    assert output.startswith("<output>") and output.endswith("</output>")
    assert tool == list(range(tool[0], tool[-1] + 1))
    batch_ids, mask = sft.batch()
    for b in range(len(batch_ids)):
        text = tok.decode(batch_ids[b][mask[b]].tolist())
        assert "<output>" not in text and "</python>" in text  # the call is trained, its output is not


def test_the_r1_report_with_tools_puts_pass_at_1_with_and_without_them_side_by_side():
    from grpo.pipeline import format_report

    def ev(p, rate=None):
        return {"pass@1": p, "format": 1.0, "mean_length": 40.0, "tool_call_rate": rate, "example": None}

    report = {"held_out_problems": 8, "eval": {"n": 4, "temperature": 1.0}, "sft_eval": ev(0.5, 0.6),
              "grpo_eval": ev(0.9, 0.95), "sft_eval_no_tools": ev(0.1), "grpo_eval_no_tools": ev(0.05),
              "pass@1_tools_over_best_without": 0.8, "tool_call_rate_first_steps": 0.6,
              "tool_call_rate_last_steps": 0.9, "stages": {"sft": {"seconds": 1.0}}, "total_seconds": 1.0}
    text = format_report(report)
    assert "| after SFT | 0.500 | 0.100 | 0.600 |" in text and "| after GRPO | 0.900 | 0.050 | 0.950 |" in text
    assert "minus the best pass@1 without: +0.800" in text and "0.600 (first steps) -> 0.900" in text
    paired = format_report(report | {"pass@1_tools_over_best_without_stderr": 0.042})
    assert "minus the best pass@1 without: +0.800 (standard error 0.042, paired); tool-call rate" in paired


def test_the_r1_report_with_tools_prints_the_call_rate_over_grpo_steps():
    from grpo.pipeline import _rate_over_steps

    rates = [i / 39 for i in range(40)]
    (line,) = _rate_over_steps(rates, points=5)
    assert line.startswith("Tool-call rate over GRPO steps: step 1: 0.00,") and line.endswith("step 40: 1.00.")
    assert line.count("step ") == 5
    assert _rate_over_steps([]) == [] and _rate_over_steps([0.5]) == ["Tool-call rate over GRPO steps: step 1: 0.50."]
