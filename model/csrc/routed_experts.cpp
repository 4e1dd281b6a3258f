#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

// The routed experts of one decode step, each expert on exactly its own tokens (no padding):
//   base       [N, D]        float32: what the experts' sum is added to (the residual + shared experts)
//   x          [N, D]        float32: the experts' input (the normed hidden state)
//   weights    [N, K]        float32: each chosen expert's weight
//   expert_ids [N, K]        int64:   the chosen experts
//   gate_up    [E, D, 2I]    float32: gate's columns, then up's ([in, out], as `Experts.decode_weights`)
//   down       [E, I, D]     float32
// returns      [N, D]        base + sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x), e = expert_ids[:, k]
//
// The (token, expert) pairs are counting-sorted by expert; each expert that was chosen runs two matrix
// products (MKL's, through at::mm_out) on its rows alone. PyTorch's batched alternatives either pad every
// expert to the busiest one (at decode sizes the gate's group limit leaves that 2-3x the work) or add a
// dozen small ops of dispatch around a grouped product.
torch::Tensor routed_experts(torch::Tensor base, torch::Tensor x, torch::Tensor weights, torch::Tensor expert_ids,
                             torch::Tensor gate_up, torch::Tensor down) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && base.dtype() == torch::kFloat32 && weights.dtype() == torch::kFloat32 &&
                  gate_up.dtype() == torch::kFloat32 && down.dtype() == torch::kFloat32,
              "routed_experts: float32 tensors only");
  TORCH_CHECK(expert_ids.dtype() == torch::kInt64, "routed_experts: expert_ids must be int64");
  TORCH_CHECK(x.dim() == 2 && base.sizes() == x.sizes() && weights.dim() == 2 && expert_ids.sizes() == weights.sizes() &&
                  weights.size(0) == x.size(0) && gate_up.dim() == 3 && down.dim() == 3,
              "routed_experts: base/x [N, D], weights/expert_ids [N, K], gate_up [E, D, 2I], down [E, I, D]");
  const int64_t N = x.size(0), D = x.size(1), K = weights.size(1), E = gate_up.size(0), I = down.size(1);
  TORCH_CHECK(gate_up.size(1) == D && gate_up.size(2) == 2 * I && down.size(0) == E && down.size(2) == D,
              "routed_experts: the experts' shapes do not agree with x");
  x = x.contiguous();
  weights = weights.contiguous();
  expert_ids = expert_ids.contiguous();
  base = base.contiguous();
  gate_up = gate_up.contiguous();
  down = down.contiguous();

  // Counting sort of the N*K pairs by expert: slot_of[pair] is its row in expert order.
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), slot_of(N * K);
  for (int64_t p = 0; p < N * K; ++p) {
    TORCH_CHECK(ids[p] >= 0 && ids[p] < E, "routed_experts: expert id ", ids[p], " out of range [0, ", E, ")");
    ++start[ids[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < N * K; ++p) slot_of[p] = next[ids[p]]++;
  }

  auto rows = torch::empty({N * K, D}, x.options());  // each pair's input row, in expert order
  const float* xp = x.data_ptr<float>();
  float* rp = rows.data_ptr<float>();
  at::parallel_for(0, N * K, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) std::copy(xp + (p / K) * D, xp + (p / K + 1) * D, rp + slot_of[p] * D);
  });

  auto hidden = torch::empty({N * K, 2 * I}, x.options());
  auto outs = torch::empty({N * K, D}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;  // an expert no token chose costs nothing
    auto h = hidden.narrow(0, start[e], n);
    at::mm_out(h, rows.narrow(0, start[e], n), gate_up[e]);
  }
  // silu(gate) * up, in place into the gate's columns
  float* hp = hidden.data_ptr<float>();
  at::parallel_for(0, N * K, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* g = hp + p * 2 * I;
      const float* u = g + I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = start[e + 1] - start[e];
    if (n == 0) continue;
    auto y = outs.narrow(0, start[e], n);
    at::mm_out(y, hidden.narrow(0, start[e], n).narrow(1, 0, I), down[e]);
  }

  // out[t] = base[t] + sum_k w[t, k] * outs[slot_of[t * K + k]]: a gather per token, no scattered adds.
  auto out = torch::empty_like(base);
  const float* bp = base.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  const float* op = outs.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* y = yp + t * D;
      std::copy(bp + t * D, bp + (t + 1) * D, y);
      for (int64_t k = 0; k < K; ++k) {
        const float w = wp[t * K + k];
        const float* o = op + slot_of[t * K + k] * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) y[d] += w * o[d];
      }
    }
  });
  return out;
}
