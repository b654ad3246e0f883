// Debiased center loss (docs/method.md §3.6) and the Wen et al. center update (§3.7): op schemas and CPU
// kernels. The CUDA kernels live in cuda/center_loss.cu; the Python side (fake tensors, autograd,
// argument checks with readable messages) in amgsn/ops/center_loss.py.
//
//   center_loss_forward(features (B, D), labels (B,), centers (C, D), class_weights (C,),
//                       with_stats, check_finite)
//     -> loss      ()      features.dtype   Σ_i w[y_i]·½‖f_i − c[y_i]‖² / Σ_i w[y_i]   (0 when Σ w = 0)
//        inv_wsum  ()      compute dtype    1 / Σ_i w[y_i]  (0 when the sum is 0)
//        delta_sums (C, D) compute dtype    Σ_{i: y_i = j} (f_i − c_j)   ((0, D) without with_stats)
//        counts    (C,)    int64            n_j                          ((0,) without with_stats)
//   center_loss_backward(grad_loss, features, labels, centers, class_weights, inv_wsum)
//     -> ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i])   (B, D) features.dtype
//        (recomputed from the inputs: the forward writes nothing of size B×D)
//   center_stats(features, labels, centers) -> (delta_sums, counts)
//   center_apply(centers!, delta_sums, counts, alpha):  c_j += α·delta_j / (1 + n_j) where n_j > 0
//   center_update(features, labels, centers!, alpha):   the two above fused, in place
//
// "compute dtype" = float64 if features or centers are float64, else float32 (bf16/fp16 features
// are accumulated in float32). Every result is deterministic: each output element is produced by
// one thread, and reductions across rows / column blocks run in a fixed order independent of the
// thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "center_loss.h"

namespace amgsn {
namespace {

using at::Tensor;
using namespace center_loss;

// Rows are cut into column segments of this width, and every row sum is formed segment by
// segment (segments ascending, in double): the with_stats path splits work by segments (each
// thread then owns whole columns of delta_sums: no atomics), the plain path by rows, and both give
// the same bits, independent of the thread count.
constexpr int64_t kColBlock = 128;
// Parallelise only when each thread gets ~100 µs of work: waking the pool costs tens of µs on an
// idle machine and whole scheduler ticks on a busy one.
constexpr int64_t kMinParallelElems = 1 << 18;

int64_t num_col_blocks(int64_t D) { return (D + kColBlock - 1) / kColBlock; }

// Scratch of the calling thread, reused across calls (the "persistent workspace": no per-call heap
// allocation once a shape has been seen). Each use takes its own slot; contents are uninitialised.
enum Scratch { kRowSq, kParts, kStarts, kOrder, kNumScratch };
template <typename T>
T* scratch(Scratch slot, int64_t n) {
  thread_local std::vector<T> buffers[kNumScratch];
  std::vector<T>& buf = buffers[slot];
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf.data();
}

void check_alpha(double alpha) {
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0, "alpha must lie in [0, 1], got ",
                    alpha);
}

// Labels index rows of centers: validate all of them before any kernel touches memory.
void check_label_range(const int64_t* y, int64_t B, int64_t C) {
  for (int64_t i = 0; i < B; ++i) {
    TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "labels[", i, "] = ", y[i], " is outside [0, C) with C = ", C,
                      " classes");
  }
}

// One segment of one row: d = f − c, delta_sums += d (kStats); returns Σ d².
template <typename scalar_t, typename acc_t, bool kStats>
inline acc_t segment(const scalar_t* fr, const acc_t* cr, acc_t* sr, int64_t len) {
  acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < len; ++k) {
    const acc_t d = static_cast<acc_t>(fr[k]) - cr[k];
    if constexpr (kStats) sr[k] += d;
    sq += d * d;
  }
  return sq;
}

// Loss without statistics: rows in parallel; row_sq[i] = Σ_segments ‖d‖².
template <typename scalar_t, typename acc_t>
void loss_pass(const scalar_t* f, const int64_t* y, const acc_t* c, int64_t B, int64_t D, double* row_sq) {
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = y[i];
      double sq = 0.0;
      for (int64_t d0 = 0; d0 < D; d0 += kColBlock) {
        sq += static_cast<double>(
            segment<scalar_t, acc_t, false>(f + i * D + d0, c + j * D + d0, nullptr, std::min(kColBlock, D - d0)));
      }
      row_sq[i] = sq;
    }
  });
}

// Per-class statistics (+ the row sums of the loss with kLoss): column segments in parallel, each
// walking all rows in order, so delta_sums[:, segment] has a single writer.
// sums is uninitialised on entry: each task zeroes its own columns first (at::zeros would fill the
// whole (C, D) buffer in a separate, parallel pass).
template <typename scalar_t, typename acc_t, bool kLoss>
void stats_pass(const scalar_t* f, const int64_t* y, const acc_t* c, int64_t B, int64_t C, int64_t D,
                double* row_sq, acc_t* sums) {
  const int64_t nb = num_col_blocks(D);
  acc_t* part = kLoss ? scratch<acc_t>(kParts, nb * B) : nullptr;
  const int64_t grain = (B + C) * D < kMinParallelElems ? nb : 1;
  at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t d0 = blk * kColBlock;
      const int64_t len = std::min(kColBlock, D - d0);
      for (int64_t j = 0; j < C; ++j) std::fill(sums + j * D + d0, sums + j * D + d0 + len, acc_t(0));
      for (int64_t i = 0; i < B; ++i) {
        const int64_t j = y[i];
        const acc_t sq = segment<scalar_t, acc_t, true>(f + i * D + d0, c + j * D + d0, sums + j * D + d0, len);
        if constexpr (kLoss) part[blk * B + i] = sq;
      }
    }
  });
  if constexpr (kLoss) {
    for (int64_t i = 0; i < B; ++i) {
      double sq = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) sq += static_cast<double>(part[blk * B + i]);
      row_sq[i] = sq;
    }
  }
}

// A row whose ‖d‖² is not finite: name the non-finite input (an overflow of finite inputs is not
// an input error, the loss is then simply inf).
template <typename scalar_t, typename acc_t>
void report_nonfinite_row(const scalar_t* f, const acc_t* c, int64_t i, int64_t j, int64_t D) {
  for (int64_t k = 0; k < D; ++k) {
    const double v = static_cast<double>(f[i * D + k]);
    TORCH_CHECK_VALUE(std::isfinite(v), "features contains a non-finite value at [", i, ", ", k, "]: ", v,
                      " (pass check_finite=False to skip this check)");
  }
  for (int64_t k = 0; k < D; ++k) {
    const double v = static_cast<double>(c[j * D + k]);
    TORCH_CHECK_VALUE(std::isfinite(v), "centers contains a non-finite value at [", j, ", ", k, "]: ", v,
                      " (pass check_finite=False to skip this check)");
  }
}

template <typename scalar_t, typename acc_t>
void forward_impl(const Tensor& f, const Tensor& y, const Tensor& c, const Tensor& w, bool with_stats,
                  bool check_finite, Tensor& loss, Tensor& inv_wsum, Tensor& sums, Tensor& counts) {
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  const int64_t* yp = y.data_ptr<int64_t>();
  const acc_t* cp = c.data_ptr<acc_t>();
  const acc_t* wp = w.data_ptr<acc_t>();
  if (check_finite) {
    for (int64_t j = 0; j < C; ++j) {
      TORCH_CHECK_VALUE(std::isfinite(static_cast<double>(wp[j])) && wp[j] >= 0, "class_weights[", j, "] = ",
                        wp[j], " must be finite and >= 0");
    }
  }
  double* row_sq = scratch<double>(kRowSq, B);
  if (with_stats) {
    stats_pass<scalar_t, acc_t, true>(fp, yp, cp, B, C, D, row_sq, sums.data_ptr<acc_t>());
    int64_t* np = counts.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) ++np[yp[i]];
  } else {
    loss_pass<scalar_t, acc_t>(fp, yp, cp, B, D, row_sq);
  }
  // Final reduction over rows, ascending, in double: fixed order, B values.
  double num = 0.0, wsum = 0.0;
  for (int64_t i = 0; i < B; ++i) {
    const double sq = row_sq[i];
    if (check_finite && !std::isfinite(sq)) report_nonfinite_row<scalar_t, acc_t>(fp, cp, i, yp[i], D);
    const double wi = static_cast<double>(wp[yp[i]]);
    num += wi * 0.5 * sq;
    wsum += wi;
  }
  // No sample carries weight (empty batch, or only zero-weight classes): no loss, no gradient.
  *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(wsum > 0.0 ? num / wsum : 0.0);
  *inv_wsum.data_ptr<acc_t>() = static_cast<acc_t>(wsum > 0.0 ? 1.0 / wsum : 0.0);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> center_loss_forward_cpu(const Tensor& features, const Tensor& labels,
                                                                   const Tensor& centers,
                                                                   const Tensor& class_weights, bool with_stats,
                                                                   bool check_finite) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_class_weights(class_weights, centers, features);
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();  // no copy in the usual float32 / float32 case
  const Tensor w = class_weights.to(acc).contiguous();
  check_label_range(y.data_ptr<int64_t>(), B, C);

  Tensor loss = at::empty({}, f.options());
  Tensor inv_wsum = at::empty({}, f.options().dtype(acc));
  Tensor sums = at::empty({with_stats ? C : 0, D}, f.options().dtype(acc));  // zeroed by stats_pass
  Tensor counts = at::zeros({with_stats ? C : 0}, f.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_forward_cpu", [&] {
    if (acc == at::kDouble) {
      forward_impl<scalar_t, double>(f, y, c, w, with_stats, check_finite, loss, inv_wsum, sums, counts);
    } else {
      forward_impl<scalar_t, float>(f, y, c, w, with_stats, check_finite, loss, inv_wsum, sums, counts);
    }
  });
  return {loss, inv_wsum, sums, counts};
}

std::tuple<Tensor, Tensor> center_stats_cpu(const Tensor& features, const Tensor& labels, const Tensor& centers) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  check_label_range(yp, B, C);
  Tensor sums = at::empty({C, D}, f.options().dtype(acc));  // zeroed by stats_pass
  Tensor counts = at::zeros({C}, f.options().dtype(at::kLong));
  int64_t* np = counts.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) ++np[yp[i]];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_stats_cpu", [&] {
    if (acc == at::kDouble) {
      stats_pass<scalar_t, double, false>(f.data_ptr<scalar_t>(), yp, c.data_ptr<double>(), B, C, D, nullptr,
                                          sums.data_ptr<double>());
    } else {
      stats_pass<scalar_t, float, false>(f.data_ptr<scalar_t>(), yp, c.data_ptr<float>(), B, C, D, nullptr,
                                         sums.data_ptr<float>());
    }
  });
  return {sums, counts};
}

// grad[i] = s·w[y_i]·(f_i − c[y_i]); rows in parallel above kMinParallelElems.
template <typename scalar_t, typename acc_t>
void backward_impl(const scalar_t* f, const int64_t* y, const acc_t* c, const acc_t* w, double s, int64_t B,
                   int64_t D, scalar_t* out) {
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(D, 1));
  at::parallel_for(0, B, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = y[i];
      const acc_t si = static_cast<acc_t>(s * static_cast<double>(w[j]));
      const scalar_t* fr = f + i * D;
      const acc_t* cr = c + j * D;
      scalar_t* gr = out + i * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) gr[k] = static_cast<scalar_t>(si * (static_cast<acc_t>(fr[k]) - cr[k]));
    }
  });
}

// ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i]), recomputed from the inputs in one pass.
Tensor center_loss_backward_cpu(const Tensor& grad_loss, const Tensor& features, const Tensor& labels,
                                const Tensor& centers, const Tensor& class_weights, const Tensor& inv_wsum) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_class_weights(class_weights, centers, features);
  check_backward_scalars(grad_loss, inv_wsum, features);
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  const Tensor w = class_weights.to(acc).contiguous();
  check_label_range(y.data_ptr<int64_t>(), B, C);
  Tensor out = at::empty({B, D}, f.options());
  const double s = grad_loss.item<double>() * inv_wsum.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_backward_cpu", [&] {
    if (acc == at::kDouble) {
      backward_impl<scalar_t, double>(f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<double>(),
                                      w.data_ptr<double>(), s, B, D, out.data_ptr<scalar_t>());
    } else {
      backward_impl<scalar_t, float>(f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<float>(),
                                     w.data_ptr<float>(), s, B, D, out.data_ptr<scalar_t>());
    }
  });
  return out;
}

template <typename cen_t>
void apply_impl(Tensor& c, const Tensor& s, const int64_t* np, double alpha) {
  const int64_t C = c.size(0), D = c.size(1);
  cen_t* cp = c.data_ptr<cen_t>();
  const cen_t* sp = s.data_ptr<cen_t>();
  const int64_t grain = std::max<int64_t>(1, kMinParallelElems / std::max<int64_t>(D, 1));
  at::parallel_for(0, C, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      if (np[j] == 0) continue;  // absent classes keep their centers (their delta is 0 anyway)
      const cen_t scale = static_cast<cen_t>(alpha / (1.0 + static_cast<double>(np[j])));
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) cp[j * D + k] += scale * sp[j * D + k];
    }
  });
}

void center_apply_cpu(Tensor& centers, const Tensor& delta_sums, const Tensor& counts, double alpha) {
  check_stats(centers, delta_sums, counts);
  check_alpha(alpha);
  const int64_t C = centers.size(0);
  const Tensor n = counts.contiguous();
  const int64_t* np = n.data_ptr<int64_t>();
  for (int64_t j = 0; j < C; ++j) TORCH_CHECK_VALUE(np[j] >= 0, "counts[", j, "] = ", np[j], " must be >= 0");
  Tensor c = centers.is_contiguous() ? centers : centers.contiguous();
  const Tensor s = delta_sums.to(c.scalar_type()).contiguous();
  if (c.scalar_type() == at::kDouble) {
    apply_impl<double>(c, s, np, alpha);
  } else {
    apply_impl<float>(c, s, np, alpha);
  }
  if (!c.is_same(centers)) centers.copy_(c);
}

// In-place update without a (C, D) buffer: a counting sort groups the rows by class (stable, so
// every class sums its rows in index order), then each (present class, column block) task sums
// its rows and moves its slice of the center. Nothing is zeroed or touched for absent classes.
template <typename scalar_t, typename cen_t>
void update_impl(const Tensor& f, const int64_t* y, Tensor& c, double alpha) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<cen_t, double>, double,
                                   float>;
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  const scalar_t* fp = f.data_ptr<scalar_t>();
  cen_t* cp = c.data_ptr<cen_t>();
  // starts[0..C] (class segment starts), then present[0..P) and the cursors pos[0..C), in one slot.
  int64_t* start = scratch<int64_t>(kStarts, 3 * C + 1);
  int64_t* present = start + C + 1;
  int64_t* pos = present + C;
  std::fill(start, start + C + 1, int64_t(0));
  for (int64_t i = 0; i < B; ++i) ++start[y[i] + 1];
  int64_t num_present = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (start[j + 1] > 0) present[num_present++] = j;
    start[j + 1] += start[j];
  }
  int64_t* order = scratch<int64_t>(kOrder, B);
  std::copy(start, start + C, pos);
  for (int64_t i = 0; i < B; ++i) order[pos[y[i]]++] = i;
  const int64_t nb = num_col_blocks(D);
  const int64_t tasks = num_present * nb;
  const int64_t grain = B * D < kMinParallelElems ? std::max<int64_t>(tasks, 1) : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    acc_t buf[kColBlock];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = present[t / nb];
      const int64_t d0 = (t % nb) * kColBlock;
      const int64_t len = std::min(kColBlock, D - d0);
      cen_t* cr = cp + j * D + d0;
      std::fill(buf, buf + len, acc_t(0));
      for (int64_t r = start[j]; r < start[j + 1]; ++r) {
        const scalar_t* fr = fp + order[r] * D + d0;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) buf[k] += static_cast<acc_t>(fr[k]) - static_cast<acc_t>(cr[k]);
      }
      const acc_t scale = static_cast<acc_t>(alpha / (1.0 + static_cast<double>(start[j + 1] - start[j])));
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) cr[k] = static_cast<cen_t>(static_cast<acc_t>(cr[k]) + scale * buf[k]);
    }
  });
}

void center_update_cpu(const Tensor& features, const Tensor& labels, Tensor& centers, double alpha) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_alpha(alpha);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const int64_t* yp = y.data_ptr<int64_t>();
  check_label_range(yp, features.size(0), centers.size(0));
  Tensor c = centers.is_contiguous() ? centers : centers.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_update_cpu", [&] {
    if (c.scalar_type() == at::kDouble) {
      update_impl<scalar_t, double>(f, yp, c, alpha);
    } else {
      update_impl<scalar_t, float>(f, yp, c, alpha);
    }
  });
  if (!c.is_same(centers)) centers.copy_(c);
}

// ADInplaceOrView kernels of the two in-place ops: bump the version counter of the centers, as
// every in-place ATen op does, so that autograd refuses a backward that saved the old centers
// (e.g. a loss whose backward runs after the update) instead of silently using the new ones.
void center_apply_inplace(c10::DispatchKeySet ks, Tensor& centers, const Tensor& delta_sums, const Tensor& counts,
                          double alpha) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("amgsn::center_apply", "")
                             .typed<void(Tensor&, const Tensor&, const Tensor&, double)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, centers, delta_sums, counts, alpha);
  centers.unsafeGetTensorImpl()->bump_version();
}

void center_update_inplace(c10::DispatchKeySet ks, const Tensor& features, const Tensor& labels, Tensor& centers,
                           double alpha) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("amgsn::center_update", "")
                             .typed<void(const Tensor&, const Tensor&, Tensor&, double)>();
  op.redispatch(ks & c10::after_ADInplaceOrView_keyset, features, labels, centers, alpha);
  centers.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amgsn, m) {
  // Fake (meta) implementations and autograd are registered from Python.
  m.set_python_module("amgsn.ops.center_loss");
  m.def(
      "center_loss_forward(Tensor features, Tensor labels, Tensor centers, Tensor class_weights, "
      "bool with_stats, bool check_finite) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "center_loss_backward(Tensor grad_loss, Tensor features, Tensor labels, Tensor centers, "
      "Tensor class_weights, Tensor inv_wsum) -> Tensor");
  m.def("center_stats(Tensor features, Tensor labels, Tensor centers) -> (Tensor, Tensor)");
  m.def("center_apply(Tensor(a!) centers, Tensor delta_sums, Tensor counts, float alpha) -> ()");
  m.def("center_update(Tensor features, Tensor labels, Tensor(a!) centers, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(amgsn, ADInplaceOrView, m) {
  m.impl("center_apply", TORCH_FN(center_apply_inplace));
  m.impl("center_update", TORCH_FN(center_update_inplace));
}

TORCH_LIBRARY_IMPL(amgsn, CPU, m) {
  m.impl("center_loss_forward", &center_loss_forward_cpu);
  m.impl("center_loss_backward", &center_loss_backward_cpu);
  m.impl("center_stats", &center_stats_cpu);
  m.impl("center_apply", &center_apply_cpu);
  m.impl("center_update", &center_update_cpu);
}

}  // namespace amgsn
