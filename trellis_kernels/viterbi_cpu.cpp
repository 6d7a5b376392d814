// Viterbi on the bitshift trellis, on CPU: one tile per thread at a time, OpenMP over tiles.
//
// State s has L bits and a step moves to ((s << KV) | c) mod 2^L, so with F = 2^KV and
// G = 2^(L-KV) the predecessors of s are j*G + (s >> KV) for j < F, and the F successors
// h*F .. h*F+F-1 of group h share them. Each step, per tile:
//
//     m[h] = min_j cost[j*G + h]
//     next[h*F + c] = |v[h*F + c] - x_t|^2 + m[h]
//
// Both loops run over contiguous arrays of groups or states, so the compiler vectorizes them. The
// tile's group minima (T/V - 1 steps x G floats) and its two cost arrays stay in the thread's own
// workspace; the trace-back recomputes the F candidates of one group per step from them, as the
// torch reference does. Costs are full squared errors, summed in float32 in the order above.
// Ties: the lowest final state of equal costs, then, step by step back, the lowest predecessor, as
// in the torch reference (trellis_runtime.viterbi) and the Triton kernel; a near-tie may fall
// differently, as the three round their sums differently.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace trellis_viterbi {
namespace {

constexpr int64_t kMinStateBits = 8;
constexpr int64_t kMaxStateBits = 16;
constexpr int64_t kMaxStepBits = 8;  // as the Triton kernel: K*V <= 8 for K <= 4, V <= 2
constexpr float kInfinity = std::numeric_limits<float>::infinity();

struct Trellis {
  int64_t state_bits, step_bits, vec, steps;
  int64_t states() const { return int64_t{1} << state_bits; }
  int64_t groups() const { return int64_t{1} << (state_bits - step_bits); }
  int64_t fan() const { return int64_t{1} << step_bits; }
};

// One thread's memory for one tile at a time.
struct Workspace {
  std::vector<float> cost, next, minima;  // minima: each step's group minima, (T/V - 1) x G
  std::vector<float> rotated;
  std::vector<int64_t> path;

  explicit Workspace(const Trellis& t)
      : cost(t.states()), next(t.states()), minima(std::max<int64_t>(t.steps - 1, 1) * t.groups()),
        rotated(t.steps * t.vec), path(t.steps) {}
};

// |v[s] - x|^2; `planes` holds the values slot-major: planes[v * S + s]. The forward loops and the
// trace-back both sum through this one function, and the library is built without contracting
// a*b+c into fused multiply-adds, so vector and scalar code give the same bits.
template <int VEC>
inline float branch_cost(const float* __restrict planes, int64_t states, int64_t s,
                         const float* __restrict x) {
  const float d0 = planes[s] - x[0];
  if constexpr (VEC == 1) {
    return d0 * d0;
  } else {
    const float d1 = planes[states + s] - x[1];
    return d0 * d0 + d1 * d1;
  }
}

// The cost of each state at step 0: its branch cost, or infinity where an overlap (>= 0) forbids it.
template <int VEC>
inline float start_cost(const Trellis& t, const float* planes, int64_t s, const float* x,
                        int64_t overlap) {
  if (overlap >= 0 && (s >> t.step_bits) != overlap) return kInfinity;
  return branch_cost<VEC>(planes, t.states(), s, x);
}

// next[s] = |v[s] - x|^2 + minima[s >> KV] where a group has fewer than 8 successors (F = 2 or 4:
// V = 1 at K <= 2): 8 states at a time, each vector's F-fold repeated minima permuted from one load,
// with the scalar loop's float operations in its order (the same bits).
template <int VEC>
void successors_of_small_groups(const Trellis& t, const float* __restrict planes,
                                const float* __restrict x, const float* __restrict minima,
                                float* __restrict next) {
  const int64_t states = t.states();
  const int step_bits = static_cast<int>(t.step_bits);
  int64_t s = 0;
#ifdef __AVX2__
  const int64_t fan = t.fan();
  const __m256i spread = fan == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                  : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 x0 = _mm256_set1_ps(x[0]);
  for (; s + 8 <= states; s += 8) {
    const float* m = minima + (s >> step_bits);
    // Only the 8 / F minima this vector uses are read: the last group's may end the array.
    const __m128 loaded = fan == 4 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(m)))
                                   : _mm_loadu_ps(m);
    const __m256 group_min = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(loaded), spread);
    const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(planes + s), x0);
    __m256 cost = _mm256_mul_ps(d0, d0);
    if constexpr (VEC == 2) {
      const __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(planes + states + s), _mm256_set1_ps(x[1]));
      cost = _mm256_add_ps(cost, _mm256_mul_ps(d1, d1));
    }
    _mm256_storeu_ps(next + s, _mm256_add_ps(cost, group_min));
  }
#endif
  for (; s < states; ++s) next[s] = branch_cost<VEC>(planes, states, s, x) + minima[s >> step_bits];
}

// One step: the group minima of `cost` into `minima`, then the successors' costs into `next`.
template <int VEC>
void step(const Trellis& t, const float* __restrict planes, const float* __restrict x,
          const float* __restrict cost, float* __restrict minima, float* __restrict next) {
  const int64_t groups = t.groups(), fan = t.fan(), states = t.states();
  // Groups in blocks of kBlock keep a block's running minima in registers across the F
  // predecessors; fewer groups than a block (K*V near L) take the plain loop.
  constexpr int64_t kBlock = 16;
  const int64_t blocked = groups - groups % kBlock;
  for (int64_t h0 = 0; h0 < blocked; h0 += kBlock) {
    float m[kBlock];
    for (int64_t b = 0; b < kBlock; ++b) m[b] = cost[h0 + b];
    for (int64_t j = 1; j < fan; ++j) {
      const float* __restrict candidates = cost + j * groups + h0;
#pragma omp simd
      for (int64_t b = 0; b < kBlock; ++b) m[b] = candidates[b] < m[b] ? candidates[b] : m[b];
    }
    for (int64_t b = 0; b < kBlock; ++b) minima[h0 + b] = m[b];
  }
  for (int64_t h = blocked; h < groups; ++h) {
    float m = cost[h];
    for (int64_t j = 1; j < fan; ++j) m = cost[j * groups + h] < m ? cost[j * groups + h] : m;
    minima[h] = m;
  }
  if (fan >= 8) {  // whole vectors share one group minimum
    for (int64_t h = 0; h < groups; ++h) {
      const float m = minima[h];
      for (int64_t s = h * fan; s < (h + 1) * fan; ++s) {
        next[s] = branch_cost<VEC>(planes, states, s, x) + m;
      }
    }
  } else {
    successors_of_small_groups<VEC>(t, planes, x, minima, next);
  }
}

// The minimum-error path of one sequence x (steps * VEC floats) into w.path. With an overlap
// (0 <= overlap < G), the first state's top L-KV bits and the last state's low L-KV bits equal it.
// The trace-back recomputes the F candidate costs of the one predecessor group on the path, with
// the forward pass's float operations, and keeps the first of equal costs.
template <int VEC>
void search(const Trellis& t, const float* planes, const float* x, int64_t overlap,
            Workspace& w) {
  const int64_t states = t.states(), groups = t.groups();
  for (int64_t s = 0; s < states; ++s) w.cost[s] = start_cost<VEC>(t, planes, s, x, overlap);
  for (int64_t i = 1; i < t.steps; ++i) {
    step<VEC>(t, planes, x + i * VEC, w.cost.data(), w.minima.data() + (i - 1) * groups,
              w.next.data());
    std::swap(w.cost, w.next);
  }
  int64_t state = -1;
  for (int64_t s = 0; s < states; ++s) {  // the lowest allowed state of equal final costs
    if (overlap >= 0 && (s & (groups - 1)) != overlap) continue;
    if (state < 0 || w.cost[s] < w.cost[state]) state = s;
  }
  w.path[t.steps - 1] = state;
  for (int64_t i = t.steps - 1; i > 0; --i) {  // from the state at step i to the one at i-1
    const int64_t group = state >> t.step_bits;
    const float* x_before = x + (i - 1) * VEC;
    float best = kInfinity;
    state = group;
    for (int64_t j = 0; j < t.fan(); ++j) {
      const int64_t candidate = j * groups + group;
      const float cost = i == 1 ? start_cost<VEC>(t, planes, candidate, x_before, overlap)
                                : branch_cost<VEC>(planes, states, candidate, x_before) +
                                      w.minima[(i - 2) * groups + (candidate >> t.step_bits)];
      if (cost < best) {
        best = cost;
        state = candidate;
      }
    }
    w.path[i - 1] = state;
  }
}

template <int VEC>
void free_or_constrained(const Trellis& t, const float* planes, const float* x,
                         const int64_t* overlap, int64_t* paths, int64_t begin, int64_t end) {
  Workspace w(t);
  for (int64_t b = begin; b < end; ++b) {
    search<VEC>(t, planes, x + b * t.steps * VEC, overlap ? overlap[b] : -1, w);
    std::copy(w.path.begin(), w.path.end(), paths + b * t.steps);
  }
}

// QTIP's two passes per tile: a free-ended search of the tile rotated by half its steps names the
// state at the seam (original step 0); its top L-KV bits constrain the second search.
template <int VEC>
void tail_biting(const Trellis& t, const float* planes, const float* x, int64_t* paths,
                 int64_t begin, int64_t end) {
  Workspace w(t);
  const int64_t half = t.steps / 2;
  for (int64_t b = begin; b < end; ++b) {
    const float* tile = x + b * t.steps * VEC;
    std::copy(tile + half * VEC, tile + t.steps * VEC, w.rotated.begin());
    std::copy(tile, tile + half * VEC, w.rotated.begin() + (t.steps - half) * VEC);
    search<VEC>(t, planes, w.rotated.data(), -1, w);
    const int64_t seam_state = w.path[t.steps - half];
    search<VEC>(t, planes, tile, seam_state >> t.step_bits, w);
    std::copy(w.path.begin(), w.path.end(), paths + b * t.steps);
  }
}

Trellis check(const at::Tensor& x, const at::Tensor& values, int64_t state_bits, int64_t bits,
              int64_t vec, const char* op) {
  TORCH_CHECK_VALUE(vec == 1 || vec == 2, op, ": V must be 1 or 2, got ", vec);
  TORCH_CHECK_VALUE(bits >= 1 && bits * vec <= kMaxStepBits && bits * vec < state_bits &&
                        state_bits >= kMinStateBits && state_bits <= kMaxStateBits,
                    op, ": need ", kMinStateBits, " <= L <= ", kMaxStateBits, " and 1 <= K*V < L",
                    " with K*V <= ", kMaxStepBits, ", got L=", state_bits, " K=", bits, " V=", vec);
  TORCH_CHECK_VALUE(x.device().is_cpu() && values.device().is_cpu(), op,
                    ": x and values must be CPU tensors");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat, op,
                    ": x and values must be float32, got ", x.scalar_type(), " and ",
                    values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == (int64_t{1} << state_bits) &&
                        values.size(1) == vec,
                    op, ": values must be (", int64_t{1} << state_bits, ", ", vec, "), got ",
                    values.sizes());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= vec && x.size(1) % vec == 0, op,
                    ": x must be (B, T) with T a positive multiple of V=", vec, ", got ", x.sizes());
  return Trellis{state_bits, bits * vec, vec, x.size(1) / vec};
}

template <typename Body>
at::Tensor run_tiles(const at::Tensor& x, const Trellis& t, Body body) {
  at::Tensor paths = at::empty({x.size(0), t.steps}, x.options().dtype(at::kLong));
  int64_t* out = paths.data_ptr<int64_t>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    if (t.vec == 1) {
      body(std::integral_constant<int, 1>{}, out, begin, end);
    } else {
      body(std::integral_constant<int, 2>{}, out, begin, end);
    }
  });
  return paths;
}

at::Tensor viterbi(const at::Tensor& x, const at::Tensor& values, int64_t state_bits,
                   int64_t bits, int64_t vec, const std::optional<at::Tensor>& overlap) {
  const Trellis t = check(x, values, state_bits, bits, vec, "viterbi");
  at::Tensor overlap_bits;
  if (overlap.has_value()) {
    overlap_bits = overlap->contiguous();
    TORCH_CHECK_VALUE(overlap_bits.device().is_cpu() && overlap_bits.scalar_type() == at::kLong &&
                          overlap_bits.dim() == 1 && overlap_bits.size(0) == x.size(0),
                      "viterbi: overlap must be int64 (", x.size(0), ",), got ",
                      overlap_bits.scalar_type(), " ", overlap_bits.sizes());
    TORCH_CHECK_VALUE(x.size(0) == 0 || (overlap_bits.min().item<int64_t>() >= 0 &&
                                         overlap_bits.max().item<int64_t>() < t.groups()),
                      "viterbi: overlap values must lie in [0, ", t.groups(), ")");
  }
  const at::Tensor xs = x.contiguous();
  const at::Tensor planes = values.t().contiguous();
  const int64_t* overlap_ptr = overlap.has_value() ? overlap_bits.data_ptr<int64_t>() : nullptr;
  return run_tiles(xs, t, [&](auto vec_constant, int64_t* out, int64_t begin, int64_t end) {
    free_or_constrained<decltype(vec_constant)::value>(
        t, planes.data_ptr<float>(), xs.data_ptr<float>(), overlap_ptr, out, begin, end);
  });
}

at::Tensor tail_biting_viterbi(const at::Tensor& x, const at::Tensor& values, int64_t state_bits,
                               int64_t bits, int64_t vec) {
  const Trellis t = check(x, values, state_bits, bits, vec, "tail_biting_viterbi");
  const at::Tensor xs = x.contiguous();
  const at::Tensor planes = values.t().contiguous();
  return run_tiles(xs, t, [&](auto vec_constant, int64_t* out, int64_t begin, int64_t end) {
    tail_biting<decltype(vec_constant)::value>(t, planes.data_ptr<float>(), xs.data_ptr<float>(),
                                               out, begin, end);
  });
}

}  // namespace
}  // namespace trellis_viterbi

TORCH_LIBRARY(trellis_viterbi, m) {
  m.def("viterbi(Tensor x, Tensor values, int state_bits, int bits, int vec, Tensor? overlap) "
        "-> Tensor",
        &trellis_viterbi::viterbi);
  m.def("tail_biting_viterbi(Tensor x, Tensor values, int state_bits, int bits, int vec) "
        "-> Tensor",
        &trellis_viterbi::tail_biting_viterbi);
}
