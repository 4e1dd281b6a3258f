"""Our rollout engine: request -> sequences -> scheduler -> runner -> sampler -> sequences -> outputs.

A prompt with n samples is prefilled once and its n sequences share the prompt's blocks; identical
prompts in one call share them too. Every step decodes all running sequences together; finished ones
free their blocks and waiting ones are admitted at once. The engine holds the trainer's model object
itself, so an optimizer step is seen by the next `generate` with no copy (the weights derived from it, such
as MLA's absorbed projections, are re-derived at the start of each call)."""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import Protocol

import torch
from tqdm.auto import tqdm

from model import CausalLM

from .block_manager import BlockManager
from .model_runner import ModelRunner, PendingStep
from .outputs import Completion, RequestOutput
from .sampler import SAMPLERS, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, Status

PAUSE = "pause"
"""What `EpisodeHooks.on_token` returns to pause a sequence for a tool call."""


class EpisodeHooks(Protocol):
    """What `Engine.generate` asks of a multi-turn episode loop (`grpo.rollout.episodes.EpisodeLoop`)."""

    def on_token(self, seq: Sequence) -> str | None:
        """After a sampled token that ended nothing: PAUSE (a tool call is complete), a finish reason, or None."""
        ...

    def resume(self, paused: list[Sequence]) -> list[str | None]:
        """Runs the paused sequences' calls and appends their output tokens; per sequence, None to go on
        generating or a finish reason."""
        ...

    #: Whether the loop runs calls in the background (`submit`, `poll`) while the others decode.
    overlaps: bool

    def submit(self, paused: list[Sequence]) -> None:
        """Starts the paused sequences' calls and returns at once (`overlaps` only)."""
        ...

    def poll(self, block: bool) -> list[tuple[Sequence, str | None]]:
        """The sequences whose calls have finished since the last poll, their output tokens appended, each with
        None (go on) or a finish reason; block: wait for at least one."""
        ...

    @property
    def in_flight(self) -> int:
        """Calls submitted and not yet polled."""
        ...


class Engine:
    """Generates completions with our DeepSeek-V3 model over a paged latent KV cache (a `RolloutEngine`).

    cache_memory_bytes: the pool's size (rounded down to whole blocks); or give num_blocks.
    tokenizer: needed for stop strings and returned text; its eos_token_id ends sequences.
    record_routing: return each completion's expert choices (`Completion.routed_experts`), so that the
        trainer can replay them (routing replay: the training forward uses the experts that sampled).
    compile: run the eager decode path through graphs compiled ahead of time (`CausalLM.compile_decode`;
        the CPU's fast path; a GPU's is decode_path="graphs").
    decode_path: "eager", "buffers" or "graphs" (`ModelRunner`); None: "graphs" when the model is on CUDA
        (the decode step captured in CUDA graphs), else "eager".
    gpu_memory_utilization: on CUDA, size the cache pool as this fraction of the memory free when the engine
        is made (instead of cache_memory_bytes), as vLLM's option of that name.
    dtype: the weights' dtype for decoding. None or the model's own: the engine decodes with the model object
        itself. Another (bfloat16 over a float32 trainer's model): the engine keeps its own copy in that dtype
        (`CausalLM.inference_copy`, the routing bias kept in float32) and refreshes it in place at the start of
        every `generate`: once per optimizer step rather than a cast in every decode step.
    sampler: where the sampling noise comes from (`grpo.rollout.sampler`): "generator" (a CPU
        `torch.Generator` per sequence) or "counter" (a hash of seed, position and token; no generator
        objects, no host sync). None: "counter" when the model is on CUDA, else "generator", so CPU runs
        sample exactly as they always have. Both keep a seeded completion independent of its batch.
    overlap: launch each decode step before reading the one before it, so that on a GPU the host reads tokens,
        ends sequences and prepares the next step while the device runs this one (vLLM's async scheduling,
        SGLang's overlap scheduler). Each sequence feeds the token it sampled there, taken on the device; one
        that the unread token ends (EOS, a stop token or string) runs one step for nothing, whose row is dropped,
        and one that it brings to max_tokens is left out. Completions are the same as without it. Needs the
        counter sampler on a buffered decode path; a call with top-k/top-p/min-p, tool episodes, or an engine
        that records routing runs step by step.
    """

    def __init__(self, model: CausalLM, tokenizer=None, *, block_size: int = 16, num_blocks: int | None = None,
                 cache_memory_bytes: int = 256 * 1024**2, max_num_seqs: int = 256, max_prefill_tokens: int = 8192,
                 seed: int = 0, record_routing: bool = False, compile: bool = False, sampler: str | None = None,
                 decode_path: str | None = None, gpu_memory_utilization: float | None = None,
                 dtype: torch.dtype | None = None, overlap: bool = False):
        on_cuda = model.lm_head.weight.device.type == "cuda"
        self.policy = model  # where the weights come from (the trainer's model)
        self.decodes_a_copy = dtype is not None and dtype != model.lm_head.weight.dtype
        if self.decodes_a_copy:
            model = model.inference_copy(dtype)  # type: ignore[arg-type]  (what the engine decodes with)
        if sampler is None:
            sampler = "counter" if on_cuda else "generator"
        self.decode_path = decode_path or ("graphs" if on_cuda else "eager")
        if sampler not in SAMPLERS:
            raise ValueError(f"Engine(sampler={sampler!r}): allowed are {', '.join(map(repr, SAMPLERS))} "
                             "or None (counter on CUDA, generator elsewhere)")
        self.sampler = sampler
        if overlap and (sampler != "counter" or self.decode_path == "eager"):
            raise ValueError(f"Engine(overlap=True) needs sampler='counter' and decode_path 'buffers' or 'graphs' "
                             f"(the sampler in the step, its output kept on the device); got sampler={sampler!r}, "
                             f"decode_path={self.decode_path!r}")
        self.overlap = overlap
        self.model, self.tokenizer = model, tokenizer
        self.compile = compile and self.decode_path == "eager"  # the other paths never run the compiled step
        self._compile_if_asked(model)
        cfg = model.config
        bytes_per_block = cfg.num_hidden_layers * cfg.latent_dim * block_size * model.lm_head.weight.element_size()
        if gpu_memory_utilization is not None:
            if not on_cuda:
                raise ValueError("gpu_memory_utilization sizes the cache from a GPU's free memory, but the model is "
                                 f"on {model.lm_head.weight.device}; give cache_memory_bytes instead")
            if not 0 < gpu_memory_utilization < 1:
                raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization}: must be in (0, 1)")
            free, _ = torch.cuda.mem_get_info(model.lm_head.weight.device)
            cache_memory_bytes = int(free * gpu_memory_utilization)
        self.num_blocks = num_blocks or max(1, cache_memory_bytes // bytes_per_block)
        self.block_size = block_size
        self.max_num_seqs, self.max_prefill_tokens = max_num_seqs, max_prefill_tokens
        self.runner = ModelRunner(model, self.num_blocks, block_size, record_routing=record_routing,
                                  decode_path=self.decode_path, max_batch=max_num_seqs)
        self.block_manager = BlockManager(self.num_blocks, block_size)
        self.seed_source = random.Random(seed)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = cfg.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.last_stats: dict[str, int] = {}
        # Per call of generate: the tokens that end a sequence, per SamplingParams (by id); whether any filters.
        self._ends: dict[int, frozenset[int]] = {}
        self._filters = False

    #: It generates with the model object it was given, so the trainer's optimizer steps need no push.
    runs_model_in_place = True
    #: It can pause a sequence for a tool call and resume it from its cache (`generate(episodes=...)`).
    runs_episodes = True

    @property
    def records_routing(self) -> bool:
        return self.runner.record_routing

    def close(self) -> None:
        """Nothing to release: the KV cache is freed with the engine."""

    def update_weights(self, model: CausalLM | None = None) -> None:
        """The engine already runs the trainer's model in place (or refreshes its copy from it at each
        `generate`); pass a different model object to swap."""
        if model is None or model is self.policy:
            return
        self.policy = model
        if not self.decodes_a_copy:  # a copy takes the new model's weights at the next generate
            self.model = self.runner.model = model
            self._compile_if_asked(model)

    def _refresh_copy(self) -> None:
        """The decoding copy takes the policy's weights (every call: an optimizer step need not leave a trace in
        the parameters' version counters, and one copy per generate is small beside a rollout)."""
        if self.decodes_a_copy:
            self.model.copy_weights_from(self.policy)

    def _compile_if_asked(self, model: CausalLM) -> None:
        if self.compile and model.compiled_decode is None:
            model.compile_decode(verbose=True)

    # ----- the generate loop ----------------------------------------------------------------------------
    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 use_tqdm: bool = False, *, episodes: EpisodeHooks | None = None) -> list[RequestOutput]:
        """prompts: token ids per request; params: one for all or one per request.
        Returns, per request in order, its n completions. (One loop from requests to outputs, kept whole so
        the data flow reads in one place: schedule, run, sample, append, finish.)

        episodes: multi-turn tool use (`grpo.rollout.episodes`): after each sampled token it may pause the
        sequence for a tool call; the step's paused sequences are handed back to it together, it appends
        their tools' output tokens, and they resume from their cached blocks (only the new tokens are
        prefilled) or finish. A loop that `overlaps` runs the calls in the background instead: the others
        decode meanwhile, and each sequence resumes at the first step after its call returns."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            self._check_fits(i, len(p), sp)
        if any(sp.stop for sp in params_list) and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: Engine(model, tokenizer)")

        self.block_manager = BlockManager(self.num_blocks, self.block_size)
        self._ends = {id(sp): frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else frozenset(self.eos_ids))
                      for sp in params_list}
        self._filters = any(sp.filters for sp in params_list)
        self._refresh_copy()
        self.runner.reset()  # the trainer may have stepped the weights since the last call
        scheduler = Scheduler(self.block_manager, self.max_num_seqs, self.max_prefill_tokens)
        groups: dict[tuple[int, ...], Sequence] = {}
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            key = tuple(p)
            if key not in groups:  # identical prompts share one prefill and its blocks
                groups[key] = Sequence(list(p), sp)
                scheduler.add(groups[key])
            groups[key].fan_out.extend((i, k, sp) for k in range(sp.n))
        outputs = [RequestOutput(list(p), [None] * sp.n) for p, sp in zip(prompts, params_list)]  # type: ignore[list-item]
        total = sum(sp.n for sp in params_list)
        bar = tqdm(total=total, desc="rollout", unit="seq", disable=not use_tqdm)
        steps = prefill_tokens = 0
        # Overlap: every decode step samples on the device, and one may be in flight, its tokens unread.
        ahead = self.overlap and episodes is None and not self._filters and not self.runner.record_routing
        pending: PendingStep | None = None
        while not scheduler.done or (episodes is not None and episodes.in_flight):
            if episodes is not None and episodes.in_flight:
                # nothing left to run: wait for a call; else take the calls that are back and decode on
                self._resume(episodes.poll(block=scheduler.done), scheduler, outputs, bar)
                if scheduler.done:
                    continue
            if pending is not None and not (any(map(self._goes_on, pending.seqs)) and scheduler.decodes_running_as_is()):
                self._collect(pending, scheduler, outputs, bar)  # its tokens decide what comes next
                pending = None
                continue
            batch, prefill, copies = scheduler.schedule()
            self.runner.copy_blocks(copies)
            steps += 1
            if ahead and not prefill:
                launched = self._launch_ahead(batch, pending)
                if pending is not None:
                    self._collect(pending, scheduler, outputs, bar)
                pending = launched
                continue
            if not prefill and self._samples_on_device(batch):
                tokens, logprobs = self.runner.decode_tokens(batch)
                self._append(batch, tokens, logprobs, scheduler, outputs, bar, episodes)
                continue
            if prefill:
                prefill_tokens += sum(s.num_tokens - s.num_cached for s in batch)
            logits = self.runner.forward(batch, prefill)
            rows, seqs = [], []
            for row, seq in enumerate(batch):
                if seq.fan_out:  # a prompt: fork it into its samples, each taking a first token
                    for request, k, sp in seq.fan_out:
                        child = Sequence(seq.token_ids, sp, request, k, self._stream_seed(sp, k))
                        if child.seed is not None and self.sampler == "generator":
                            child.generator = torch.Generator().manual_seed(child.seed)
                        self.block_manager.fork(seq, child)
                        child.num_cached, child.status = seq.num_cached, Status.RUNNING
                        child.routing = list(seq.routing)
                        scheduler.running.append(child)
                        rows.append(row)
                        seqs.append(child)
                    self.block_manager.free(seq)
                else:
                    if prefill:  # a preempted sequence, recomputed
                        scheduler.running.append(seq)
                    rows.append(row)
                    seqs.append(seq)
            tokens, logprobs = self._sample(logits if rows == list(range(len(batch))) else logits[rows], seqs)
            self._append(seqs, tokens, logprobs, scheduler, outputs, bar, episodes)
        if pending is not None:  # a last step whose sequences had all ended: wait for the device, keep nothing
            self._collect(pending, scheduler, outputs, bar)
        bar.close()
        self.runner.forget_batch()  # its persistent decode batch holds the last step's sequences
        self.last_stats = {"steps": steps, "preemptions": scheduler.num_preemptions,
                           "blocks_allocated": self.block_manager.blocks_allocated, "prefill_tokens": prefill_tokens}
        return outputs

    # ----- helpers -----------------------------------------------------------------------------------------
    @staticmethod
    def _goes_on(seq: Sequence) -> bool:
        """Overlap: whether a sequence of the unread step runs the step after it (not ended by the step before,
        not brought to max_tokens by the unread token)."""
        return seq.status is Status.RUNNING and seq.num_completion_tokens + 1 < seq.params.max_tokens

    def _launch_ahead(self, batch: list[Sequence], pending: PendingStep | None) -> PendingStep:
        """Overlap: launches the decode step of `batch` while `pending` (the step before, if any) is unread, leaving
        out the sequences its token brings to max_tokens."""
        if pending is not None:
            batch = [s for s in batch if self._goes_on(s)]
        return self.runner.launch_decode(batch, after=pending)

    def _collect(self, pending: PendingStep, scheduler: Scheduler, outputs: list[RequestOutput], bar) -> None:
        """Overlap: reads a launched step's tokens and appends them to its sequences still running (one that
        the step before ended ran this step for nothing)."""
        tokens, logprobs = pending.result()
        live = [i for i, s in enumerate(pending.seqs) if s.status is Status.RUNNING]
        if len(live) < len(pending.seqs):
            pending.seqs, tokens, logprobs = ([x[i] for i in live] for x in (pending.seqs, tokens, logprobs))
        self._append(pending.seqs, tokens, logprobs, scheduler, outputs, bar, None)

    def _append(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float], scheduler: Scheduler,
                outputs: list[RequestOutput], bar, episodes) -> None:
        """Each sequence takes its new token; the finished ones leave the scheduler for their output slot, and
        (episodes) those that completed a tool call pause, get its output appended and resume or finish."""
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.append(token, logprob)
        ended = self._finished(seqs)
        if episodes is None:
            for i, reason in ended:
                self._finish(seqs[i], reason, scheduler, outputs, bar)
            return
        reasons = dict(ended)
        paused: list[Sequence] = []
        for i, seq in enumerate(seqs):
            reason = reasons.get(i) or episodes.on_token(seq)
            if reason == PAUSE:
                scheduler.pause(seq)
                paused.append(seq)
            elif reason:
                self._finish(seq, reason, scheduler, outputs, bar)
        if paused and episodes.overlaps:
            episodes.submit(paused)
        elif paused:
            self._resume(zip(paused, episodes.resume(paused)), scheduler, outputs, bar)

    def _resume(self, back: Iterable[tuple[Sequence, str | None]], scheduler: Scheduler,
                outputs: list[RequestOutput], bar) -> None:
        """Sequences back from their tool calls (pairs of a sequence and None or its finish reason) resume or
        finish."""
        for seq, reason in back:
            if reason:
                self._finish(seq, reason, scheduler, outputs, bar)
            else:
                scheduler.resume(seq)

    def _finish(self, seq: Sequence, reason: str, scheduler: Scheduler, outputs: list[RequestOutput], bar) -> None:
        scheduler.finish(seq, reason)
        outputs[seq.request_index].completions[seq.sample_index] = self._completion(seq)
        bar.update(1)

    def _samples_on_device(self, batch: list[Sequence]) -> bool:
        """Whether a decode step of `batch` samples inside the decode graph: the counter sampler, the buffered
        paths, and no top-k/top-p/min-p filter in the batch (those sample from the logits, as on a CPU)."""
        return (self.sampler == "counter" and self.runner.decode_graphs is not None
                and not (self._filters and any(s.params.filters for s in batch)))

    def _check_fits(self, index: int, prompt_len: int, sp: SamplingParams) -> None:
        if prompt_len == 0:
            raise ValueError(f"request {index}: empty prompt")
        longest = prompt_len + sp.max_tokens
        limit = self.model.config.max_position_embeddings
        if longest > limit:
            raise ValueError(f"request {index}: prompt of {prompt_len} tokens + max_tokens {sp.max_tokens} = {longest} "
                             f"exceeds the model's context of {limit} tokens")
        blocks = self.block_manager.blocks_for(longest) + 1
        if blocks > self.num_blocks:
            raise ValueError(f"request {index}: one sequence of up to {longest} tokens needs {blocks} cache blocks but "
                             f"the pool has {self.num_blocks}; raise cache_memory_bytes")

    def _stream_seed(self, sp: SamplingParams, k: int) -> int | None:
        """Sample k's own seed in [0, 2**63): from SamplingParams.seed when given, else from the engine's."""
        if sp.greedy:
            return None
        seed = (sp.seed * 1_000_003 + k) if sp.seed is not None else self.seed_source.getrandbits(63)
        return seed % (2**63)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
        """logits [B, V] for seqs -> their next tokens and log-probs, with the engine's sampler."""
        params = [s.params for s in seqs]
        if self.sampler == "generator":
            return sample(logits, params, [s.generator for s in seqs])
        # Greedy rows take seed 0: their noise is computed and ignored.
        seeds, positions = torch.tensor([[s.seed or 0 for s in seqs], [s.num_completion_tokens for s in seqs]],
                                        dtype=torch.int64).to(logits.device, non_blocking=True)
        return sample(logits, params, seeds=seeds, positions=positions)

    def _finished(self, seqs: list[Sequence]) -> list[tuple[int, str]]:
        """The sequences that their last token ended, as (index in seqs, reason), in order: "stop" for a stop
        token, EOS (unless ignored) or a stop string in the completion's text, else "length" at max_tokens.
        One pass with the ending tokens looked up per SamplingParams; the texts decoded only for stop strings."""
        ended: list[tuple[int, str]] = []
        texts: list[int] = []
        ends = self._ends
        for i, seq in enumerate(seqs):
            sp = seq.params
            if seq.token_ids[-1] in ends[id(sp)]:
                ended.append((i, "stop"))
            elif sp.stop:
                texts.append(i)
            elif len(seq.token_ids) - seq.prompt_len >= sp.max_tokens:
                ended.append((i, "length"))
        for i in texts:
            seq = seqs[i]
            text = self.tokenizer.decode(seq.completion_ids)
            if any(s in text for s in seq.params.stop):
                ended.append((i, "stop"))
            elif seq.num_completion_tokens >= seq.params.max_tokens:
                ended.append((i, "length"))
        if texts:
            ended.sort()
        return ended

    def _completion(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.completion_ids) if self.tokenizer is not None else None
        routing = torch.cat(seq.routing) if seq.routing else None
        return Completion(seq.completion_ids, list(seq.logprobs), seq.finish_reason or "length", text, routing)
