// CPU kernels for small batches (decode steps): products with packed trellis weights, read straight
// from the codes, and with dense bf16 or float32 weights, each read once for all rows of the batch.
//
// Built and loaded by trellis_kernels/cpu.py (which states the layout these functions assume) and tested
// against the torch references in tests/test_kernels_cpu.py. Requires AVX-512 (F, BW, DQ, VL) and F16C;
// uses VBMI2 and VNNI where the build enables them (cpu.py: optional_flags), with the same results.
//
// trellis_linear computes y = x W^T for W = diag(s_out) H_out^T (scale * T) H_in diag(s_in), where T
// holds the code values of the packed tiles and H_n is the unnormalised Hadamard transform
// S kron H_{2^p}, S a small Hadamard matrix or a block-diagonal I_k kron H_r of them. Instead of
// decoding W it rotates the activations, multiplies by T straight from the codes, and rotates the
// result back: the weights used are exactly the stored code values.

#include "trellis_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

namespace trellis_cpu {
namespace {

constexpr int64_t kMaxWords = 32;   // 8K words per tile, K <= 4
constexpr int64_t kTokenBlock = 4;  // rows of x whose accumulators share the registers

// Sylvester's transform (unnormalised) of 16 floats in a register: at stage h, lane j and lane j ^ h
// become their sum (the lower lane) and difference (the upper).
inline __m512 fwht16(__m512 v) {
  __m512 partner = _mm512_permute_ps(v, 0xB1);  // h = 1: lanes 1 0 3 2 ...
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), 0xAAAA, partner, v);
  partner = _mm512_permute_ps(v, 0x4E);  // h = 2: lanes 2 3 0 1 ...
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), 0xCCCC, partner, v);
  partner = _mm512_shuffle_f32x4(v, v, 0xB1);  // h = 4: 128-bit blocks 1 0 3 2
  v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), 0xF0F0, partner, v);
  partner = _mm512_shuffle_f32x4(v, v, 0x4E);  // h = 8: blocks 2 3 0 1
  return _mm512_mask_sub_ps(_mm512_add_ps(v, partner), 0xFF00, partner, v);
}

// Sylvester's transform (unnormalised) of a power-of-two length vector, in place: 16 lanes at a
// time from length 16 on, one butterfly at a time below.
void fwht(float* v, int64_t m) {
  if (m < 16) {
    for (int64_t h = 1; h < m; h *= 2) {
      for (int64_t i = 0; i < m; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < m; i += 16) _mm512_storeu_ps(v + i, fwht16(_mm512_loadu_ps(v + i)));
  for (int64_t h = 16; h < m; h *= 2) {
    for (int64_t i = 0; i < m; i += 2 * h) {
      for (int64_t j = i; j < i + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + h);
        _mm512_storeu_ps(v + j, _mm512_add_ps(a, b));
        _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, b));
      }
    }
  }
}

// (S kron H_{2^p}) v, or its transpose, unnormalised, for each of `rows` vectors of length n:
// the vector read as an r x 2^p matrix V becomes S V H_{2^p} (S^T V H_{2^p}). A block-diagonal S
// (I_k kron H_{r/k}) is mostly zeros, which are skipped.
void hadamard_rows(float* x, int64_t rows, int64_t n, const float* small, int64_t r, bool transpose) {
  const int64_t m = n / r;
  thread_local std::vector<float> mixed;
  mixed.resize(n);
  for (int64_t row = 0; row < rows; ++row) {
    float* v = x + row * n;
    for (int64_t block = 0; block < r; ++block) fwht(v + block * m, m);
    if (r == 1) continue;
    for (int64_t k = 0; k < m; k += 16) {
      const __mmask16 lanes = first_lanes(m - k);
      for (int64_t a = 0; a < r; ++a) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t b = 0; b < r; ++b) {
          const float h = transpose ? small[b * r + a] : small[a * r + b];
          if (h == 0.0f) continue;
          sum = _mm512_fmadd_ps(_mm512_set1_ps(h), _mm512_maskz_loadu_ps(lanes, v + b * m + k), sum);
        }
        _mm512_mask_storeu_ps(mixed.data() + a * m + k, lanes, sum);
      }
    }
    std::memcpy(v, mixed.data(), n * sizeof(float));
  }
}

// Where the states of each group of 16 consecutive steps start: word, next word (circular) and bit
// offset, as 16-lane permutation indices into a tile's words. Built once per (K, V).
struct WindowPlan {
  alignas(64) int32_t first[kTile * kTile];  // 16 lanes per group, at most 256 steps (V = 1)
  alignas(64) int32_t next[kTile * kTile];
  alignas(64) int32_t shift[kTile * kTile];
};

const WindowPlan& window_plan(int64_t bits, int64_t vec) {
  static const std::array<WindowPlan, 8> plans = [] {
    std::array<WindowPlan, 8> all{};
    for (int64_t k = 1; k <= 4; ++k) {
      for (int64_t v = 1; v <= 2; ++v) {
        WindowPlan& plan = all[(k - 1) * 2 + (v - 1)];
        const int64_t words = 8 * k;
        for (int64_t step = 0; step < kTile * kTile / v; ++step) {
          const int64_t start = step * k * v;
          plan.first[step] = static_cast<int32_t>(start / 32);
          plan.next[step] = static_cast<int32_t>((start / 32 + 1) % words);
          plan.shift[step] = static_cast<int32_t>(start % 32);
        }
      }
    }
    return all;
  }();
  return plans[(bits - 1) * 2 + (vec - 1)];
}

// The 32 bits from bit `shift` of each lane's word pair (high, low), most significant first: the
// funnel shift of AVX512-VBMI2 where the CPU has it, two shifts and an or otherwise. A shift of 0
// takes nothing of `low` (the variable right shift by 32 yields 0).
inline __m512i funnel(__m512i high, __m512i low, __m512i shift) {
#ifdef __AVX512VBMI2__
  return _mm512_shldv_epi32(high, low, shift);
#else
  return _mm512_or_si512(_mm512_sllv_epi32(high, shift),
                         _mm512_srlv_epi32(low, _mm512_sub_epi32(_mm512_set1_epi32(32), shift)));
#endif
}

// The values of 16 states under the computed codes, exactly as trellis_runtime/codes.py computes
// them (the same 32-bit integers, the same float32 rounding): vector integer arithmetic, no table.
// 1MAD: the byte sum of x = a*s + b, less its mean, over its standard deviation.
inline __m512 mad_values(__m512i states) {
  const __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(states, _mm512_set1_epi32(34038481)),
                                     _mm512_set1_epi32(76625530));
#ifdef __AVX512VNNI__
  // The four unsigned bytes times 1, summed onto -510 in one instruction.
  const __m512i centred = _mm512_dpbusd_epi32(_mm512_set1_epi32(-510), x, _mm512_set1_epi8(1));
#else
  // Bytes summed in pairs into 16 bits (unsigned times 1), then the pairs into 32 bits.
  const __m512i pairs = _mm512_maddubs_epi16(x, _mm512_set1_epi8(1));
  const __m512i centred = _mm512_sub_epi32(_mm512_madd_epi16(pairs, _mm512_set1_epi16(1)),
                                           _mm512_set1_epi32(510));
#endif
  return _mm512_mul_ps(_mm512_cvtepi32_ps(centred),
                       _mm512_set1_ps(static_cast<float>(1.0 / 147.800537109375)));
}

// 3INST: r = (x & 0x8FFF8FFF) ^ 0x3B603B60 for x = a*s + b; the two halves of r read as float16,
// added, over their RMS. Each half becomes a float32 without a conversion instruction: its sign
// moved to bit 31 and its other 15 bits to bits 27..13 read as the float16 value times 2^-112 (the
// exponents here are never 0 or 31, so every value is a normal float32 either way). The mask and
// xor are applied in that placement, and 2^112 joins the final multiply: the result, rounding
// included, is the same float32 (scaling by a power of two commutes with rounding).
inline __m512 inst_values(__m512i states) {
  const __m512i x = _mm512_add_epi32(_mm512_mullo_epi32(states, _mm512_set1_epi32(89226354)),
                                     _mm512_set1_epi32(64248484));
  constexpr int kAndThenXor = 0x6A;  // ternary-logic truth table of (a & b) ^ c
  const __m512i mask = _mm512_set1_epi32(static_cast<int>(0x81FFE000u));  // 0x8FFF placed
  const __m512i flip = _mm512_set1_epi32(0x076C0000);                     // 0x3B60 placed
  const __m512i high = _mm512_ternarylogic_epi32(_mm512_srai_epi32(x, 3), mask, flip, kAndThenXor);
  const __m512i low = _mm512_ternarylogic_epi32(_mm512_srai_epi32(_mm512_slli_epi32(x, 16), 3), mask,
                                                flip, kAndThenXor);
  constexpr float kTwoTo112 = 5.192296858534828e33f;
  return _mm512_mul_ps(_mm512_add_ps(_mm512_castsi512_ps(high), _mm512_castsi512_ps(low)),
                       _mm512_set1_ps(kTwoTo112 * static_cast<float>(1.0 / 1.2437085359793958)));
}

// Decodes groups of 16 trellis steps of a tile: group g holds 16*V weights, tile row g (V = 1) or
// rows 2g and 2g+1 (V = 2, from a table of two float16, slot 0 in the low half), 16 columns each,
// as float32 vectors. kCode says how a state becomes its values: looked up in the state table
// (any code, one 16-lane gather), or computed (1MAD, 3INST: a few integer operations, which cost a
// fraction of the gather).
template <int64_t kVec, Code kCode>
class GroupDecoder {
  static_assert(kCode == Code::kTable || kVec == 1, "computed codes give one value per state");

 public:
  static constexpr int64_t kValues = kVec;
  static constexpr int64_t kGroups = kTile * kTile / kVec / 16;

  GroupDecoder(const int32_t* lut, int64_t state_bits, int64_t bits)
      : words(8 * bits), lut_(lut), plan_(window_plan(bits, kVec)),
        two_bits_per_step_(bits * kVec == 2), low_mask_(first_lanes(words)),
        high_mask_(first_lanes(words - 16)),
        state_shift_(_mm_cvtsi32_si128(static_cast<int>(32 - state_bits))),
        lane_shift_(_mm512_load_si512(plan_.shift)) {
    if constexpr (kCode == Code::kTable) {
      // The state table is read at random: ask for all of it at once rather than miss line by line.
      for (int64_t i = 0; i < (int64_t{1} << state_bits); i += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(lut + i), _MM_HINT_T1);
      }
    }
  }

  // Group g's weights of the tile whose words start at `tile`.
  void decode(const int32_t* tile, int64_t g, __m512 (&w)[kVec]) const {
    const __m512i states = _mm512_srl_epi32(window(tile, g), state_shift_);
    if constexpr (kCode == Code::kMad) {
      w[0] = mad_values(states);
    } else if constexpr (kCode == Code::kInst) {
      w[0] = inst_values(states);
    } else {
      const __m512i values = _mm512_i32gather_epi32(states, lut_, 4);
      if constexpr (kVec == 2) {
        w[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(values));
        w[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(values, 1));
      } else {
        w[0] = _mm512_castsi512_ps(values);
      }
    }
  }

  const int64_t words;  // 32-bit words per tile

 private:
  // Each lane's state in the top L bits. At K*V = 2 bits per step (the CPU default, K = 2, V = 1)
  // group g's 16 states start 2 bits apart in word g, so two broadcast words serve every lane;
  // otherwise each lane's words are picked from the tile by permutation.
  __m512i window(const int32_t* tile, int64_t g) const {
    if (two_bits_per_step_) {
      return funnel(_mm512_set1_epi32(tile[g]), _mm512_set1_epi32(tile[(g + 1) % words]), lane_shift_);
    }
    const __m512i low = _mm512_maskz_loadu_epi32(low_mask_, tile);
    const __m512i high = _mm512_maskz_loadu_epi32(high_mask_, tile + 16);
    return funnel(_mm512_permutex2var_epi32(low, _mm512_load_si512(plan_.first + 16 * g), high),
                  _mm512_permutex2var_epi32(low, _mm512_load_si512(plan_.next + 16 * g), high),
                  _mm512_load_si512(plan_.shift + 16 * g));
  }

  const int32_t* lut_;
  const WindowPlan& plan_;
  const bool two_bits_per_step_;
  const __mmask16 low_mask_, high_mask_;
  const __m128i state_shift_;
  const __m512i lane_shift_;  // 2j in lane j: group 0's shifts, every group's at 2 bits per step
};

// The sums of 16 vectors, as one vector: lane i = the sum of a[i]'s lanes. Four rounds of
// shuffle-and-add halve the partial sums per vector, instead of 16 separate reductions.
inline __m512 sum_each(const __m512 (&a)[16]) {
  __m512 halves[8], quarters[4], eighths[2];
  for (int i = 0; i < 8; ++i) {  // [a_2i's 8 partial sums | a_2i+1's 8]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit block k: a_4i+k's 4 partial sums
    quarters[i] = _mm512_add_ps(_mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0x88),
                                _mm512_shuffle_f32x4(halves[2 * i], halves[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {  // block k: 2 partial sums each of a_8i+k, a_8i+4+k
    eighths[i] = _mm512_add_ps(_mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0x44),
                               _mm512_shuffle_ps(quarters[2 * i], quarters[2 * i + 1], 0xEE));
  }
  // Block k: the sums of a_k, a_4+k, a_8+k, a_12+k; lane 4k + m holds a_4m+k's, put back in order.
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(eighths[0], eighths[1], 0x88),
                                    _mm512_shuffle_ps(eighths[0], eighths[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), sums);
}

// Up to kDirectTokens rows of x, each weight is multiplied as it is decoded; beyond, the
// accumulators would not fit the registers beside the decoder's, so product_many decodes into a
// buffer in L1 and multiplies from there.
constexpr int64_t kDirectTokens = 2;

// y_rot[t, rt*16 + row] for row tiles [begin, end) and kTokens <= kDirectTokens rows of x_rot. Tile
// by tile along the row strip, each tile's words and x's 16 inputs read once: 16 accumulators, one
// per (tile row, x row) of the 16 / kTokens tile rows of a pass, and kTokens passes per strip.
template <class Decoder, int64_t kTokens>
void product_direct(const int32_t* codes, const Decoder& decoder, const float* x_rot, float* y_rot,
                    int64_t col_tiles, int64_t in_features, int64_t out_features, int64_t begin,
                    int64_t end) {
  constexpr int64_t kVec = Decoder::kValues, kGroupsPerPass = Decoder::kGroups / kTokens;
  for (int64_t rt = begin; rt < end; ++rt) {
    const int32_t* tile_row = codes + rt * col_tiles * decoder.words;
    for (int64_t pass = 0; pass < kTokens; ++pass) {
      __m512 acc[kTile];  // acc[(group * kVec + value) * kTokens + token]
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t ct = 0; ct < col_tiles; ++ct) {
        const int32_t* tile = tile_row + ct * decoder.words;
        __m512 xv[kTokens];
        for (int64_t t = 0; t < kTokens; ++t) {
          xv[t] = _mm512_loadu_ps(x_rot + t * in_features + ct * kTile);
        }
        for (int64_t j = 0; j < kGroupsPerPass; ++j) {
          __m512 w[kVec];
          decoder.decode(tile, pass * kGroupsPerPass + j, w);
          for (int64_t r = 0; r < kVec; ++r) {
            for (int64_t t = 0; t < kTokens; ++t) {
              __m512& a = acc[(j * kVec + r) * kTokens + t];
              a = _mm512_fmadd_ps(w[r], xv[t], a);
            }
          }
        }
      }
      alignas(64) float sums[kTile];
      _mm512_store_ps(sums, sum_each(acc));
      for (int64_t i = 0; i < kTile; ++i) {
        const int64_t row = rt * kTile + pass * kTile / kTokens + i / kTokens;
        y_rot[(i % kTokens) * out_features + row] = sums[i];
      }
    }
  }
}

// The many-row product decodes kBlockRows output rows at a time into a buffer (kBlockRows x in floats,
// 24 KiB at in = 1536, so it stays in L1) and passes every row of x over them in blocks of
// kTokenBlock: each 16 weights and 16 inputs loaded feed kBlockRows x kTokenBlock multiply-adds.
constexpr int64_t kBlockRows = 4;

// y_rot[t, row + r] for the kBlockRows rows of decoded weights in `weights` (row-major, in floats
// each) and kTokens rows of x_rot.
template <int64_t kTokens>
void block_product(const float* weights, const float* x_rot, float* y_rot, int64_t in, int64_t out,
                   int64_t row) {
  __m512 acc[kBlockRows][kTokens];
  for (auto& r : acc) {
    for (auto& a : r) a = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < in; k += kTile) {
    __m512 w[kBlockRows];
    for (int64_t r = 0; r < kBlockRows; ++r) w[r] = _mm512_loadu_ps(weights + r * in + k);
    for (int64_t t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_loadu_ps(x_rot + t * in + k);
      for (int64_t r = 0; r < kBlockRows; ++r) acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
    }
  }
  for (int64_t r = 0; r < kBlockRows; ++r) {
    for (int64_t t = 0; t < kTokens; ++t) y_rot[t * out + row + r] = _mm512_reduce_add_ps(acc[r][t]);
  }
}

// y_rot for row tiles [begin, end) and any number of rows of x_rot: each weight decoded once.
template <class Decoder>
void product_many(const int32_t* codes, const Decoder& decoder, const float* x_rot, float* y_rot,
                  int64_t tokens, int64_t col_tiles, int64_t in, int64_t out, int64_t begin,
                  int64_t end) {
  constexpr int64_t kVec = Decoder::kValues, kGroupsPerBlock = kBlockRows / kVec;
  thread_local std::vector<float> buffer;
  buffer.resize(kBlockRows * in);
  float* weights = buffer.data();
  for (int64_t rt = begin; rt < end; ++rt) {
    const int32_t* tile_row = codes + rt * col_tiles * decoder.words;
    for (int64_t g0 = 0; g0 < Decoder::kGroups; g0 += kGroupsPerBlock) {
      for (int64_t j = 0; j < kGroupsPerBlock; ++j) {
        for (int64_t ct = 0; ct < col_tiles; ++ct) {
          __m512 w[kVec];
          decoder.decode(tile_row + ct * decoder.words, g0 + j, w);
          for (int64_t r = 0; r < kVec; ++r) {
            _mm512_storeu_ps(weights + (j * kVec + r) * in + ct * kTile, w[r]);
          }
        }
      }
      const int64_t row = rt * kTile + g0 * kVec;
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokenBlock) {
        const float* xb = x_rot + t0 * in;
        float* yb = y_rot + t0 * out;
        switch (std::min(kTokenBlock, tokens - t0)) {
          case 1: block_product<1>(weights, xb, yb, in, out, row); break;
          case 2: block_product<2>(weights, xb, yb, in, out, row); break;
          case 3: block_product<3>(weights, xb, yb, in, out, row); break;
          default: block_product<kTokenBlock>(weights, xb, yb, in, out, row); break;
        }
      }
    }
  }
}

// y_rot for row tiles [begin, end) and `tokens` rows of x_rot, by the path that suits the count.
template <int64_t kVec, Code kCode>
void product_rows(const int32_t* codes, const int32_t* lut, const float* x_rot, float* y_rot,
                  int64_t tokens, int64_t col_tiles, int64_t in_features, int64_t out_features,
                  int64_t state_bits, int64_t bits, int64_t begin, int64_t end) {
  static_assert(kDirectTokens == 2, "the direct cases below");
  using Decoder = GroupDecoder<kVec, kCode>;
  const Decoder decoder(lut, state_bits, bits);
  if (tokens == 1) {
    product_direct<Decoder, 1>(codes, decoder, x_rot, y_rot, col_tiles, in_features, out_features, begin, end);
  } else if (tokens == 2) {
    product_direct<Decoder, 2>(codes, decoder, x_rot, y_rot, col_tiles, in_features, out_features, begin, end);
  } else {
    product_many<Decoder>(codes, decoder, x_rot, y_rot, tokens, col_tiles, in_features, out_features,
                          begin, end);
  }
}

void check_small_hadamard(const at::Tensor& h, int64_t n, const char* name) {
  TORCH_CHECK(h.dim() == 2 && h.size(0) == h.size(1) && h.scalar_type() == at::kFloat &&
                  h.is_contiguous() && n % h.size(0) == 0,
              "trellis_linear: ", name, " must be a contiguous float32 r x r matrix with r dividing ", n);
  const int64_t m = n / h.size(0);
  TORCH_CHECK(m > 0 && (m & (m - 1)) == 0, "trellis_linear: ", n, " / ", h.size(0),
              " is not a power of two");
}

}  // namespace

TrellisMatrix::TrellisMatrix(at::Tensor codes_, at::Tensor lut_, at::Tensor input_signs_,
                             at::Tensor output_signs_, at::Tensor input_hadamard_,
                             at::Tensor output_hadamard_, double factor_, int64_t state_bits_,
                             int64_t bits_, int64_t vec_, int64_t code_)
    : codes(std::move(codes_)), lut(std::move(lut_)), input_signs(std::move(input_signs_)),
      output_signs(std::move(output_signs_)), input_hadamard(std::move(input_hadamard_)),
      output_hadamard(std::move(output_hadamard_)), factor(factor_), state_bits(state_bits_),
      bits(bits_), vec(vec_), code(static_cast<Code>(code_)) {
  TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kInt && codes.is_contiguous() &&
                  codes.size(2) == 8 * bits,
              "trellis_linear: codes must be contiguous int32 (out/16, in/16, 8K)");
  TORCH_CHECK(bits >= 1 && 8 * bits <= kMaxWords && (vec == 1 || vec == 2) && state_bits <= 16 &&
                  bits * vec < state_bits,
              "trellis_linear: unsupported (L, K, V)");
  TORCH_CHECK(code_ >= 0 && code_ <= 2, "trellis_linear: unknown code ", code_);
  if (code == Code::kTable) {
    TORCH_CHECK(lut.dim() == 1 && lut.scalar_type() == at::kInt && lut.is_contiguous() &&
                    lut.size(0) == (int64_t{1} << state_bits),
                "trellis_linear: lut must be contiguous int32 of 2^L entries");
  } else {
    TORCH_CHECK(vec == 1, "trellis_linear: computed codes have V = 1");
  }
  TORCH_CHECK(input_signs.scalar_type() == at::kFloat && input_signs.numel() == in_features() &&
                  output_signs.scalar_type() == at::kFloat &&
                  output_signs.numel() == out_features() && input_signs.is_contiguous() &&
                  output_signs.is_contiguous(),
              "trellis_linear: signs must be contiguous float32 vectors of in and out features");
  check_small_hadamard(input_hadamard, in_features(), "input_hadamard");
  check_small_hadamard(output_hadamard, out_features(), "output_hadamard");
}

void TrellisMatrix::rotate_input(const float* x, float* x_rot, int64_t tokens) const {
  const int64_t n = in_features();
  const float* signs = input_signs.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < n; ++i) x_rot[t * n + i] = x[t * n + i] * signs[i];
  }
  hadamard_rows(x_rot, tokens, n, input_hadamard.data_ptr<float>(), input_hadamard.size(0),
                /*transpose=*/false);
}

void TrellisMatrix::multiply_rows(const float* x_rot, float* y_rot, int64_t tokens, int64_t begin,
                                  int64_t end) const {
  const int32_t* code_ptr = codes.data_ptr<int32_t>();
  const int32_t* lut_ptr = lut.data_ptr<int32_t>();
  const int64_t in = in_features(), out = out_features(), col_tiles = codes.size(1);
  const auto run = [&](auto product) {
    product(code_ptr, lut_ptr, x_rot, y_rot, tokens, col_tiles, in, out, state_bits, bits, begin, end);
  };
  if (code == Code::kMad) {
    run(product_rows<1, Code::kMad>);
  } else if (code == Code::kInst) {
    run(product_rows<1, Code::kInst>);
  } else if (vec == 2) {
    run(product_rows<2, Code::kTable>);
  } else {
    run(product_rows<1, Code::kTable>);
  }
}

void TrellisMatrix::finish_output(float* y_rot, int64_t tokens) const {
  const int64_t n = out_features();
  hadamard_rows(y_rot, tokens, n, output_hadamard.data_ptr<float>(), output_hadamard.size(0),
                /*transpose=*/true);
  const float* signs = output_signs.data_ptr<float>();
  const float f = static_cast<float>(factor);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < n; ++i) y_rot[t * n + i] *= signs[i] * f;
  }
}

std::vector<at::Tensor> multiply(const std::vector<Product>& products, int64_t tokens) {
  std::vector<at::Tensor> x_rot, y;
  std::vector<int64_t> first_tile{0};  // product p owns tiles [first_tile[p], first_tile[p + 1])
  for (const Product& p : products) {
    const TrellisMatrix& m = *p.matrix;
    x_rot.push_back(at::empty({tokens, m.in_features()}, at::kFloat));
    m.rotate_input(p.x, x_rot.back().data_ptr<float>(), tokens);
    y.push_back(at::empty({tokens, m.out_features()}, at::kFloat));
    first_tile.push_back(first_tile.back() + m.row_tiles());
  }
  // One parallel region over every product's row tiles: the threads start and meet once.
  at::parallel_for(0, first_tile.back(), 1, [&](int64_t begin, int64_t end) {
    for (size_t p = 0; p < products.size(); ++p) {
      const int64_t lo = std::max(begin, first_tile[p]), hi = std::min(end, first_tile[p + 1]);
      if (lo < hi) {
        products[p].matrix->multiply_rows(x_rot[p].data_ptr<float>(), y[p].data_ptr<float>(), tokens,
                                          lo - first_tile[p], hi - first_tile[p]);
      }
    }
  });
  for (size_t p = 0; p < products.size(); ++p) {
    products[p].matrix->finish_output(y[p].data_ptr<float>(), tokens);
  }
  return y;
}

namespace {

at::Tensor trellis_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut,
                          const at::Tensor& input_signs, const at::Tensor& output_signs,
                          const at::Tensor& input_hadamard, const at::Tensor& output_hadamard,
                          double factor, int64_t state_bits, int64_t bits, int64_t vec, int64_t code) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "trellis_linear: x must be float32 (tokens, in)");
  const TrellisMatrix matrix(codes, lut, input_signs, output_signs, input_hadamard, output_hadamard,
                             factor, state_bits, bits, vec, code);
  TORCH_CHECK(x.size(1) == matrix.in_features(), "trellis_linear: x has ", x.size(1),
              " features, codes ", matrix.in_features());
  const at::Tensor xc = x.contiguous();
  return multiply({{&matrix, xc.data_ptr<float>()}}, x.size(0))[0];
}

// 16 weights (the lanes set in `lanes`) as float32: bf16 widened (a bf16 is the top half of a
// float32), int8 converted (their rows' scales are applied to the sums), float32 as they are.
inline __m512 load_weights(const uint16_t* w, __mmask16 lanes) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, w)), 16));
}

inline __m512 load_weights(const int8_t* w, __mmask16 lanes) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, w)));
}

inline __m512 load_weights(const float* w, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, w); }

// y[t, row + r] for kRows rows of w from `row` and kTokens rows of x, each row's sum times its
// scale where `scales` is given (int8 rows): each 16 weights are loaded once and used for every
// token, so the bytes read do not grow with the tokens. The rows kPrefetchRows ahead are requested
// while these are multiplied (30% faster on the 49152-row SmolLM2 head).
template <typename Weight, int64_t kRows, int64_t kTokens>
void dense_rows(const Weight* w, const float* scales, const float* x, float* y, int64_t in,
                int64_t out, int64_t row) {
  constexpr int64_t kPrefetchRows = 16;
  constexpr int64_t kLine = 64 / sizeof(Weight);  // weights per cache line
  __m512 acc[kRows][kTokens];
  for (auto& accs : acc) {
    for (auto& a : accs) a = _mm512_setzero_ps();
  }
  const bool prefetch = row + kRows + kPrefetchRows <= out;
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 lanes = first_lanes(in - k);
    __m512 wv[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const Weight* wr = w + (row + r) * in + k;
      wv[r] = load_weights(wr, lanes);
      if (prefetch && k % kLine == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * in), _MM_HINT_T0);
      }
    }
    for (int64_t t = 0; t < kTokens; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, x + t * in + k);
      for (int64_t r = 0; r < kRows; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    const float scale = scales == nullptr ? 1.0f : scales[row + r];
    for (int64_t t = 0; t < kTokens; ++t) y[t * out + row + r] = _mm512_reduce_add_ps(acc[r][t]) * scale;
  }
}

// dense_rows for kRows rows from `row` and all tokens, in blocks of at most 4 tokens, whose
// accumulators fit the registers beside the loaded weights (the rows stay in L1 between blocks).
template <typename Weight, int64_t kRows>
void dense_token_blocks(const Weight* w, const float* scales, const float* x, float* y,
                        int64_t tokens, int64_t in, int64_t out, int64_t row) {
  for (int64_t t0 = 0; t0 < tokens; t0 += 4) {
    const float* xb = x + t0 * in;
    float* yb = y + t0 * out;
    switch (std::min<int64_t>(4, tokens - t0)) {
      case 1: dense_rows<Weight, kRows, 1>(w, scales, xb, yb, in, out, row); break;
      case 2: dense_rows<Weight, kRows, 2>(w, scales, xb, yb, in, out, row); break;
      case 3: dense_rows<Weight, kRows, 3>(w, scales, xb, yb, in, out, row); break;
      default: dense_rows<Weight, kRows, 4>(w, scales, xb, yb, in, out, row); break;
    }
  }
}

// y (tokens, out) = x w^T over the threads: blocks of kRowBlock rows, then single rows.
template <typename Weight>
void dense_product(const Weight* w, const float* scales, const float* x, float* y, int64_t tokens,
                   int64_t in, int64_t out) {
  constexpr int64_t kRowBlock = 4;
  at::parallel_for(0, (out + kRowBlock - 1) / kRowBlock, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin * kRowBlock; row < std::min(out, end * kRowBlock);) {
      if (row + kRowBlock <= out) {
        dense_token_blocks<Weight, kRowBlock>(w, scales, x, y, tokens, in, out, row);
        row += kRowBlock;
      } else {
        dense_token_blocks<Weight, 1>(w, scales, x, y, tokens, in, out, row);
        row += 1;
      }
    }
  });
}

}  // namespace

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "dense_linear: x must be contiguous float32 (tokens, in)");
  const auto type = w.scalar_type();
  TORCH_CHECK(w.dim() == 2 && (type == at::kBFloat16 || type == at::kFloat || type == at::kChar) &&
                  w.is_contiguous() && w.size(1) == x.size(1),
              "dense_linear: w must be contiguous bfloat16, float32 or int8 (out, in) matching x");
  TORCH_CHECK(scales.has_value() == (type == at::kChar),
              "dense_linear: int8 weights need their row scales, and only they take scales");
  TORCH_CHECK(!scales || (scales->dim() == 1 && scales->scalar_type() == at::kFloat &&
                          scales->is_contiguous() && scales->size(0) == w.size(0)),
              "dense_linear: scales must be contiguous float32, one per row of w");
  TORCH_CHECK(x.size(0) <= kMaxTokens, "dense_linear: at most ", kMaxTokens, " tokens per call");
  const int64_t tokens = x.size(0), in = x.size(1), out = w.size(0);
  at::Tensor y = at::empty({tokens, out}, x.options());
  if (type == at::kBFloat16) {
    dense_product(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), nullptr,
                  x.data_ptr<float>(), y.data_ptr<float>(), tokens, in, out);
  } else if (type == at::kChar) {
    dense_product(w.data_ptr<int8_t>(), scales->data_ptr<float>(), x.data_ptr<float>(),
                  y.data_ptr<float>(), tokens, in, out);
  } else {
    dense_product(w.data_ptr<float>(), nullptr, x.data_ptr<float>(), y.data_ptr<float>(), tokens, in, out);
  }
  return y;
}

void rms_norm_rows(const float* x, const float* weight, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* in = x + row * d;
    float* out = y + row * d;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < d; ++i) squares += in[i] * in[i];
    const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[i] = in[i] * inverse * weight[i];
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                  weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.is_contiguous(),
              "rms_norm: float32 x (..., d) and weight (d,) expected");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t d = weight.size(0), rows = d == 0 ? 0 : xc.numel() / d;
  rms_norm_rows(xc.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, d,
                static_cast<float>(eps));
  return y;
}

// exp of 16 floats: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial
// (relative error below 2e-7, about what expf gives); inputs below -87 (softmax tails) give 0.
__m512 exp16(__m512 x) {
  const __m512 ln2 = _mm512_set1_ps(0.6931471805599453f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(n, ln2, x);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

namespace {

// The first `count` lanes: query . key_j for keys j = 0..count-1 of length dim at `keys` (row-major);
// the other lanes -inf, so they vanish from a softmax. Each key's products are summed in one vector,
// and the 16 vectors are reduced together by a transposing tree (45 operations, not 16 reductions).
__m512 dot16(const float* query, const float* keys, int64_t dim, int64_t count) {
  __m512 sums[16];
  for (int64_t j = 0; j < 16; ++j) {
    sums[j] = _mm512_setzero_ps();
    if (j >= count) continue;
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 lanes = first_lanes(dim - d);
      sums[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, query + d),
                                _mm512_maskz_loadu_ps(lanes, keys + j * dim + d), sums[j]);
    }
  }
  __m512 pairs[8], quads[4], halves[2];
  for (int p = 0; p < 8; ++p) {  // within each 128-bit lane: key 2p at positions 0, 2; 2p + 1 at 1, 3
    pairs[p] = _mm512_add_ps(_mm512_unpacklo_ps(sums[2 * p], sums[2 * p + 1]),
                             _mm512_unpackhi_ps(sums[2 * p], sums[2 * p + 1]));
  }
  for (int p = 0; p < 4; ++p) {  // within each 128-bit lane: keys 4p .. 4p + 3 at positions 0 .. 3
    quads[p] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * p], pairs[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(pairs[2 * p], pairs[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int p = 0; p < 2; ++p) {  // 128-bit lanes summed in pairs
    halves[p] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * p], quads[2 * p + 1], 0b10001000),
                              _mm512_shuffle_f32x4(quads[2 * p], quads[2 * p + 1], 0b11011101));
  }
  const __m512 dots = _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0b10001000),
                                    _mm512_shuffle_f32x4(halves[0], halves[1], 0b11011101));
  const __mmask16 valid = first_lanes(count);
  return _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), dots);
}

// out (dim) = inverse * sum_j weights[j] * values[j] for `count` rows of length dim at `values`,
// with up to 8 vectors of out held in registers across all rows.
void weighted_sum(const float* weights, float inverse, const float* values, int64_t count, int64_t dim,
                  float* out) {
  for (int64_t d0 = 0; d0 < dim; d0 += 8 * 16) {
    __m512 acc[8];
    for (auto& a : acc) a = _mm512_setzero_ps();
    const int64_t width = std::min<int64_t>(8 * 16, dim - d0);
    for (int64_t j = 0; j < count; ++j) {
      const __m512 weight = _mm512_set1_ps(weights[j]);
      const float* row = values + j * dim + d0;
      for (int64_t c = 0; c < 8 && c * 16 < width; ++c) {
        acc[c] = _mm512_fmadd_ps(weight, _mm512_maskz_loadu_ps(first_lanes(width - c * 16),
                                                               row + c * 16), acc[c]);
      }
    }
    for (int64_t c = 0; c < 8 && c * 16 < width; ++c) {
      _mm512_mask_storeu_ps(out + d0 + c * 16, first_lanes(width - c * 16),
                            _mm512_mul_ps(acc[c], _mm512_set1_ps(inverse)));
    }
  }
}

}  // namespace

// One decode step of attention for N sequences, one new token each (a decode batch):
// rotate q and k by the rotary factors (x * cos + roll(x, D/2) * signed_sin, as the model does),
// write k and v into the cache at (slot, position), and attend each query head to positions
// 0..position of its sequence through its kv head (grouped-query attention), scaled by 1/sqrt(D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& signed_sin, at::Tensor cache_k,
                            at::Tensor cache_v, const at::Tensor& slots, const at::Tensor& positions) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() &&
                  cache_k.scalar_type() == at::kFloat && cache_v.scalar_type() == at::kFloat &&
                  cache_k.is_contiguous() && cache_v.is_contiguous(),
              "decode_attention: caches must be contiguous float32 (slots, kv_heads, length, head_dim)");
  const int64_t kv_heads = cache_k.size(1), length = cache_k.size(2), dim = cache_k.size(3);
  const int64_t tokens = q.size(0);
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && q.scalar_type() == at::kFloat &&
                  k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  q.size(1) % (kv_heads * dim) == 0 && k.size(1) == kv_heads * dim &&
                  v.size(1) == kv_heads * dim && k.size(0) == tokens && v.size(0) == tokens,
              "decode_attention: q (N, heads * D), k and v (N, kv_heads * D) float32 expected");
  TORCH_CHECK(cos.numel() == tokens * dim && signed_sin.numel() == tokens * dim &&
                  cos.scalar_type() == at::kFloat && signed_sin.scalar_type() == at::kFloat &&
                  dim % 2 == 0,
              "decode_attention: rotary factors must be float32 with N * head_dim values");
  TORCH_CHECK(slots.numel() == tokens && positions.numel() == tokens &&
                  slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "decode_attention: slots and positions must be int64 of N values");
  const int64_t heads = q.size(1) / dim, group = heads / kv_heads;
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor cosc = cos.contiguous(), sinc = signed_sin.contiguous();
  const at::Tensor slot_t = slots.contiguous(), position_t = positions.contiguous();
  const int64_t* slot = slot_t.data_ptr<int64_t>();
  const int64_t* position = position_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < cache_k.size(0) && position[i] >= 0 &&
                    position[i] < length,
                "decode_attention: slot or position outside the cache");
    for (int64_t j = 0; j < i; ++j) {
      TORCH_CHECK(slot[j] != slot[i], "decode_attention: one token per sequence expected");
    }
  }
  at::Tensor q_rot = at::empty({tokens, heads, dim}, q.options());
  float* qr = q_rot.data_ptr<float>();
  float* ck = cache_k.data_ptr<float>();
  float* cv = cache_v.data_ptr<float>();
  const int64_t half = dim / 2;
  auto rotate = [&](const float* in, float* out, const float* c, const float* s) {
    for (int64_t d = 0; d < half; ++d) out[d] = in[d] * c[d] + in[d + half] * s[d];
    for (int64_t d = half; d < dim; ++d) out[d] = in[d] * c[d] + in[d - half] * s[d];
  };
  auto at_cache = [&](float* cache, int64_t i, int64_t h) {
    return cache + ((slot[i] * kv_heads + h) * length + position[i]) * dim;
  };
  for (int64_t i = 0; i < tokens; ++i) {
    const float* c = cosc.data_ptr<float>() + i * dim;
    const float* s = sinc.data_ptr<float>() + i * dim;
    for (int64_t h = 0; h < heads; ++h) {
      rotate(qc.data_ptr<float>() + (i * heads + h) * dim, qr + (i * heads + h) * dim, c, s);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      rotate(kc.data_ptr<float>() + (i * kv_heads + h) * dim, at_cache(ck, i, h), c, s);
      std::memcpy(at_cache(cv, i, h), vc.data_ptr<float>() + (i * kv_heads + h) * dim,
                  dim * sizeof(float));
    }
  }

  at::Tensor out = at::empty({tokens, heads * dim}, q.options());
  float* o = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  // One task per query head: a single sequence still has work for both threads (its kv heads alone
  // would split 3 to 2 ways unevenly); the group sharing a kv head reads its keys from cache.
  at::parallel_for(0, tokens * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, head = task % heads, h = head / group, keys = position[i] + 1;
      const float* key0 = ck + (slot[i] * kv_heads + h) * length * dim;
      const float* value0 = cv + (slot[i] * kv_heads + h) * length * dim;
      scores.resize((keys + 15) / 16 * 16);
      const float* query = qr + (i * heads + head) * dim;
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int64_t j = 0; j < keys; j += 16) {
        const __m512 block = _mm512_mul_ps(dot16(query, key0 + j * dim, dim, std::min<int64_t>(16, keys - j)),
                                           _mm512_set1_ps(scale));
        _mm512_storeu_ps(&scores[j], block);
        top = _mm512_max_ps(top, block);
      }
      const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 16) {
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(&scores[j]), shift));
        _mm512_storeu_ps(&scores[j], e);
        total = _mm512_add_ps(total, e);
      }
      weighted_sum(scores.data(), 1.0f / _mm512_reduce_add_ps(total), value0, keys, dim,
                   o + (i * heads + head) * dim);
    }
  });
  return out;
}

}  // namespace trellis_cpu

TORCH_LIBRARY(trellis_cpu, m) {
  using namespace trellis_cpu;
  m.def("trellis_linear(Tensor x, Tensor codes, Tensor lut, Tensor input_signs, Tensor output_signs, "
        "Tensor input_hadamard, Tensor output_hadamard, float factor, int state_bits, int bits, "
        "int vec, int code) -> Tensor",
        &trellis_linear);
  m.def("dense_linear(Tensor x, Tensor w, Tensor? scales=None) -> Tensor", &dense_linear);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor signed_sin, "
        "Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, Tensor positions) -> Tensor",
        &decode_attention);
}
