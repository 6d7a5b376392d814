// BCJR on the bitshift trellis on CPU: posterior means of free chains and their analytic gradient.
//
// The same contract and the same math as forward_reference/backward_reference in
// trellis_kernels/bcjr.py (its module docstring derives the group messages m, g, the backward's
// Phi/Psi messages and the codebook gradient); trellis_kernels/bcjr_cpu.py builds and loads this file.
//
// Layout: the SIMD lanes are chains. A block of kLanes chains runs every step together, each state's
// quantity being one vector of kLanes values, so every reduction of the trellis (over a predecessor
// group j*G + h, strided, or a successor group F*h + c, contiguous) is a plain loop over vectors with
// no shuffles, in natural state order. Blocks run in parallel (at::parallel_for); each thread owns
// its buffers: the stored G-sized messages per step and one 2^L-sized step buffer, while the costs
// l_t(s) = bias[s] + <coef[s], x_t> are recomputed from the codebook at every step.
//
// float32 uses polynomial exp/log on whole vectors (a few ulp, within the reference's tolerances);
// float64, for checks, calls the C library per lane.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

namespace trellis_bcjr {
namespace {

constexpr int kVectorBytes = 32;
constexpr int64_t kTileStates = 512;  // states per tile of the alpha step: 16 KiB of float32 lanes

template <class T>
struct Simd;

template <>
struct Simd<float> {
  typedef float Vec __attribute__((vector_size(kVectorBytes)));
  typedef int32_t Int __attribute__((vector_size(kVectorBytes)));
};

template <>
struct Simd<double> {
  typedef double Vec __attribute__((vector_size(kVectorBytes)));
  typedef int64_t Int __attribute__((vector_size(kVectorBytes)));
};

template <class T>
using Vec = typename Simd<T>::Vec;
template <class T>
constexpr int kLanes = kVectorBytes / sizeof(T);

template <class V>
inline V vmax(V a, V b) { return a > b ? a : b; }

template <class T>
inline Vec<T> splat(T v) { return Vec<T>{} + v; }

// exp on [floor, ~0], the only exponents taken here (max-subtracted and floored; bcjr.log_floor), so
// neither overflow nor underflow needs handling.
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial, 2^n from the exponent bits.
inline Vec<float> vexp(Vec<float> x) {
  using Int = Simd<float>::Int;
  const Vec<float> magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const Vec<float> shifted = x * 1.44269504088896341f + magic;
  const Vec<float> n = shifted - magic;
  const Vec<float> r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec<float> p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  Int bits = (reinterpret_cast<const Int&>(shifted) - 0x4B400000 + 127) << 23;
  return p * reinterpret_cast<const Vec<float>&>(bits);
}

// log of positive normal numbers (Cephes' logf): x = 2^e m, m in [sqrt(1/2), sqrt(2)).
inline Vec<float> vlog(Vec<float> x) {
  using Int = Simd<float>::Int;
  const Int bits = reinterpret_cast<const Int&>(x);
  Vec<float> e = __builtin_convertvector((bits >> 23) - 126, Vec<float>);
  const Int mant_bits = (bits & 0x007FFFFF) | 0x3F000000;  // m in [0.5, 1)
  Vec<float> m = reinterpret_cast<const Vec<float>&>(mant_bits);
  const Int small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = (small ? m + m : m) - 1.0f;
  const Vec<float> z = m * m;
  Vec<float> y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y - e * 2.12194440e-4f - z * 0.5f;
  return m + y + e * 0.693359375f;
}

inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

inline Vec<double> vlog(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::log(x[i]);
  return x;
}

template <class T>
T log_floor() { return std::log(std::numeric_limits<T>::min()) / 3; }  // as bcjr.log_floor

// The codebook and the trellis shape, shared by all blocks. kV > 0 fixes V at compile time (the
// common V = 1, 2), so the per-state loops over V unroll; kV = 0 reads it at run time.
template <class T, int kV>
struct Trellis {
  int64_t L, KV, S, G, F, V;
  T scale, floor;
  std::vector<T> values, coef, bias;  // (S, V) codebook, 2 c / T, -|c|^2 / T

  Trellis(const at::Tensor& codebook, int64_t state_bits, int64_t step_bits, double temperature)
      : L(state_bits), KV(step_bits), S(int64_t{1} << state_bits),
        G(int64_t{1} << (state_bits - step_bits)), F(int64_t{1} << step_bits),
        V(codebook.size(1)), scale(T(2.0 / temperature)), floor(log_floor<T>()),
        values(codebook.data_ptr<T>(), codebook.data_ptr<T>() + S * V), coef(S * V), bias(S) {
    for (int64_t s = 0; s < S; ++s) {
      T norm = 0;
      for (int64_t v = 0; v < V; ++v) {
        const T c = values[s * V + v];
        coef[s * V + v] = c * scale;
        norm += c * c;
      }
      bias[s] = -norm / T(temperature);
    }
  }

  int64_t dims() const { return kV > 0 ? kV : V; }

  // l_t(s) for the block's chains, with x_t given per lane (V vectors).
  Vec<T> cost(int64_t s, const Vec<T>* x) const {
    const int64_t V = dims();
    Vec<T> l = splat(bias[s]);
    for (int64_t v = 0; v < V; ++v) l += coef[s * V + v] * x[v];
    return l;
  }

  // f_t(s) = <grad_t, c_s> - <grad_t, out_t> (the latter passed as `centre`).
  Vec<T> score(int64_t s, const Vec<T>* grad, Vec<T> centre) const {
    const int64_t V = dims();
    Vec<T> f = -centre;
    for (int64_t v = 0; v < V; ++v) f += values[s * V + v] * grad[v];
    return f;
  }
};

// One block of chains: its inputs transposed to (step, V, lane), zero on lanes past the last chain.
template <class T>
struct Block {
  std::vector<Vec<T>> x, grad, centre;  // (N, V), (N, V) and (N,): grad zero outside emitted steps
  int64_t first, lanes;                 // chains [first, first + lanes)
};

// into[(step0 + k) * V + v][lane] = rows[((first + lane) * row_steps + k) * V + v] for k < row_steps.
template <class T>
void transpose_into(const T* rows, int64_t first, int64_t lanes, int64_t row_steps, int64_t step0,
                    int64_t V, std::vector<Vec<T>>& into) {
  for (int64_t k = 0; k < row_steps; ++k)
    for (int64_t v = 0; v < V; ++v) {
      Vec<T> lane_values{};
      for (int64_t i = 0; i < lanes; ++i) lane_values[i] = rows[((first + i) * row_steps + k) * V + v];
      into[(step0 + k) * V + v] = lane_values;
    }
}

// The per-thread work space: messages per step (stored), one step's exponentials for the backward,
// and an L1-sized tile of terms for the group reductions.
template <class T>
struct Workspace {
  std::vector<Vec<T>> m, phi;       // (N, G): forward messages and the backward's Phi
  std::vector<Vec<T>> states;       // (S,) in the backward: e = exp(y - top) of the beta step
  std::vector<Vec<T>> tile;         // (F, tile_groups): terms of a few groups at a time
  std::vector<Vec<T>> top, total;   // (G,) per group: max and sum of exp(y - max)
  std::vector<Vec<T>> g, next;      // (G,): g_t (centred) and g_{t-1} being built
  std::vector<Vec<T>> weighted;     // (G,) scores or (G, V) codewords summed with weights e
  std::vector<Vec<T>> psi, factor;  // (G,): Psi_t, the marginals' group factor
  int64_t tile_groups;

  template <int kV>
  Workspace(int64_t steps, const Trellis<T, kV>& tr, bool backward)
      : m(steps * tr.G), phi(backward ? steps * tr.G : 0), states(backward ? tr.S : 0),
        top(tr.G), total(tr.G), g(tr.G), next(tr.G), weighted(tr.G * std::max<int64_t>(tr.V, 1)),
        psi(tr.G), factor(tr.G),
        tile_groups(std::min(tr.G, std::max<int64_t>(1, kTileStates / tr.F))) {
    tile.resize(tr.F * tile_groups);
  }
};

// Subtracts the maximum: any per-step constant of a message cancels, and fp32 stays near zero.
template <class Lanes>
void centre_(Lanes* msg, int64_t n) {
  Lanes top = msg[0];
  for (int64_t i = 1; i < n; ++i) top = vmax(top, msg[i]);
  for (int64_t i = 0; i < n; ++i) msg[i] -= top;
}

// m_t for t < stop (and in the backward, Phi_t): alpha_t(s) = l_t(s) + m_t[s >> KV] reduced over
// each predecessor group {j*G + h}: m_{t+1}[h] = LSE_j alpha_t(j*G + h), and Phi_{t+1}[h] the
// within-group softmax average of phi_t = f_t + Phi_t[s >> KV]. Groups go a tile at a time, so
// the terms stay in L1 between the max and the exponentials.
template <class T, int kV>
void alpha_pass(const Trellis<T, kV>& tr, const Block<T>& block, int64_t stop, bool with_phi,
                Workspace<T>& ws) {
  const int64_t S = tr.S, G = tr.G, KV = tr.KV, V = tr.dims(), H = ws.tile_groups;
  const Vec<T> floor = splat(tr.floor);
  std::fill(ws.m.begin(), ws.m.begin() + G, Vec<T>{});
  if (with_phi) std::fill(ws.phi.begin(), ws.phi.begin() + G, Vec<T>{});
  for (int64_t t = 0; t + 1 < stop; ++t) {
    const Vec<T>* x = &block.x[t * V];
    const Vec<T>* grad = &block.grad[t * V];
    const Vec<T> centre = block.centre[t];
    const Vec<T>* m = &ws.m[t * G];
    Vec<T>* m_next = &ws.m[(t + 1) * G];
    for (int64_t h0 = 0; h0 < G; h0 += H) {
      Vec<T>* top = &ws.top[h0];
      Vec<T>* total = &ws.total[h0];
      Vec<T>* y = ws.tile.data();
      for (int64_t j = 0, row = 0; j < S; j += G, row += H)
        for (int64_t i = 0; i < H; ++i) {
          const int64_t s = j + h0 + i;
          y[row + i] = tr.cost(s, x) + m[s >> KV];
          top[i] = j == 0 ? y[row + i] : vmax(top[i], y[row + i]);
        }
      Vec<T>* phi_sum = &ws.weighted[h0];
      std::fill(total, total + H, Vec<T>{});
      if (with_phi) std::fill(phi_sum, phi_sum + H, Vec<T>{});
      for (int64_t j = 0, row = 0; j < S; j += G, row += H)
        for (int64_t i = 0; i < H; ++i) {
          const Vec<T> e = vexp(vmax(y[row + i] - top[i], floor));
          total[i] += e;
          if (with_phi) {
            const int64_t s = j + h0 + i;
            phi_sum[i] += e * (tr.score(s, grad, centre) + ws.phi[t * G + (s >> KV)]);
          }
        }
      for (int64_t i = 0; i < H; ++i) m_next[h0 + i] = top[i] + vlog(total[i]);
      if (with_phi)
        for (int64_t i = 0; i < H; ++i) ws.phi[(t + 1) * G + h0 + i] = phi_sum[i] / total[i];
    }
    centre_(m_next, G);
  }
}

// The beta step at t: y(s) = l_t(s) + g_t[s mod G] over each successor group {F*h + c}. Leaves
// top and total per group and g_{t-1} in ws.next (uncentred), and hands each group's exponentials
// e_c = exp(y - top_h) to `visit(h, e)` while they are in L1.
template <class T, int kV, class Visit>
void beta_step(const Trellis<T, kV>& tr, const Vec<T>* x, Workspace<T>& ws, Visit visit) {
  const int64_t G = tr.G, F = tr.F;
  const Vec<T> floor = splat(tr.floor);
  Vec<T>* y = ws.tile.data();
  for (int64_t h = 0; h < G; ++h) {
    Vec<T> top = splat(-std::numeric_limits<T>::infinity());
    for (int64_t c = 0; c < F; ++c) {
      const int64_t s = h * F + c;
      y[c] = tr.cost(s, x) + ws.g[s & (G - 1)];
      top = vmax(top, y[c]);
    }
    Vec<T> total{};
    for (int64_t c = 0; c < F; ++c) {
      y[c] = vexp(vmax(y[c] - top, floor));
      total += y[c];
    }
    ws.top[h] = top;
    ws.total[h] = total;
    ws.next[h] = top + vlog(total);
    visit(h, y);
  }
}

// After beta_step: the marginals' group factors exp(top_h + m_t[h] - Lambda_t) into ws.factor,
// Lambda_t = LSE_h (m_t[h] + g_{t-1}[h]), so that P_t(F*h + c) = e_c * factor_h.
template <class T, int kV>
void group_factors(const Trellis<T, kV>& tr, const Vec<T>* m, Workspace<T>& ws) {
  const int64_t G = tr.G;
  const Vec<T> floor = splat(tr.floor);
  Vec<T> best = m[0] + ws.next[0];
  for (int64_t h = 1; h < G; ++h) best = vmax(best, m[h] + ws.next[h]);
  Vec<T> sum{};
  for (int64_t h = 0; h < G; ++h) sum += vexp(vmax(m[h] + ws.next[h] - best, floor));
  const Vec<T> lambda = best + vlog(sum);
  for (int64_t h = 0; h < G; ++h) ws.factor[h] = vexp(vmax(ws.top[h] + m[h] - lambda, floor));
}

template <class T, int kV>
void forward_block(const Trellis<T, kV>& tr, const Block<T>& block, int64_t steps, int64_t start,
                   int64_t stop, Workspace<T>& ws, T* out) {
  const int64_t G = tr.G, F = tr.F, V = tr.dims(), E = stop - start;
  alpha_pass(tr, block, stop, false, ws);
  std::fill(ws.g.begin(), ws.g.end(), Vec<T>{});
  std::vector<Vec<T>> mean(V);
  for (int64_t t = steps - 1; t >= start; --t) {
    const bool emitted = t < stop;
    beta_step(tr, &block.x[t * V], ws, [&](int64_t h, const Vec<T>* e) {
      if (!emitted) return;  // weighted[h] = sum_c e_c c_{F*h + c}
      for (int64_t v = 0; v < V; ++v) {
        Vec<T> inner{};
        for (int64_t c = 0; c < F; ++c) inner += e[c] * tr.values[(h * F + c) * V + v];
        ws.weighted[h * V + v] = inner;
      }
    });
    if (emitted) {  // out_t = sum_h factor_h weighted[h]
      group_factors(tr, &ws.m[t * G], ws);
      std::fill(mean.begin(), mean.end(), Vec<T>{});
      for (int64_t h = 0; h < G; ++h)
        for (int64_t v = 0; v < V; ++v) mean[v] += ws.factor[h] * ws.weighted[h * V + v];
      for (int64_t i = 0; i < block.lanes; ++i)
        for (int64_t v = 0; v < V; ++v)
          out[((block.first + i) * E + (t - start)) * V + v] = mean[v][i];
    }
    std::copy(ws.next.begin(), ws.next.end(), ws.g.begin());
    centre_(ws.g.data(), G);
  }
}

// Codebook gradient partial sums of one thread, accumulated over its blocks.
template <class T>
struct CodebookSums {
  std::vector<Vec<T>> lanes;    // (S, V + 1) per lane over one block: sum (2/T) dl x_t + P grad_t, sum dl
  std::vector<double> totals;   // (S, V + 1) over the thread's blocks, lanes reduced

  template <int kV>
  explicit CodebookSums(const Trellis<T, kV>& tr) : lanes(tr.S * (tr.V + 1)), totals(tr.S * (tr.V + 1)) {}

  void flush() {
    for (size_t i = 0; i < lanes.size(); ++i) {
      double sum = 0;
      for (int k = 0; k < kLanes<T>; ++k) sum += lanes[i][k];
      totals[i] += sum;
      lanes[i] = Vec<T>{};
    }
  }
};

// dl_t = P_t (phi_t + psi_t - E_t) at one step (bcjr.backward_reference, step for step), into dx_t
// and, with `sums`, the codebook gradient; then Psi_{t-1}. Runs the beta step at t itself.
template <class T, int kV>
void backward_step(const Trellis<T, kV>& tr, const Block<T>& block, int64_t t, Workspace<T>& ws,
                   CodebookSums<T>* sums, T* dx, int64_t steps, T inv_grad_scale) {
  const int64_t G = tr.G, F = tr.F, V = tr.dims();
  const Vec<T>* phi = &ws.phi[t * G];
  const Vec<T>* grad = &block.grad[t * V];
  const Vec<T>* x = &block.x[t * V];
  const Vec<T> centre = block.centre[t];
  Vec<T>* e = ws.states.data();
  // work(s) = f_t(s) + Psi_t[s mod G]; weighted[h] = sum_c e_c work(F*h + c)
  auto work = [&](int64_t s) { return tr.score(s, grad, centre) + ws.psi[s & (G - 1)]; };
  beta_step(tr, x, ws, [&](int64_t h, const Vec<T>* group) {
    Vec<T> sum{};
    for (int64_t c = 0; c < F; ++c) {
      e[h * F + c] = group[c];
      sum += group[c] * work(h * F + c);
    }
    ws.weighted[h] = sum;
  });
  group_factors(tr, &ws.m[t * G], ws);
  Vec<T> mean{};  // E_t, with Phi_t constant over a group
  for (int64_t h = 0; h < G; ++h) mean += ws.factor[h] * (ws.weighted[h] + phi[h] * ws.total[h]);
  std::vector<Vec<T>> dx_t(V);
  for (int64_t h = 0; h < G; ++h) {
    const Vec<T> factor = ws.factor[h];
    const Vec<T> offset = phi[h] - mean;
    for (int64_t c = 0; c < F; ++c) {
      const int64_t s = h * F + c;
      const Vec<T> p = e[s] * factor;
      const Vec<T> dl = p * (work(s) + offset);
      for (int64_t v = 0; v < V; ++v) dx_t[v] += dl * tr.values[s * V + v];
      if (sums == nullptr) continue;
      Vec<T>* acc = &sums->lanes[s * (V + 1)];
      for (int64_t v = 0; v < V; ++v) acc[v] += tr.scale * dl * x[v] + p * grad[v];
      acc[V] += dl;
    }
  }
  for (int64_t i = 0; i < block.lanes; ++i)
    for (int64_t v = 0; v < V; ++v)
      dx[((block.first + i) * steps + t) * V + v] = dx_t[v][i] * tr.scale * inv_grad_scale;
  for (int64_t h = 0; h < G; ++h) ws.psi[h] = ws.weighted[h] / ws.total[h];
}

template <class T, int kV>
void backward_block(const Trellis<T, kV>& tr, const Block<T>& block, int64_t steps, Workspace<T>& ws,
                    CodebookSums<T>* sums, T* dx, T inv_grad_scale) {
  alpha_pass(tr, block, steps, true, ws);
  std::fill(ws.g.begin(), ws.g.end(), Vec<T>{});
  std::fill(ws.psi.begin(), ws.psi.end(), Vec<T>{});
  for (int64_t t = steps - 1; t >= 0; --t) {
    backward_step(tr, block, t, ws, sums, dx, steps, inv_grad_scale);
    std::copy(ws.next.begin(), ws.next.end(), ws.g.begin());
    centre_(ws.g.data(), tr.G);
  }
  if (sums != nullptr) sums->flush();
}

void check(const at::Tensor& x, const at::Tensor& values, int64_t state_bits, int64_t step_bits,
           double temperature, int64_t start, int64_t stop) {
  TORCH_CHECK(x.dim() == 3, "bcjr: x must be (chains, steps, V), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), "bcjr_cpu: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "bcjr_cpu: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "bcjr: x and values must share dtype and device");
  TORCH_CHECK(0 < step_bits && step_bits < state_bits && state_bits <= 24,
              "bcjr: need 0 < KV < L <= 24, got KV=", step_bits, " L=", state_bits);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == (int64_t{1} << state_bits) &&
                  values.size(1) == x.size(2),
              "bcjr: values must be (", int64_t{1} << state_bits, ", ", x.size(2), "), got ",
              values.sizes());
  TORCH_CHECK(temperature > 0, "bcjr: temperature must be positive, got ", temperature);
  TORCH_CHECK(0 <= start && start < stop && stop <= x.size(1), "bcjr: emitted steps [", start, ", ",
              stop, ") outside the chain of ", x.size(1), " steps");
}

template <class T>
Block<T> make_block(const T* x, const T* grad, const T* out, int64_t first, int64_t chains,
                    int64_t steps, int64_t start, int64_t emitted, int64_t V) {
  Block<T> block;
  block.first = first;
  block.lanes = std::min<int64_t>(kLanes<T>, chains - first);
  block.x.assign(steps * V, Vec<T>{});
  transpose_into(x, first, block.lanes, steps, 0, V, block.x);
  block.grad.assign(steps * V, Vec<T>{});
  block.centre.assign(steps, Vec<T>{});
  if (grad == nullptr) return block;
  transpose_into(grad, first, block.lanes, emitted, start, V, block.grad);
  std::vector<Vec<T>> outs(steps * V);
  transpose_into(out, first, block.lanes, emitted, start, V, outs);
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t v = 0; v < V; ++v) block.centre[t] += block.grad[t * V + v] * outs[t * V + v];
  return block;
}

template <class T, int kV>
void forward_typed(const at::Tensor& x, const Trellis<T, kV>& tr, int64_t start, int64_t stop,
                   at::Tensor& out) {
  const int64_t chains = x.size(0), steps = x.size(1);
  const int64_t blocks = (chains + kLanes<T> - 1) / kLanes<T>;
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(stop, tr, false);
    for (int64_t b = begin; b < end; ++b) {
      const Block<T> block =
          make_block<T>(xp, nullptr, nullptr, b * kLanes<T>, chains, steps, start, 0, tr.V);
      forward_block(tr, block, steps, start, stop, ws, op);
    }
  });
}

// run(trellis) with V fixed at compile time for V = 1 and 2, read at run time otherwise.
template <class T, class Run>
void with_trellis(const at::Tensor& values, int64_t state_bits, int64_t step_bits,
                  double temperature, Run run) {
  if (values.size(1) == 1)
    run(Trellis<T, 1>(values, state_bits, step_bits, temperature));
  else if (values.size(1) == 2)
    run(Trellis<T, 2>(values, state_bits, step_bits, temperature));
  else
    run(Trellis<T, 0>(values, state_bits, step_bits, temperature));
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& values_in, int64_t state_bits,
                   int64_t step_bits, double temperature, int64_t start, int64_t stop) {
  check(x_in, values_in, state_bits, step_bits, temperature, start, stop);
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous();
  at::Tensor out = at::empty({x.size(0), stop - start, x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bcjr_forward", [&] {
    with_trellis<scalar_t>(values, state_bits, step_bits, temperature,
                           [&](const auto& tr) { forward_typed(x, tr, start, stop, out); });
  });
  return out;
}

// 2^k with 2^k max|t| in [0.5, 1), or 1: the exact rescale of bcjr._power_of_two_scale.
double power_of_two_scale(const at::Tensor& t) {
  const double peak = t.numel() ? t.abs().max().item<double>() : 0.0;
  if (peak == 0.0 || !std::isfinite(peak)) return 1.0;
  int exponent = 0;
  std::frexp(peak, &exponent);
  return std::ldexp(1.0, -exponent);
}

template <class T, int kV>
void backward_typed(const at::Tensor& x, const at::Tensor& out, const at::Tensor& grad,
                    const Trellis<T, kV>& tr, int64_t start, double grad_scale, at::Tensor& dx,
                    at::Tensor* dvalues) {
  const int64_t chains = x.size(0), steps = x.size(1), emitted = out.size(1);
  const int64_t blocks = (chains + kLanes<T> - 1) / kLanes<T>;
  std::vector<double> totals(dvalues ? tr.S * (tr.V + 1) : 0);
  std::mutex totals_lock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Workspace<T> ws(steps, tr, true);
    std::unique_ptr<CodebookSums<T>> sums(dvalues ? new CodebookSums<T>(tr) : nullptr);
    for (int64_t b = begin; b < end; ++b) {
      const Block<T> block = make_block<T>(x.data_ptr<T>(), grad.data_ptr<T>(), out.data_ptr<T>(),
                                           b * kLanes<T>, chains, steps, start, emitted, tr.V);
      backward_block(tr, block, steps, ws, sums.get(), dx.data_ptr<T>(), T(1.0 / grad_scale));
    }
    if (!sums) return;
    std::lock_guard<std::mutex> guard(totals_lock);
    for (size_t i = 0; i < totals.size(); ++i) totals[i] += sums->totals[i];
  });
  if (!dvalues) return;
  T* dv = dvalues->data_ptr<T>();
  const int64_t V = tr.dims();
  for (int64_t s = 0; s < tr.S; ++s)  // sum_t (2/T) dl_t (x_t - c_s) + P_t grad_t
    for (int64_t v = 0; v < V; ++v)
      dv[s * V + v] = T((totals[s * (V + 1) + v] -
                         double(tr.values[s * V + v]) * double(tr.scale) * totals[s * (V + 1) + V]) /
                        grad_scale);
}

std::tuple<at::Tensor, c10::optional<at::Tensor>> backward(
    const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& out_in,
    const at::Tensor& grad_in, int64_t state_bits, int64_t step_bits, double temperature,
    int64_t start, bool values_grad) {
  TORCH_CHECK(out_in.dim() == 3 && out_in.size(0) == x_in.size(0) && out_in.size(2) == x_in.size(2),
              "bcjr: out must be (chains, emitted steps, V), got ", out_in.sizes());
  TORCH_CHECK(grad_in.sizes() == out_in.sizes(), "bcjr: grad_out must match out's shape ",
              out_in.sizes(), ", got ", grad_in.sizes());
  check(x_in, values_in, state_bits, step_bits, temperature, start, start + out_in.size(1));
  TORCH_CHECK(out_in.scalar_type() == x_in.scalar_type() && grad_in.scalar_type() == x_in.scalar_type(),
              "bcjr: out and grad_out must have x's dtype");
  const at::Tensor x = x_in.contiguous(), values = values_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const double grad_scale = power_of_two_scale(grad_in);
  const at::Tensor grad = (grad_in * grad_scale).contiguous();
  at::Tensor dx = at::empty_like(x);
  c10::optional<at::Tensor> dvalues;
  if (values_grad) dvalues = at::empty_like(values);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bcjr_backward", [&] {
    with_trellis<scalar_t>(values, state_bits, step_bits, temperature, [&](const auto& tr) {
      backward_typed(x, out, grad, tr, start, grad_scale, dx, dvalues ? &*dvalues : nullptr);
    });
  });
  return {dx, dvalues};
}

}  // namespace
}  // namespace trellis_bcjr

TORCH_LIBRARY(trellis_bcjr, m) {
  using namespace trellis_bcjr;
  m.def("forward(Tensor x, Tensor values, int state_bits, int step_bits, float temperature, "
        "int start, int stop) -> Tensor",
        &forward);
  m.def("backward(Tensor x, Tensor values, Tensor out, Tensor grad_out, int state_bits, "
        "int step_bits, float temperature, int start, bool values_grad) -> (Tensor, Tensor?)",
        &backward);
}
