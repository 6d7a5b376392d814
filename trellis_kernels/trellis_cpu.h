// What the CPU kernels' two sources share: the quantized matrix as the product kernel reads it, and
// the pieces of a decode step that trellis_cpu_layer.cpp strings together. The layout is stated in
// trellis_kernels/cpu.py.

#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace trellis_cpu {

constexpr int64_t kTile = 16;       // tile rows and columns
constexpr int64_t kMaxTokens = 16;  // rows of x handled per call: a decode batch, not a prefill

// The mask of the first n of 16 lanes (none for n <= 0): the tail of a row that is not a multiple
// of 16 long.
inline __mmask16 first_lanes(int64_t n) {
  return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
}

// How a trellis state becomes its values (trellis_kernels/cpu.py names the same numbers): looked up
// in a state table passed with the matrix, or computed as trellis_runtime/codes.py defines it.
enum class Code : int64_t { kTable = 0, kMad = 1, kInst = 2 };

// One quantized linear, W = diag(s_out) H_out^T (scale * T) H_in diag(s_in), as the product kernel
// reads it: the packed codes of T, the state -> value table (empty for computed codes), the signs, the small Hadamard factors and
// factor = scale times both Hadamard normalisations. The constructor checks every tensor once.
struct TrellisMatrix {
  TrellisMatrix(at::Tensor codes, at::Tensor lut, at::Tensor input_signs, at::Tensor output_signs,
                at::Tensor input_hadamard, at::Tensor output_hadamard, double factor,
                int64_t state_bits, int64_t bits, int64_t vec, int64_t code);

  int64_t in_features() const { return codes.size(1) * kTile; }
  int64_t out_features() const { return codes.size(0) * kTile; }
  int64_t row_tiles() const { return codes.size(0); }

  // x_rot = H_in diag(s_in) x, for `tokens` rows.
  void rotate_input(const float* x, float* x_rot, int64_t tokens) const;
  // y_rot = x_rot T^T for the output rows of row tiles [begin, end).
  void multiply_rows(const float* x_rot, float* y_rot, int64_t tokens, int64_t begin,
                     int64_t end) const;
  // y = factor diag(s_out) H_out^T y_rot, in place.
  void finish_output(float* y_rot, int64_t tokens) const;

  at::Tensor codes, lut, input_signs, output_signs, input_hadamard, output_hadamard;
  double factor;
  int64_t state_bits, bits, vec;
  Code code;
};

// One product of a multiply() call: `tokens` rows of float32 input at x, times matrix^T.
struct Product {
  const TrellisMatrix* matrix;
  const float* x;
};

// x W^T for each product, as (tokens, out) float32 tensors. The row tiles of all of them are shared
// out in one parallel region, so products with a common input (q, k, v) cost one start of the threads.
std::vector<at::Tensor> multiply(const std::vector<Product>& products, int64_t tokens);

// y = x w^T for float32 x (tokens <= kMaxTokens, in) and bfloat16, float32 or int8 w (out, in),
// accumulated in float32: the exact weights (bf16 widened, int8 converted on the fly), each read
// once for all tokens; int8 rows' sums are multiplied by their float32 `scales`.
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w,
                        const std::optional<at::Tensor>& scales = std::nullopt);

// y = x / sqrt(mean(x^2) + eps) * weight for each of `rows` rows of length d.
void rms_norm_rows(const float* x, const float* weight, float* y, int64_t rows, int64_t d, float eps);

// exp of 16 floats, relative error below 2e-7; inputs below -87 give 0.
__m512 exp16(__m512 x);

// One decode step of attention, one new token per sequence: rotary on q and k, the cache write, and
// grouped-query attention over each sequence's cached positions (see trellis_cpu.cpp).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor cache_k,
                            at::Tensor cache_v, const at::Tensor& slots, const at::Tensor& positions);

}  // namespace trellis_cpu
