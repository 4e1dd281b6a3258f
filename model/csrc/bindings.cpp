#include <torch/extension.h>

// The kernels of model/native.py, one Python module.
torch::Tensor latent_attention(torch::Tensor q, torch::Tensor context, torch::Tensor bias, int64_t rank, double scale);
torch::Tensor latent_attention_paged(torch::Tensor q, torch::Tensor pool, torch::Tensor block_tables,
                                     torch::Tensor lengths, int64_t block_size, int64_t rank, double scale);
torch::Tensor routed_experts(torch::Tensor base, torch::Tensor x, torch::Tensor weights, torch::Tensor expert_ids,
                             torch::Tensor gate_up, torch::Tensor down);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("latent_attention", &latent_attention, "single-pass weight-absorbed MLA decode attention (float32 queries, float32 or bfloat16 latents; CPU)");
  m.def("latent_attention_paged", &latent_attention_paged,
        "the same over a paged latent cache, through block tables (CPU)");
  m.def("routed_experts", &routed_experts, "a decode step's routed experts, each on its own rows (float32, CPU)");
}
