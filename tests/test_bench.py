"""The benches keep reporting when a peer fails: that peer is null with its reason, the others are measured,
and the JSON names the CPU. Tiny workloads; the figures themselves are not checked here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT.parent / "shared" / "peers"


def run_bench(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_machine_names_the_cpu_and_its_widest_isa():
    sys.path.insert(0, str(ROOT / "bench"))
    from machine import cpu_info

    info = cpu_info(threads=2)
    assert info["model"] and info["threads"] == 2 and info["cores"] >= 1
    flags = set(info["flags"])
    assert info["isa"] == ("amx" if "amx_bf16" in flags else "avx512" if "avx512f" in flags
                           else "avx2" if "avx2" in flags else info["isa"])


def test_rollout_bench_reports_a_failed_peer_and_measures_the_rest():
    result = run_bench("rollout.py", "--repeats", "1", "--workloads", "1x2x4", "--engines",
                       "ours-eager,transformers,vllm-float32", "--fail-peer", "transformers", "--fail-peer", "vllm")
    assert result["ours_eager_tokens_per_s"] > 0
    assert result["transformers_tokens_per_s"] is None and result["vllm_tokens_per_s"] is None
    assert "made to fail by --fail-peer" in result["failed"]["transformers"]
    assert result["failed"]["vllm-float32"]  # made to fail, or not installed: either way a reason
    assert result["cpu"]["isa"] and result["cpu"]["threads"] == 2


@pytest.mark.skipif(not PEERS.exists(), reason=f"the peer baselines are not at {PEERS} (../shared)")
def test_grpo_step_bench_reports_a_failed_trl_and_measures_ours():
    result = run_bench("grpo_step.py", "--steps", "2", "--tokens", "8", "--runners", "trl,ours", "--fail-peer", "trl")
    assert result["ours_s_per_step"] > 0 and result["trl_s_per_step"] is None and result["speedup"] is None
    assert result["failed"]["trl"]  # made to fail, or not installed: either way a reason
    assert result["cpu"]["model"]


@pytest.mark.slow
def test_gpu_bench_on_a_cpu_checks_correctness_and_survives_a_failing_section():
    result = run_bench("gpu.py", "--device", "cpu", "--tiny", "--threads", "2", "--fail-section", "train")
    assert result["device"]["type"] == "cpu" and result["device"]["name"] and result["device"]["torch"]
    parity = result["sections"]["parity"]
    assert parity["fp32_ok"] and parity["fp32_max_abs_diff"] < 1e-4
    assert 0 < parity["bf16_rel_error_ours"] < 0.2  # bfloat16's rounding, stated, not zero
    assert result["sections"]["greedy"]["equal"]
    logprobs = result["sections"]["logprobs"]
    assert logprobs["float32"]["max_abs_diff"] < 1e-4
    assert logprobs["bfloat16"]["max_abs_diff"] < 0.5
    rollout = result["sections"]["rollout"]["2x4x8"]  # one workload per key (two on a GPU)
    assert rollout["ours_tokens_per_s"] > 0 and rollout["decode"]["floor_s"] > 0
    assert rollout["host_top_functions"]  # where the engine's host time goes
    overlap = rollout["overlap"]  # Engine(overlap=True) beside the step-by-step engine (buffered path on a CPU)
    assert overlap["same_completions"] and overlap["decode_path"] == "buffers" and overlap["overlap_tokens_per_s"] > 0
    kernels = result["sections"]["kernels"]  # each kernel against its reference (the reference itself on a CPU)
    assert kernels["attention_b8"]["rel_error"] < 1e-4 and kernels["routed_experts"]["rel_error"] < 1e-4
    assert kernels["lm_head"]["rel_error_vs_unfused"]["d_weight"] < 1e-4
    # The section made to fail is null with its reason; the one --tiny leaves out says so; the rest ran.
    assert result["sections"]["train"] is None and "on purpose" in result["failed"]["train"]
    assert result["sections"]["grpo"] is None and "--tiny" in result["failed"]["grpo"]
    assert set(result["failed"]) == {"train", "grpo"}


def test_engine_host_bench_times_a_decode_steps_host_path_and_its_phases():
    result = run_bench("engine_host.py", "--batches", "8", "--tokens", "6", "--repeats", "1")
    assert result["step_ms"] is None and result["ragged_mean_step_ms"] is None  # batch 128 was not asked for
    for work in ("uniform", "ragged"):
        for path, sampler in (("buffers", "counter"), ("overlap", "counter"), ("eager", "generator")):
            r = result["workloads"][work][path]["8"]
            assert r["batch"] == 8 and r["sampler"] == sampler and r["decode_steps"] == (5 if work == "uniform" else 4)
            assert r["step_ms"] > 0 and r["mean_step_ms"] > 0 and len(r["runs_step_ms"]) == 1
            assert {"schedule", "inputs", "model", "append", "loop"} <= set(r["phases_ms"])
        assert "readback" in result["workloads"][work]["buffers"]["8"]["phases_ms"]
    assert "stubbed" in result["timed"] and result["cpu"]["model"] and result["threads"] == 1


def test_tool_overlap_bench_times_both_modes_on_the_same_calls():
    result = run_bench("tool_overlap.py", "--repeats", "1", "--prompts", "1", "--tokens", "24", "--every", "8",
                       "--tool-ms", "20")
    for mode in ("waiting", "overlap"):
        assert result[mode]["wall_s"] > 0 and result[mode]["calls"] > 0
    assert result["waiting"]["calls"] == result["overlap"]["calls"] and result["same_completions"]
    assert result["waiting"]["steps_beside_tools"] == 0 < result["overlap"]["steps_beside_tools"]
    assert result["speedup"] > 0 and result["cpu"]["model"]
