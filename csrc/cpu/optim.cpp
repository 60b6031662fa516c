// Fused optimizer steps with per-parameter norms, CPU.
//
// One pass over each parameter (float32, bfloat16 or float16) applies the update of torch.optim.SGD or
// torch.optim.AdamW (same formulas, same order and rounding of operations: reduced
// precision is rounded after each of torch's operations) and
// accumulates, per parameter, ||W_{t+1} - W_t||^2 (the update actually applied),
// ||W_{t+1}||^2, ||grad||^2 and, when initial weights are given, ||W_{t+1} - W_0||^2.
// The work is cut into chunks across all parameters (a large weight and many biases
// keep every thread busy); chunk sums are reduced per parameter in a fixed order.
// Requested matrices also get the Lanczos product (W_{t+1} - W_0)^T (W_{t+1} - W_0) v of
// the tracker's operator norm: their chunks are whole rows; the step sums each row's
// (W_{t+1} - W_0) . v as it writes it, then adds that times the row, still in L1, into
// the product (csrc/cpu/gram_rows.h; rows longer than 16K elements after the chunk).

#include "kernels.h"
#include "chunks.h"
#include "convert.h"
#include "gram_rows.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace spkern {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kTile = 1024;  // elements per flush of the float partial sums

// The Gram products asked of a step: for parameter i (a matrix of rows of n elements),
// the vector v and the per-thread partial sums of (W_{t+1} - W_0)^T (W_{t+1} - W_0) v.
struct GramRequests {
  std::vector<int64_t> row;  // per parameter: its row length n, or 0 (none asked)
  std::vector<const float*> v;
  std::vector<GramPartials> partials;
  std::vector<int64_t> slot;  // per parameter: index into partials, or -1
  std::vector<at::Tensor> out;

  GramRequests(size_t params, const std::vector<int64_t>& index, const std::vector<at::Tensor>& vs,
               const std::vector<at::Tensor>& outs)
      : row(params, 0), v(params, nullptr), slot(params, -1), out(outs) {
    for (size_t k = 0; k < index.size(); ++k) {
      const auto i = index[k];
      row[i] = vs[k].numel();
      v[i] = vs[k].const_data_ptr<float>();
      slot[i] = static_cast<int64_t>(partials.size());
      partials.emplace_back(vs[k].numel());
    }
  }
  bool any() const { return !partials.empty(); }
  // elements a tile of parameter i: a whole row for a requested one (up to kRowTile
  // elements), so that its Gram terms are taken while the row is in L1; else kTile
  int64_t tile(int64_t i, int64_t default_tile) const {
    return slot[i] >= 0 && row[i] <= kRowTile ? row[i] : default_tile;
  }
  // v of parameter i when its rows are taken one tile each (the step then sums each row's
  // (W_{t+1} - W_0) . v as it writes it: add_row), else nullptr (rows longer than kRowTile:
  // finish_chunk, at the end of the chunk)
  const float* row_v(int64_t i) const { return slot[i] >= 0 && row[i] <= kRowTile ? v[i] : nullptr; }
  // this thread's partial product of parameter i
  float* acc(int64_t i) { return partials[slot[i]].of_this_thread(); }
  // this thread's buffer for two rows of n floats (reduced precision converted)
  static float* scratch(int64_t n) {
    thread_local std::vector<float> buf;
    if (static_cast<int64_t>(buf.size()) < 2 * n) buf.resize(2 * n);
    return buf.data();
  }
  // after the step of the row at t0 of parameter i, with its dot product with v
  template <typename scalar_t>
  void add_row(int64_t i, const scalar_t* p, const at::Tensor& w0, int64_t t0, float dot) {
    const int64_t n = row[i];
    gram_row_axpy_any<scalar_t>(dot, p + t0, w0, t0, n, acc(i), scratch(n));
  }
  template <typename scalar_t>
  void finish_chunk(int64_t i, const scalar_t* p, const at::Tensor& w0, int64_t b, int64_t e) {
    if (slot[i] >= 0 && row[i] > kRowTile) add<scalar_t>(i, p, w0, b, e);
  }
  static constexpr int64_t kRowTile = 1 << 14;
  // after the step of elements [b, e) of parameter i (whole rows): their rows' terms
  template <typename scalar_t>
  void add(int64_t i, const scalar_t* p, const at::Tensor& w0, int64_t b, int64_t e) {
    if (slot[i] < 0) return;
    const int64_t n = row[i];
    gram_rows_into_any<scalar_t>(p, w0, v[i], b / n, e / n, n, acc(i), scratch(n));
  }
  void finish() {
    for (size_t i = 0; i < slot.size(); ++i)
      if (slot[i] >= 0) partials[slot[i]].sum_into(out[slot[i]].data_ptr<float>());
  }
};

void check_gram(const char* where, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& init,
                const std::vector<int64_t>& index, const std::vector<at::Tensor>& vs,
                const std::vector<at::Tensor>& outs) {
  TORCH_CHECK(vs.size() == index.size() && outs.size() == index.size(), where,
              ": gram_index, gram_v and gram_out must have one entry per requested parameter");
  TORCH_CHECK(index.empty() || !init.empty(), where, ": a Gram product needs the initial weights (init)");
  std::vector<char> seen(params.size(), 0);
  for (size_t k = 0; k < index.size(); ++k) {
    const auto i = index[k];
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(params.size()) && !seen[i], where,
                ": gram_index must name distinct parameters");
    seen[i] = 1;
    const auto& p = params[i];
    TORCH_CHECK(p.dim() >= 2 && p.size(0) > 0, where, ": gram parameter ", i, " must be a matrix");
    const int64_t n = p.numel() / p.size(0);
    for (const auto* t : {&vs[k], &outs[k]})
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == at::kFloat &&
                      t->dim() == 1 && t->numel() == n,
                  where, ": gram_v and gram_out of parameter ", i, " must be contiguous float32 CPU vectors of ",
                  n, " elements (its row length)");
  }
}

// Runs body(param index, begin, end) -> {update^2, weight^2, grad^2, drift^2} over chunks
// of every parameter in parallel (whole rows for the Gram requests), and writes the
// per-parameter sums into stats (P, 4).
template <typename Body>
void chunked(const std::vector<at::Tensor>& params, at::Tensor& stats, Body body, const GramRequests& gram) {
  std::vector<int64_t> sizes;
  for (const auto& p : params) sizes.push_back(p.numel());
  const auto total = chunked_sums(sizes, kChunk, body, gram.any() ? &gram.row : nullptr);
  float* out = stats.data_ptr<float>();
  for (size_t i = 0; i < params.size(); ++i)
    for (int k = 0; k < 4; ++k) out[4 * i + k] = static_cast<float>(total[i][k]);
}

void check_lists(const char* where, const std::vector<at::Tensor>& params,
                 const std::vector<std::vector<at::Tensor>>& same_size, const std::vector<at::Tensor>& init,
                 const at::Tensor& stats) {
  const auto P = static_cast<int64_t>(params.size());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.numel() == 4 * P &&
                  stats.device().is_cpu(),
              where, ": stats must be a contiguous float32 CPU tensor of shape (params, 4)");
  TORCH_CHECK(init.empty() || static_cast<int64_t>(init.size()) == P, where,
              ": init must be empty or one per parameter");
  const auto dtype = P ? params[0].scalar_type() : at::kFloat;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, where,
              ": parameters must be float32, bfloat16 or float16");
  for (int64_t i = 0; i < P; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous() && p.scalar_type() == dtype, where, ": parameter ",
                i, " must be a contiguous CPU tensor of the dtype of the first");
    for (const auto& list : same_size) {
      TORCH_CHECK(static_cast<int64_t>(list.size()) == P, where, ": one tensor per parameter expected");
      TORCH_CHECK(list[i].device().is_cpu() && list[i].is_contiguous() && list[i].numel() == p.numel() &&
                      list[i].scalar_type() == dtype,
                  where, ": gradient and state of parameter ", i,
                  " must be contiguous CPU tensors of its size and dtype");
    }
    if (!init.empty())
      TORCH_CHECK(init[i].device().is_cpu() && init[i].is_contiguous() && init[i].numel() == p.numel() &&
                      (init[i].scalar_type() == at::kFloat || init[i].scalar_type() == at::kBFloat16 ||
                       init[i].scalar_type() == at::kHalf),
                  where, ": initial weights of parameter ", i,
                  " must be a contiguous float32, bfloat16 or float16 CPU tensor of its size");
  }
}

// The initial weights of elements [b, b + n) as float: a pointer into them, or into buf
// after conversion.
const float* init_as_float(const at::Tensor& w0, int64_t b, int64_t n, float* buf) {
  switch (w0.scalar_type()) {
    case at::kBFloat16: return as_float(w0.const_data_ptr<at::BFloat16>() + b, buf, n);
    case at::kHalf: return as_float(w0.const_data_ptr<at::Half>() + b, buf, n);
    default: return w0.const_data_ptr<float>() + b;
  }
}

// torch's reduced-precision ops compute in float and round once per op: rnd<scalar_t>
// is that rounding (none for float). bfloat16 rounds in the float lanes, to nearest even
// on the bits (a conversion pair would convert two vectors to use one): NaNs pass
// through (masking could make one an infinity), and finite values that round past the
// largest bfloat16 become infinities, as in the conversion.
template <typename scalar_t>
inline fVec rnd(const fVec& x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    using iVec = at::vec::Vectorized<int32_t>;
    const iVec bits = at::vec::cast<int32_t>(x);
    const iVec lsb = (bits >> iVec(16)) & iVec(1);
    const iVec r = (bits + iVec(0x7fff) + lsb) & iVec(static_cast<int32_t>(0xffff0000u));
    return fVec::blendv(at::vec::cast<float>(r), x, x.isnan());
  } else {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(x, x)));
  }
}
template <typename scalar_t>
inline float rnd(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Partial sums of one tile, in float lanes, flushed to double per tile.
struct Sums {
  fVec u{0.f}, w{0.f}, g{0.f}, d{0.f};
  std::array<double, 4> total{0, 0, 0, 0};
  // a Gram request's v (GramRequests::row_v; tiles are then whole rows), and the row's
  // (W_{t+1} - W_0) . v so far
  const float* gv = nullptr;
  fVec dv{0.f};
  float take_dot() {
    const float r = at::vec::vec_reduce_all<float>(std::plus<fVec>(), dv);
    dv = fVec(0.f);
    return r;
  }
  // float32 parameters: the previous row's Gram term, acc += u (x - y), added a vector at
  // a time while this row is stepped (the arithmetic runs while the row's loads wait on
  // memory); the chunk's last row's after the chunk (finish_rows)
  const float *px = nullptr, *py = nullptr;
  float pu = 0.f, *pacc = nullptr;
  void pipe(const float* x, const float* y, float u, float* acc) { px = x, py = y, pu = u, pacc = acc; }
  void finish_rows(int64_t n) {
    if (px) axpy_difference(pu, px, py, pacc, n);
    px = nullptr;
  }
  void add(fVec pn, fVec pk, fVec gk, const float* w0, int64_t k, int64_t count);
  // the two float halves of a reduced-precision vector of `count` elements at k
  void add_halves(const std::pair<fVec, fVec>& pn, const std::pair<fVec, fVec>& pk,
                  const std::pair<fVec, fVec>& gk, const float* w0, int64_t k, int64_t count) {
    const int64_t fs = fVec::size();
    add(pn.first, pk.first, gk.first, w0, k, std::min(count, fs));
    if (count > fs) add(pn.second, pk.second, gk.second, w0, k + fs, count - fs);
  }
  void flush() {
    auto red = [](fVec& v) {
      const double r = double(at::vec::vec_reduce_all<float>(std::plus<fVec>(), v));
      v = fVec(0.f);
      return r;
    };
    total[0] += red(u);
    total[1] += red(w);
    total[2] += red(g);
    total[3] += red(d);
  }
};

// Vector loads and stores of `count` lanes (the last, partial vector of a tile: the
// remaining lanes load as zero, and zeros contribute nothing to the sums).
inline fVec load(const float* p, int64_t count) {
  return count == fVec::size() ? fVec::loadu(p) : fVec::loadu(p, count);
}
inline void store(const fVec& v, float* p, int64_t count) {
  if (count == fVec::size())
    v.store(p);
  else
    v.store(p, count);
}

// Runs body(k, count) over elements [0, n) a vector at a time, the tail on a partial
// vector: every element goes through the same vector code, as in ATen's vectorised loops
// (its scalar loop, with other roundings, only takes tensors smaller than one vector).
template <typename Body>
inline void over(int64_t n, Body body) {
  for (int64_t k = 0; k < n; k += fVec::size()) body(k, std::min<int64_t>(fVec::size(), n - k));
}

inline void Sums::add(fVec pn, fVec pk, fVec gk, const float* w0, int64_t k, int64_t count) {
  const fVec du = pn - pk;
  u = at::vec::fmadd(du, du, u);
  w = at::vec::fmadd(pn, pn, w);
  g = at::vec::fmadd(gk, gk, g);
  if (w0) {
    const fVec dd = pn - load(w0 + k, count);  // zero lanes: pn = 0, so dd = 0 there
    d = at::vec::fmadd(dd, dd, d);
    if (gv) dv = at::vec::fmadd(dd, load(gv + k, count), dv);
  }
  if (px) {
    const fVec t = load(px + k, count) - load(py + k, count);
    store(at::vec::fmadd(fVec(pu), t, load(pacc + k, count)), pacc + k, count);
  }
}

// torch's add(x, y, alpha) and add(x, scalar) round the scalar to the tensor's dtype;
// mul, div, lerp, addcmul and addcdiv take it in float.
template <typename scalar_t>
inline float add_scalar(double x) {
  return rnd<scalar_t>(static_cast<float>(x));
}

// After the step of the tile at t0 of parameter i: its sums flushed and, for a Gram
// request, the row's term (float32 parameters: added while the next row is stepped).
template <typename scalar_t>
void end_tile(Sums& sums, GramRequests& gram, int64_t i, const scalar_t* pp, const std::vector<at::Tensor>& init,
              int64_t t0, const float* w0) {
  sums.flush();
  if (!sums.gv) return;
  if constexpr (std::is_same_v<scalar_t, float>)
    sums.pipe(pp + t0, w0, sums.take_dot(), gram.acc(i));
  else
    gram.add_row<scalar_t>(i, pp, init[i], t0, sums.take_dot());
}

// After the chunk [b, e) of parameter i: the Gram terms still to add.
template <typename scalar_t>
void end_chunk(Sums& sums, GramRequests& gram, int64_t i, const scalar_t* pp, const std::vector<at::Tensor>& init,
               int64_t b, int64_t e, int64_t tile) {
  sums.finish_rows(tile);
  if (gram.any()) gram.finish_chunk<scalar_t>(i, pp, init[i], b, e);
}

struct SgdArgs {
  float lr, momentum, damp1, weight_decay, momentum_mul;  // add alphas, and buf.mul_(momentum)
  bool nesterov, maximize;
  template <typename scalar_t>
  static SgdArgs make(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                      bool maximize) {
    return {add_scalar<scalar_t>(lr), add_scalar<scalar_t>(momentum), add_scalar<scalar_t>(1 - dampening),
            add_scalar<scalar_t>(weight_decay), static_cast<float>(momentum), nesterov, maximize};
  }
};

// One vector of SGD elements with torch's operations and roundings:
// d = g + wd p; buf = buf * momentum + (1 - dampening) d; d = nesterov ? d + momentum buf : buf;
// p = p - lr d (each add(x, y, alpha) a fused multiply-add, as in ATen)
template <typename scalar_t>
inline fVec sgd_elem(fVec pk, fVec graw, fVec* buf, bool fresh, const SgdArgs& a) {
  const fVec gk = a.maximize ? graw.neg() : graw;
  fVec d = a.weight_decay != 0 ? rnd<scalar_t>(at::vec::fmadd(pk, fVec(a.weight_decay), gk)) : gk;
  if (buf) {
    const fVec m = fresh ? d : rnd<scalar_t>(at::vec::fmadd(d, fVec(a.damp1), rnd<scalar_t>(*buf * fVec(a.momentum_mul))));
    *buf = m;
    d = a.nesterov ? rnd<scalar_t>(at::vec::fmadd(m, fVec(a.momentum), d)) : m;
  }
  return rnd<scalar_t>(at::vec::fmadd(d, fVec(-a.lr), pk));
}

// Loads and stores of reduced-precision elements a vector of scalar_t (two float vectors)
// at a time, converted in registers: lanes past count load as zero (and zeros add
// nothing to the sums) and are not stored.
template <typename scalar_t>
struct Lanes {
  using bVec = at::vec::Vectorized<scalar_t>;
  static constexpr int64_t size = bVec::size();
  static std::pair<fVec, fVec> load(const scalar_t* p, int64_t count) {
    const bVec v = count == size ? bVec::loadu(p) : bVec::loadu(p, count);
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
    return {lo, hi};
  }
  static void store(const fVec& lo, const fVec& hi, scalar_t* p, int64_t count) {
    const bVec v = at::vec::convert_from_float<scalar_t>(lo, hi);
    if (count == size)
      v.store(p);
    else
      v.store(p, count);
  }
};

template <typename scalar_t>
void sgd_typed(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
               const std::vector<at::Tensor>& bufs, const std::vector<bool>& buf_is_new,
               const std::vector<at::Tensor>& init, at::Tensor& stats, const SgdArgs& a, GramRequests& gram) {
  const bool has_mom = a.momentum != 0;
  chunked(params, stats, [&](int64_t i, int64_t b, int64_t e) {
    const bool fresh = has_mom && buf_is_new[i];
    const int64_t tile = gram.tile(i, kTile);
    std::vector<float> w0buf(2 * tile);  // (two rows: a pipelined Gram term reads the last one's)
    int64_t rows_done = 0;
    Sums sums;
    sums.gv = gram.row_v(i);
    scalar_t* const pp = params[i].data_ptr<scalar_t>();
    scalar_t* const gp = grads[i].data_ptr<scalar_t>();
    scalar_t* const bp = has_mom ? bufs[i].data_ptr<scalar_t>() : nullptr;
    for (int64_t t0 = b; t0 < e; t0 += tile) {
      const int64_t n = std::min(t0 + tile, e) - t0;
      const float* w0 = init.empty() ? nullptr : init_as_float(init[i], t0, n, w0buf.data() + (rows_done++ % 2) * tile);
      if constexpr (std::is_same_v<scalar_t, float>) {
        float *p = pp + t0, *g = gp + t0, *buf = has_mom ? bp + t0 : nullptr;
        over(n, [&](int64_t k, int64_t c) {
          const fVec pk = load(p + k, c), graw = load(g + k, c);
          fVec m = has_mom ? load(buf + k, c) : fVec(0.f);
          const fVec pn = sgd_elem<scalar_t>(pk, graw, has_mom ? &m : nullptr, fresh, a);
          if (has_mom) store(m, buf + k, c);
          store(pn, p + k, c);
          sums.add(pn, pk, graw, w0, k, c);
        });
      } else {
        using L = Lanes<scalar_t>;
        scalar_t *p = pp + t0, *g = gp + t0, *buf = has_mom ? bp + t0 : nullptr;
        for (int64_t k = 0; k < n; k += L::size) {
          const int64_t c = std::min<int64_t>(L::size, n - k);
          auto [p0, p1] = L::load(p + k, c);
          auto [g0, g1] = L::load(g + k, c);
          fVec m0(0.f), m1(0.f);
          if (has_mom) std::tie(m0, m1) = L::load(buf + k, c);
          const fVec n0 = sgd_elem<scalar_t>(p0, g0, has_mom ? &m0 : nullptr, fresh, a);
          const fVec n1 = sgd_elem<scalar_t>(p1, g1, has_mom ? &m1 : nullptr, fresh, a);
          if (has_mom) L::store(m0, m1, buf + k, c);
          L::store(n0, n1, p + k, c);
          sums.add_halves({n0, n1}, {p0, p1}, {g0, g1}, w0, k, c);
        }
      }
      end_tile<scalar_t>(sums, gram, i, pp, init, t0, w0);
    }
    end_chunk<scalar_t>(sums, gram, i, pp, init, b, e, tile);
    return sums.total;
  }, gram);
  gram.finish();
}

struct AdamArgs {
  float decay, w1, beta2, w2, eps;
  bool maximize;
};

// One vector of AdamW elements with torch's single-tensor operations and roundings:
// p *= 1 - lr wd; m = lerp(m, g, 1 - b1) (a fused multiply-add for weights below 0.5);
// v = v b2 + (1 - b2) g g (addcmul, fused); p += (-lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
// (addcdiv, not fused)
template <typename scalar_t>
inline fVec adam_elem(fVec p0, fVec graw, fVec& m, fVec& v, fVec* vmax, fVec neg_step, fVec bc2_sqrt, const AdamArgs& a) {
  const fVec gk = a.maximize ? graw.neg() : graw;
  const fVec pk = rnd<scalar_t>(p0 * fVec(a.decay));
  m = rnd<scalar_t>(at::vec::fmadd(fVec(a.w1), gk - m, m));
  v = rnd<scalar_t>(at::vec::fmadd(fVec(a.w2) * gk, gk, rnd<scalar_t>(v * fVec(a.beta2))));
  fVec vd = v;
  if (vmax) vd = *vmax = at::vec::maximum(*vmax, v);
  const fVec denom = rnd<scalar_t>(rnd<scalar_t>(rnd<scalar_t>(vd.sqrt()) / bc2_sqrt) + fVec(a.eps));
  return rnd<scalar_t>(pk + (neg_step * m) / denom);
}

template <typename scalar_t>
void adamw_typed(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                 const std::vector<at::Tensor>& init, at::Tensor& stats, double lr, double beta1,
                 double beta2, const AdamArgs& a, GramRequests& gram) {
  const bool amsgrad = !max_exp_avg_sqs.empty();
  chunked(params, stats, [&](int64_t i, int64_t b, int64_t e) {
    const double bc1 = 1 - std::pow(beta1, steps[i]), bc2 = 1 - std::pow(beta2, steps[i]);
    const float neg = static_cast<float>(-(lr / bc1)), bc2s = static_cast<float>(std::pow(bc2, 0.5));
    const int64_t tile = gram.tile(i, kTile);
    std::vector<float> w0buf(2 * tile);  // (two rows: a pipelined Gram term reads the last one's)
    int64_t rows_done = 0;
    Sums sums;
    sums.gv = gram.row_v(i);
    scalar_t* const pp = params[i].data_ptr<scalar_t>();
    scalar_t* const gp = grads[i].data_ptr<scalar_t>();
    scalar_t* const mp = exp_avgs[i].data_ptr<scalar_t>();
    scalar_t* const vp = exp_avg_sqs[i].data_ptr<scalar_t>();
    scalar_t* const xp = amsgrad ? max_exp_avg_sqs[i].data_ptr<scalar_t>() : nullptr;
    for (int64_t t0 = b; t0 < e; t0 += tile) {
      const int64_t n = std::min(t0 + tile, e) - t0;
      const float* w0 = init.empty() ? nullptr : init_as_float(init[i], t0, n, w0buf.data() + (rows_done++ % 2) * tile);
      scalar_t *p = pp + t0, *g = gp + t0, *m = mp + t0, *v = vp + t0, *x = amsgrad ? xp + t0 : nullptr;
      if constexpr (std::is_same_v<scalar_t, float>) {
        over(n, [&](int64_t k, int64_t c) {
          const fVec p0 = load(p + k, c), graw = load(g + k, c);
          fVec mk = load(m + k, c), vk = load(v + k, c);
          fVec xk = amsgrad ? load(x + k, c) : fVec(0.f);
          const fVec pn = adam_elem<scalar_t>(p0, graw, mk, vk, amsgrad ? &xk : nullptr, fVec(neg), fVec(bc2s), a);
          store(mk, m + k, c);
          store(vk, v + k, c);
          if (amsgrad) store(xk, x + k, c);
          store(pn, p + k, c);
          sums.add(pn, p0, graw, w0, k, c);
        });
      } else {
        using L = Lanes<scalar_t>;
        for (int64_t k = 0; k < n; k += L::size) {
          const int64_t c = std::min<int64_t>(L::size, n - k);
          auto [p0, p1] = L::load(p + k, c);
          auto [g0, g1] = L::load(g + k, c);
          auto [m0, m1] = L::load(m + k, c);
          auto [v0, v1] = L::load(v + k, c);
          fVec x0(0.f), x1(0.f);
          if (amsgrad) std::tie(x0, x1) = L::load(x + k, c);
          const fVec n0 = adam_elem<scalar_t>(p0, g0, m0, v0, amsgrad ? &x0 : nullptr, fVec(neg), fVec(bc2s), a);
          const fVec n1 = adam_elem<scalar_t>(p1, g1, m1, v1, amsgrad ? &x1 : nullptr, fVec(neg), fVec(bc2s), a);
          L::store(m0, m1, m + k, c);
          L::store(v0, v1, v + k, c);
          if (amsgrad) L::store(x0, x1, x + k, c);
          L::store(n0, n1, p + k, c);
          sums.add_halves({n0, n1}, {p0, p1}, {g0, g1}, w0, k, c);
        }
      }
      end_tile<scalar_t>(sums, gram, i, pp, init, t0, w0);
    }
    end_chunk<scalar_t>(sums, gram, i, pp, init, b, e, tile);
    return sums.total;
  }, gram);
  gram.finish();
}

template <typename F>
void dispatch(at::ScalarType dtype, F f) {
  switch (dtype) {
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: f(float{});
  }
}

}  // namespace

void sgd_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
              const std::vector<at::Tensor>& bufs, const std::vector<bool>& buf_is_new,
              const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const std::vector<int64_t>& gram_index, const std::vector<at::Tensor>& gram_v,
              const std::vector<at::Tensor>& gram_out) {
  std::vector<std::vector<at::Tensor>> same = {grads};
  if (momentum != 0) same.push_back(bufs);
  check_lists("spkern sgd_step", params, same, init, stats);
  check_gram("spkern sgd_step", params, init, gram_index, gram_v, gram_out);
  TORCH_CHECK(momentum == 0 || buf_is_new.size() == params.size(), "spkern sgd_step: buf_is_new");
  if (params.empty()) return;
  GramRequests gram(params.size(), gram_index, gram_v, gram_out);
  // torch's add(x, y, alpha) is fma(y, alpha, x): the same here
  dispatch(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto a = SgdArgs::make<scalar_t>(lr, momentum, dampening, weight_decay, nesterov, maximize);
    sgd_typed<scalar_t>(params, grads, bufs, buf_is_new, init, stats, a, gram);
  });
}

void adamw_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<double>& steps,
                const std::vector<at::Tensor>& init, at::Tensor stats, double lr, double beta1,
                double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                const std::vector<int64_t>& gram_index, const std::vector<at::Tensor>& gram_v,
                const std::vector<at::Tensor>& gram_out) {
  std::vector<std::vector<at::Tensor>> same = {grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) same.push_back(max_exp_avg_sqs);
  check_lists("spkern adamw_step", params, same, init, stats);
  check_gram("spkern adamw_step", params, init, gram_index, gram_v, gram_out);
  TORCH_CHECK(steps.size() == params.size(), "spkern adamw_step: one step count per parameter");
  if (params.empty()) return;
  GramRequests gram(params.size(), gram_index, gram_v, gram_out);
  const std::vector<at::Tensor> none;
  dispatch(params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const AdamArgs a{static_cast<float>(1 - lr * weight_decay), static_cast<float>(1 - beta1),
                     static_cast<float>(beta2), static_cast<float>(1 - beta2), add_scalar<scalar_t>(eps),
                     maximize};
    adamw_typed<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : none,
                               steps, init, stats, lr, beta1, beta2, a, gram);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace spkern
