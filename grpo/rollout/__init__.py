"""Rollouts: for each prompt, n sampled completions with their token ids and log-probabilities.

`Engine` is our own (paged latent KV cache, prefix sharing, continuous batching); `VLLMEngine` serves the
same interface through vLLM where it is installed."""

from .outputs import Completion, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["Completion", "RequestOutput", "SamplingParams"]
# The engines: `from grpo.rollout.engine import Engine`; `from grpo.rollout.vllm_backend import VLLMEngine`
# (imports vLLM only when constructed).
