#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX2__) && defined(__FMA__) && !defined(R1_PORTABLE)  // R1_PORTABLE: the plain loops only
#include <immintrin.h>
#define R1_AVX2 1
#define R1_IN_REGISTER(v) asm("" : "+x"(v))  // keep a loaded vector in a register (GCC would re-load it per FMA)
#endif
#include <cmath>
#include <vector>

// The routed experts of one decode step, each expert on exactly its own tokens (no padding):
//   base       [N, D]        float32: what the experts' sum is added to (the residual + shared experts)
//   x          [N, D]        float32: the experts' input (the normed hidden state)
//   weights    [N, K]        float32: each chosen expert's weight
//   expert_ids [N, K]        int64:   the chosen experts
//   gate_up    [E, I8, D, 16] float32: panels of 8 gate columns and the same 8 up columns, I8 = ceil(I / 8)
//   down       [E, D16, I, 16] float32: panels of 16 output columns, D16 = ceil(D / 16)
//              (`Experts.packed_weights`: each panel is read front to back; zeros past I and D)
// returns      [N, D]        base + sum_k weights[:, k] * down_e(silu(gate_e x) * up_e x), e = expert_ids[:, k]
//
// The (token, expert) pairs are counting-sorted by expert and each expert multiplies exactly its rows. A decode
// step gives an expert a few to a few dozen rows: too few for MKL, whose every call packs the whole weight
// matrix (as much memory traffic as the arithmetic). Here the weights are packed once per weight version
// into panels of columns (contiguous: a row-major matrix's power-of-two row stride maps a column panel onto
// two L1 sets), and each panel is read against up to six rows held as broadcasts: each weight vector loaded
// feeds six FMAs. A panel holds gate and up columns side by side, so silu(gate) * up is taken in registers.
namespace {

constexpr int64_t ROWS = 6;  // rows of a block: 12 accumulators, 2 weight vectors, a broadcast (15 registers)

#ifdef R1_AVX2
// e^x for 8 floats: x = n ln2 + f with |f| <= ln2 / 2, e^f by a degree-6 polynomial (Cephes' expf
// coefficients, relative error ~1e-7), 2^n by the exponent bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// M rows a_m = a + m * lda against one panel [depth, 16] of 16 columns: c[m, 0:8] and c[m, 8:16] in registers.
// swiglu: out[m, 0:8] = silu(c[m, 0:8]) * c[m, 8:16]; else out[m, 0:16] = c[m, :].
// The accumulators are named variables, not an array: GCC kept an array's copy on the stack up to date
// every step (twelve stores per twelve FMAs, the kernel at a third of its speed).
template <int M, bool swiglu>
void panel_block(const float* a, int64_t lda, const float* panel, int64_t depth, float* out, int64_t ldo) {
  static_assert(M >= 1 && M <= ROWS);
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
#define R1_ROW_FMA(m)                                                  \
  if constexpr (M > m) {                                               \
    const __m256 x = _mm256_broadcast_ss(a + m * lda + k);             \
    c##m##0 = _mm256_fmadd_ps(x, w0, c##m##0);                         \
    c##m##1 = _mm256_fmadd_ps(x, w1, c##m##1);                         \
  }
  for (int64_t k = 0; k < depth; ++k) {
    __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
    R1_IN_REGISTER(w0);
    R1_IN_REGISTER(w1);
    R1_ROW_FMA(0) R1_ROW_FMA(1) R1_ROW_FMA(2) R1_ROW_FMA(3) R1_ROW_FMA(4) R1_ROW_FMA(5)
  }
#undef R1_ROW_FMA
  const __m256 one = _mm256_set1_ps(1.f);
  auto store = [&](int m, __m256 g, __m256 u) {
    if constexpr (swiglu) {  // silu(g) = g / (1 + e^-g)
      const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      _mm256_storeu_ps(out + m * ldo, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
    } else {
      _mm256_storeu_ps(out + m * ldo, g);
      _mm256_storeu_ps(out + m * ldo + 8, u);
    }
  };
  store(0, c00, c01);
  if constexpr (M > 1) store(1, c10, c11);
  if constexpr (M > 2) store(2, c20, c21);
  if constexpr (M > 3) store(3, c30, c31);
  if constexpr (M > 4) store(4, c40, c41);
  if constexpr (M > 5) store(5, c50, c51);
}
#endif

// n rows (a, ld lda) against panels [p0, p1) of `panels` ([P, depth, 16]): out columns p * width .. + width,
// width 8 (swiglu) or 16.
template <bool swiglu>
void run_panels(const float* a, int64_t n, int64_t lda, const float* panels, int64_t depth, int64_t p0, int64_t p1,
                float* out, int64_t ldo) {
  constexpr int64_t width = swiglu ? 8 : 16;
  for (int64_t p = p0; p < p1; ++p) {
    const float* panel = panels + p * depth * 16;
    float* o = out + p * width;
#ifdef R1_AVX2
    int64_t m = 0;
    for (; m + ROWS <= n; m += ROWS) panel_block<ROWS, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo);
    switch (n - m) {
      case 5: panel_block<5, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo); break;
      case 4: panel_block<4, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo); break;
      case 3: panel_block<3, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo); break;
      case 2: panel_block<2, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo); break;
      case 1: panel_block<1, swiglu>(a + m * lda, lda, panel, depth, o + m * ldo, ldo); break;
    }
#else
    for (int64_t m = 0; m < n; ++m) {
      float c[16] = {0.f};
      for (int64_t k = 0; k < depth; ++k)
        for (int64_t j = 0; j < 16; ++j) c[j] += a[m * lda + k] * panel[k * 16 + j];
      for (int64_t j = 0; j < width; ++j) o[m * ldo + j] = swiglu ? c[j] / (1.f + std::exp(-c[j])) * c[8 + j] : c[j];
    }
#endif
  }
}

}  // namespace

torch::Tensor routed_experts(torch::Tensor base, torch::Tensor x, torch::Tensor weights, torch::Tensor expert_ids,
                             torch::Tensor gate_up, torch::Tensor down) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && base.dtype() == torch::kFloat32 && weights.dtype() == torch::kFloat32 &&
                  gate_up.dtype() == torch::kFloat32 && down.dtype() == torch::kFloat32,
              "routed_experts: float32 tensors only");
  TORCH_CHECK(expert_ids.dtype() == torch::kInt64, "routed_experts: expert_ids must be int64");
  TORCH_CHECK(x.dim() == 2 && base.sizes() == x.sizes() && weights.dim() == 2 && expert_ids.sizes() == weights.sizes() &&
                  weights.size(0) == x.size(0) && gate_up.dim() == 4 && down.dim() == 4,
              "routed_experts: base/x [N, D], weights/expert_ids [N, K], gate_up [E, I8, D, 16], down [E, D16, I, 16]");
  const int64_t N = x.size(0), D = x.size(1), K = weights.size(1), E = gate_up.size(0), I8 = gate_up.size(1),
                D16 = down.size(1), I = down.size(2);
  TORCH_CHECK(gate_up.size(2) == D && gate_up.size(3) == 16 && down.size(0) == E && down.size(3) == 16 &&
                  I8 == (I + 7) / 8 && D16 == (D + 15) / 16,
              "routed_experts: the experts' packed shapes do not agree with x");
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

  // In expert order: the rows [NK, D], silu(gate) * up [NK, I8 * 8] (zeros past I), the outputs [NK, D16 * 16].
  const int64_t Ip = I8 * 8, Dp = D16 * 16;
  std::vector<float> rows(N * K * D), act(N * K * Ip), outs(N * K * Dp);
  const float* xp = x.data_ptr<float>();
  for (int64_t p = 0; p < N * K; ++p) std::copy(xp + (p / K) * D, xp + (p / K + 1) * D, rows.data() + slot_of[p] * D);

  // The threads split the panels (every expert's), so an uneven load of experts splits evenly.
  const float* gu = gate_up.data_ptr<float>();
  const float* dn = down.data_ptr<float>();
  at::parallel_for(0, I8, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t e = 0; e < E; ++e)
      if (start[e + 1] > start[e])  // an expert no token chose costs nothing
        run_panels<true>(rows.data() + start[e] * D, start[e + 1] - start[e], D, gu + e * I8 * D * 16, D, p0, p1,
                         act.data() + start[e] * Ip, Ip);
  });
  at::parallel_for(0, D16, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t e = 0; e < E; ++e)
      if (start[e + 1] > start[e])
        run_panels<false>(act.data() + start[e] * Ip, start[e + 1] - start[e], Ip, dn + e * D16 * I * 16, I, p0, p1,
                          outs.data() + start[e] * Dp, Dp);
  });

  // out[t] = base[t] + sum_k w[t, k] * outs[slot_of[t * K + k]]: a gather per token, no scattered adds.
  auto out = torch::empty_like(base);
  const float* bp = base.data_ptr<float>();
  const float* wp = weights.data_ptr<float>();
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* y = yp + t * D;
      std::copy(bp + t * D, bp + (t + 1) * D, y);
      for (int64_t k = 0; k < K; ++k) {
        const float w = wp[t * K + k];
        const float* o = outs.data() + slot_of[t * K + k] * Dp;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) y[d] += w * o[d];
      }
    }
  });
  return out;
}
