"""GRPO on DeepSeek-V3: the rollout engine, the trainer, evaluation and the `grpo` command line."""
