// A whole Llama decoder layer for a decode step (one new token per sequence, a few sequences) in one
// call: the per-op path costs ~13 Python-level calls and 8 starts of the threads per layer, a large
// share of a decode step whose products take little longer (README, Measured). The arithmetic is the same
// kernels' (trellis_cpu.cpp), in the same order as trellis_runtime/model.py's DecoderLayer.

#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>

#include "trellis_cpu.h"

namespace trellis_cpu {
namespace {

constexpr int64_t kTensorsPerLinear = 6;  // codes, lut, input/output signs, input/output Hadamard
constexpr int64_t kSpecPerLinear = 4;     // L, K, V, code
constexpr int64_t kLinears = 7;           // q, k, v, o, gate, up, down

// gate = silu(gate) * up for n floats, silu(g) = g / (1 + exp(-g)).
void silu_times(float* gate, const float* up, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = first_lanes(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(lanes, gate + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(gate + i, lanes, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(lanes, up + i)));
  }
}

}  // namespace

struct DecoderLayer : torch::CustomClassHolder {
  // tensors: kTensorsPerLinear per linear in the order q, k, v, o, gate, up, down (the arguments of
  // TrellisMatrix); factors: one per linear; specs: (L, K, V, code) per linear; dense: the same linears
  // decoded to float32 (out, in), multiplied instead of the codes for more than trellis_max_tokens rows.
  DecoderLayer(std::vector<at::Tensor> tensors, std::vector<double> factors, std::vector<int64_t> specs,
               std::vector<at::Tensor> dense_, int64_t trellis_max_tokens_, at::Tensor input_norm_,
               at::Tensor post_norm_, double eps_)
      : dense(std::move(dense_)), trellis_max_tokens(trellis_max_tokens_),
        input_norm(std::move(input_norm_)), post_norm(std::move(post_norm_)), eps(eps_) {
    TORCH_CHECK(static_cast<int64_t>(tensors.size()) == kLinears * kTensorsPerLinear &&
                    static_cast<int64_t>(factors.size()) == kLinears &&
                    static_cast<int64_t>(specs.size()) == kLinears * kSpecPerLinear,
                "DecoderLayer: expected 7 linears (q, k, v, o, gate, up, down)");
    for (int64_t i = 0; i < kLinears; ++i) {
      const at::Tensor* t = tensors.data() + i * kTensorsPerLinear;
      const int64_t* spec = specs.data() + i * kSpecPerLinear;
      linears.emplace_back(t[0], t[1], t[2], t[3], t[4], t[5], factors[i], spec[0], spec[1], spec[2],
                           spec[3]);
    }
    const int64_t hidden = q().in_features();
    TORCH_CHECK(k().in_features() == hidden && v().in_features() == hidden &&
                    o().out_features() == hidden && o().in_features() == q().out_features() &&
                    gate().in_features() == hidden && up().in_features() == hidden &&
                    up().out_features() == gate().out_features() &&
                    down().in_features() == gate().out_features() && down().out_features() == hidden,
                "DecoderLayer: the linears' shapes do not form a decoder layer");
    TORCH_CHECK(static_cast<int64_t>(dense.size()) == kLinears, "DecoderLayer: expected 7 dense weights");
    for (int64_t i = 0; i < kLinears; ++i) {
      TORCH_CHECK(dense[i].dim() == 2 && dense[i].scalar_type() == at::kFloat && dense[i].is_contiguous() &&
                      dense[i].size(0) == linears[i].out_features() &&
                      dense[i].size(1) == linears[i].in_features(),
                  "DecoderLayer: dense weight ", i, " must be contiguous float32 of its linear's shape");
    }
    for (const at::Tensor* norm : {&input_norm, &post_norm}) {
      TORCH_CHECK(norm->dim() == 1 && norm->scalar_type() == at::kFloat && norm->is_contiguous() &&
                      norm->size(0) == hidden,
                  "DecoderLayer: norm weights must be contiguous float32 of ", hidden, " values");
    }
  }

  // x + attention, then + MLP, for x (N, hidden) float32 holding one new token of each of N
  // sequences; the attention arguments are decode_attention's.
  at::Tensor decode(at::Tensor x, at::Tensor cos, at::Tensor signed_sin, at::Tensor cache_k,
                    at::Tensor cache_v, at::Tensor slots, at::Tensor positions) {
    const int64_t hidden = q().in_features();
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) == hidden,
                "DecoderLayer.decode: x must be float32 (tokens, ", hidden, ")");
    TORCH_CHECK(x.size(0) <= kMaxTokens, "DecoderLayer.decode: at most ", kMaxTokens, " tokens");
    const int64_t tokens = x.size(0);
    const float e = static_cast<float>(eps);
    at::Tensor h = x.contiguous();
    at::Tensor normed = at::empty_like(h);

    rms_norm_rows(h.data_ptr<float>(), input_norm.data_ptr<float>(), normed.data_ptr<float>(), tokens,
                  hidden, e);
    std::vector<at::Tensor> qkv = products({0, 1, 2}, normed, tokens);
    const at::Tensor attended = decode_attention(qkv[0], qkv[1], qkv[2], cos, signed_sin, cache_k,
                                                 cache_v, slots, positions);
    h = h + products({3}, attended, tokens)[0];

    rms_norm_rows(h.data_ptr<float>(), post_norm.data_ptr<float>(), normed.data_ptr<float>(), tokens,
                  hidden, e);
    std::vector<at::Tensor> gate_up = products({4, 5}, normed, tokens);
    silu_times(gate_up[0].data_ptr<float>(), gate_up[1].data_ptr<float>(), gate_up[0].numel());
    return h + products({6}, gate_up[0], tokens)[0];
  }

  // x W_i^T for the linears i of `which`, all with input x: from the codes in one parallel region for
  // up to trellis_max_tokens rows, else from the dense copies, which is faster there.
  std::vector<at::Tensor> products(std::initializer_list<int> which, const at::Tensor& x, int64_t tokens) const {
    std::vector<at::Tensor> out;
    if (tokens > trellis_max_tokens) {
      TORCH_CHECK(!dense.empty(), "DecoderLayer: the dense copies were dropped; every product is from the codes");
      for (int i : which) out.push_back(dense_linear(x, dense[i]));
      return out;
    }
    std::vector<Product> jobs;
    for (int i : which) jobs.push_back({&linears[i], x.data_ptr<float>()});
    return multiply(jobs, tokens);
  }

  const TrellisMatrix& q() const { return linears[0]; }
  const TrellisMatrix& k() const { return linears[1]; }
  const TrellisMatrix& v() const { return linears[2]; }
  const TrellisMatrix& o() const { return linears[3]; }
  const TrellisMatrix& gate() const { return linears[4]; }
  const TrellisMatrix& up() const { return linears[5]; }
  const TrellisMatrix& down() const { return linears[6]; }

  std::vector<TrellisMatrix> linears;
  std::vector<at::Tensor> dense;
  int64_t trellis_max_tokens;
  at::Tensor input_norm, post_norm;
  double eps;
};

}  // namespace trellis_cpu

TORCH_LIBRARY_FRAGMENT(trellis_cpu, m) {
  m.class_<trellis_cpu::DecoderLayer>("DecoderLayer")
      .def(torch::init<std::vector<at::Tensor>, std::vector<double>, std::vector<int64_t>,
                       std::vector<at::Tensor>, int64_t, at::Tensor, at::Tensor, double>())
      .def("decode", &trellis_cpu::DecoderLayer::decode)
      .def("set_trellis_max_tokens", [](const c10::intrusive_ptr<trellis_cpu::DecoderLayer>& self,
                                        int64_t rows) { self->trellis_max_tokens = rows; })
      // Every product from the codes from now on, and the dense copies released.
      .def("drop_dense", [](const c10::intrusive_ptr<trellis_cpu::DecoderLayer>& self) {
        self->dense.clear();
        self->trellis_max_tokens = trellis_cpu::kMaxTokens;
      });
}
