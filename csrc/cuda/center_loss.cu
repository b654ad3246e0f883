// CUDA kernels of the debiased center loss (docs/method.md §3.6) and the center update (§3.7). Same
// schemas and semantics as the CPU kernels in ../center_loss.cpp (see the table there).
//
// * loss_forward_kernel — one block per sample, one pass over the features: the loss and the
//   finiteness flags (nothing of size B×D is written: backward recomputes from the inputs). The last block to finish (a
//   "threadfence reduction") sums the per-row partials in a fixed order, so the loss is
//   bit-reproducible and the whole forward statistic costs one launch.
// * class_column_kernel — one block per (class, 256 columns): the block compacts the row indices
//   of its class (ballot + prefix, in index order) and each thread sums its column over them.
//   Every output element has exactly one writer and a fixed summation order: no atomics, results
//   are deterministic, and nothing needs zeroing first. Used for the per-class sums of the forward
//   (with_stats) and, writing into the centers directly, for the fused in-place update.
// * backward_kernel — ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i]), one block per row
//   (the scalars are read on the device: no host sync).
// * apply_kernel — c_j += α·delta_j / (1 + n_j) from (all-reduced) statistics.
//
// Labels outside [0, C) trip a device-side assert; the kernels also guard every such index, so a
// build without device asserts still never reads or writes out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "center_loss.h"

namespace amgsn {
namespace {

using at::Tensor;
using namespace center_loss;

constexpr int kThreads = 256;  // every kernel here assumes exactly this block size
constexpr int kWarps = kThreads / 32;

// Finiteness flags reported by loss_forward_kernel (one int, OR-ed).
constexpr int kBadFeatures = 1;
constexpr int kBadCenters = 2;
constexpr int kBadWeights = 4;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Fixed-shape tree reduction (deterministic); the result is valid in thread 0.
template <typename T>
__device__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? smem[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  __syncthreads();  // smem may be reused by the caller
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    loss_forward_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ y,
                        const acc_t* __restrict__ c, const acc_t* __restrict__ w, int64_t B, int64_t D,
                        int64_t C, bool check_finite, acc_t* __restrict__ row_sq,
                        scalar_t* __restrict__ loss, acc_t* __restrict__ inv_wsum, int* __restrict__ ws) {
  __shared__ acc_t red[kWarps];
  __shared__ double red64[kWarps];
  __shared__ bool is_last;
  const int64_t i = blockIdx.x;
  const int64_t j = y[i];
  const bool valid = j >= 0 && j < C;
  CUDA_KERNEL_ASSERT_MSG(valid, "center_loss_forward: labels must lie in [0, C)");
  int bad = 0;
  acc_t sq = 0;
  if (valid) {
    for (int64_t k = threadIdx.x; k < D; k += kThreads) {
      const acc_t fv = static_cast<acc_t>(f[i * D + k]);
      const acc_t cv = c[j * D + k];
      const acc_t d = fv - cv;
      sq += d * d;
      if (check_finite) {
        if (!isfinite(fv)) bad |= kBadFeatures;
        if (!isfinite(cv)) bad |= kBadCenters;
      }
    }
  }
  if (check_finite && blockIdx.x == 0) {
    for (int64_t k = threadIdx.x; k < C; k += kThreads) {
      const acc_t v = w[k];
      if (!(v >= acc_t(0)) || isinf(v)) bad |= kBadWeights;  // !(v >= 0) also catches NaN
    }
  }
  if (bad) atomicOr(ws + 1, bad);
  sq = block_sum(sq, red);
  if (threadIdx.x == 0) {
    row_sq[i] = sq;
    __threadfence();  // publish row_sq[i] before counting this block as done
    is_last = atomicAdd(ws, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!is_last) return;
  // Last block: every row_sq is visible (fence above); sum rows in a fixed order, in double.
  __threadfence();
  double num = 0.0, wsum = 0.0;
  for (int64_t r = threadIdx.x; r < B; r += kThreads) {
    const int64_t jr = y[r];
    const double wr = (jr >= 0 && jr < C) ? static_cast<double>(w[jr]) : 0.0;
    num += wr * 0.5 * static_cast<double>(__ldcg(row_sq + r));  // L2 read: never a stale L1 line
    wsum += wr;
  }
  num = block_sum(num, red64);
  wsum = block_sum(wsum, red64);
  if (threadIdx.x == 0) {
    // No sample carries weight (only zero-weight classes): no loss, no gradient.
    *loss = static_cast<scalar_t>(wsum > 0.0 ? num / wsum : 0.0);
    *inv_wsum = static_cast<acc_t>(wsum > 0.0 ? 1.0 / wsum : 0.0);
  }
}

// kUpdate = false: sums[j, col] = Σ_{i: y_i = j} (f_i − c_j)[col], counts[j] = n_j.
// kUpdate = true:  c[j, col] += α · that sum / (1 + n_j)   (in place, classes with n_j > 0).
template <typename scalar_t, typename cen_t, typename acc_t, bool kUpdate>
__global__ void __launch_bounds__(kThreads)
    class_column_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ y, cen_t* __restrict__ c,
                        int64_t B, int64_t D, int64_t C, acc_t alpha, acc_t* __restrict__ sums,
                        int64_t* __restrict__ counts) {
  __shared__ int rows[kThreads];
  __shared__ int warp_total[kWarps];
  const int64_t j = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool has_col = col < D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t cv = has_col ? static_cast<acc_t>(c[j * D + col]) : acc_t(0);
  acc_t acc = 0;
  int64_t n = 0;
  for (int64_t base = 0; base < B; base += kThreads) {
    // Compact this chunk's rows of class j into rows[], keeping index order.
    const int64_t i = base + threadIdx.x;
    bool match = false;
    if (i < B) {
      const int64_t yi = y[i];
      CUDA_KERNEL_ASSERT_MSG(yi >= 0 && yi < C, "center statistics: labels must lie in [0, C)");
      match = yi == j;
    }
    const unsigned mask = __ballot_sync(0xffffffffu, match);
    if (lane == 0) warp_total[warp] = __popc(mask);
    __syncthreads();
    int offset = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int t = warp_total[w];
      offset += w < warp ? t : 0;
      total += t;
    }
    if (match) rows[offset + __popc(mask & ((1u << lane) - 1u))] = static_cast<int>(threadIdx.x);
    __syncthreads();
    if (has_col) {
      for (int r = 0; r < total; ++r) acc += static_cast<acc_t>(f[(base + rows[r]) * D + col]) - cv;
    }
    n += total;
    __syncthreads();  // rows / warp_total are rewritten by the next chunk
  }
  if constexpr (kUpdate) {
    if (has_col && n > 0) c[j * D + col] = static_cast<cen_t>(cv + alpha * acc / static_cast<acc_t>(1 + n));
  } else {
    if (has_col) sums[j * D + col] = acc;
    if (blockIdx.y == 0 && threadIdx.x == 0) counts[j] = n;
  }
}

// ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i]); grid = rows.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const acc_t* __restrict__ grad_loss, const scalar_t* __restrict__ f,
                    const int64_t* __restrict__ y, const acc_t* __restrict__ c, const acc_t* __restrict__ w,
                    const acc_t* __restrict__ inv_wsum, int64_t D, int64_t C, scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t j = y[i];
  const bool valid = j >= 0 && j < C;
  CUDA_KERNEL_ASSERT_MSG(valid, "center_loss_backward: labels must lie in [0, C)");
  const acc_t s = valid ? *grad_loss * *inv_wsum * w[j] : acc_t(0);
  for (int64_t k = threadIdx.x; k < D; k += kThreads) {
    const acc_t d = valid ? static_cast<acc_t>(f[i * D + k]) - c[j * D + k] : acc_t(0);
    out[i * D + k] = static_cast<scalar_t>(s * d);
  }
}

template <typename cen_t>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(cen_t* __restrict__ c, const cen_t* __restrict__ s, const int64_t* __restrict__ counts,
                 int64_t C, int64_t D, double alpha) {
  const int64_t total = C * D;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t nj = counts[idx / D];
    CUDA_KERNEL_ASSERT_MSG(nj >= 0, "center_apply: counts must be >= 0");
    if (nj > 0) c[idx] += static_cast<cen_t>(alpha / (1.0 + static_cast<double>(nj))) * s[idx];
  }
}

dim3 class_column_grid(int64_t C, int64_t D) {
  const int64_t col_blocks = (D + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(C <= 2147483647 && col_blocks <= 65535, "centers of shape (", C, ", ", D,
                    ") are too large for the CUDA kernels");
  return dim3(static_cast<unsigned>(C), static_cast<unsigned>(std::max<int64_t>(col_blocks, 1)));
}

template <typename scalar_t, typename acc_t>
void launch_forward(const Tensor& f, const Tensor& y, const Tensor& c, const Tensor& w, bool with_stats,
                    bool check_finite, Tensor& loss, Tensor& inv_wsum, Tensor& sums, Tensor& counts,
                    Tensor& ws) {
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor row_sq = at::empty({B}, c.options());
  loss_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<acc_t>(), w.data_ptr<acc_t>(), B, D, C,
      check_finite, row_sq.data_ptr<acc_t>(), loss.data_ptr<scalar_t>(),
      inv_wsum.data_ptr<acc_t>(), ws.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_stats) {
    class_column_kernel<scalar_t, acc_t, acc_t, false><<<class_column_grid(C, D), kThreads, 0, stream>>>(
        f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), const_cast<acc_t*>(c.data_ptr<acc_t>()), B, D, C,
        acc_t(0), sums.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> center_loss_forward_cuda(const Tensor& features, const Tensor& labels,
                                                                    const Tensor& centers,
                                                                    const Tensor& class_weights, bool with_stats,
                                                                    bool check_finite) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_class_weights(class_weights, centers, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  TORCH_CHECK_VALUE(B <= 2147483647, "features has too many rows for the CUDA kernel: ", B);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  const Tensor w = class_weights.to(acc).contiguous();
  Tensor loss = at::empty({}, f.options());  // written by the last block of loss_forward_kernel
  Tensor inv_wsum = at::empty({}, f.options().dtype(acc));
  // class_column_kernel writes every element: no zero fill needed.
  Tensor sums = at::empty({with_stats ? C : 0, D}, f.options().dtype(acc));
  Tensor counts = at::empty({with_stats ? C : 0}, f.options().dtype(at::kLong));
  Tensor ws = at::zeros({2}, f.options().dtype(at::kInt));  // [blocks done, finiteness flags]
  if (B == 0) {
    loss.zero_();
    inv_wsum.zero_();
    if (check_finite) {
      TORCH_CHECK_VALUE(!((w < 0) | w.isfinite().logical_not()).any().item<bool>(),
                        "class_weights must be finite and >= 0");
    }
    if (with_stats) {
      sums.zero_();
      counts.zero_();
    }
    return {loss, inv_wsum, sums, counts};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_forward_cuda", [&] {
    if (acc == at::kDouble) {
      launch_forward<scalar_t, double>(f, y, c, w, with_stats, check_finite, loss, inv_wsum, sums, counts, ws);
    } else {
      launch_forward<scalar_t, float>(f, y, c, w, with_stats, check_finite, loss, inv_wsum, sums, counts, ws);
    }
  });
  if (check_finite) {
    // The one host sync of the op; check_finite=False skips it.
    const int flags = ws[1].item<int>();
    TORCH_CHECK_VALUE(!(flags & kBadFeatures),
                      "features contains non-finite values (pass check_finite=False to skip this check)");
    TORCH_CHECK_VALUE(!(flags & kBadCenters),
                      "centers contains non-finite values (pass check_finite=False to skip this check)");
    TORCH_CHECK_VALUE(!(flags & kBadWeights), "class_weights must be finite and >= 0");
  }
  return {loss, inv_wsum, sums, counts};
}

Tensor center_loss_backward_cuda(const Tensor& grad_loss, const Tensor& features, const Tensor& labels,
                                 const Tensor& centers, const Tensor& class_weights, const Tensor& inv_wsum) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_class_weights(class_weights, centers, features);
  check_backward_scalars(grad_loss, inv_wsum, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  TORCH_CHECK_VALUE(B <= 2147483647, "features has too many rows for the CUDA kernel: ", B);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  const Tensor w = class_weights.to(acc).contiguous();
  const Tensor go = grad_loss.to(acc);  // 0-dim, read by the kernel
  const Tensor inv = inv_wsum.to(acc);
  Tensor out = at::empty({B, D}, f.options());
  if (B == 0 || D == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_backward_cuda", [&] {
    if (acc == at::kDouble) {
      backward_kernel<scalar_t, double><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          go.data_ptr<double>(), f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<double>(),
          w.data_ptr<double>(), inv.data_ptr<double>(), D, C, out.data_ptr<scalar_t>());
    } else {
      backward_kernel<scalar_t, float><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          go.data_ptr<float>(), f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<float>(),
          w.data_ptr<float>(), inv.data_ptr<float>(), D, C, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> center_stats_cuda(const Tensor& features, const Tensor& labels, const Tensor& centers) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), D = features.size(1), C = centers.size(0);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  Tensor sums = at::empty({C, D}, f.options().dtype(acc));
  Tensor counts = at::empty({C}, f.options().dtype(at::kLong));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_stats_cuda", [&] {
    if (acc == at::kDouble) {
      class_column_kernel<scalar_t, double, double, false><<<class_column_grid(C, D), kThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), const_cast<double*>(c.data_ptr<double>()), B, D, C, 0.0,
          sums.data_ptr<double>(), counts.data_ptr<int64_t>());
    } else {
      class_column_kernel<scalar_t, float, float, false><<<class_column_grid(C, D), kThreads, 0, stream>>>(
          f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), const_cast<float*>(c.data_ptr<float>()), B, D, C, 0.0f,
          sums.data_ptr<float>(), counts.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

void center_apply_cuda(Tensor& centers, const Tensor& delta_sums, const Tensor& counts, double alpha) {
  check_stats(centers, delta_sums, counts);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0, "alpha must lie in [0, 1], got ", alpha);
  const c10::cuda::CUDAGuard guard(centers.device());
  const int64_t C = centers.size(0), D = centers.size(1);
  Tensor c = centers.is_contiguous() ? centers : centers.contiguous();
  const Tensor s = delta_sums.to(c.scalar_type()).contiguous();
  const Tensor n = counts.contiguous();
  const int64_t total = C * D;
  if (total > 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "center_apply_cuda", [&] {
      apply_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(c.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
                                                              n.data_ptr<int64_t>(), C, D, alpha);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!c.is_same(centers)) centers.copy_(c);
}

template <typename scalar_t, typename cen_t>
void launch_update(const Tensor& f, const Tensor& y, Tensor& c, double alpha) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double> || std::is_same_v<cen_t, double>, double,
                                   float>;
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  class_column_kernel<scalar_t, cen_t, acc_t, true>
      <<<class_column_grid(C, D), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<cen_t>(), B, D, C, static_cast<acc_t>(alpha),
          nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void center_update_cuda(const Tensor& features, const Tensor& labels, Tensor& centers, double alpha) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0.0 && alpha <= 1.0, "alpha must lie in [0, 1], got ", alpha);
  const c10::cuda::CUDAGuard guard(features.device());
  if (features.size(0) == 0) return;
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  Tensor c = centers.is_contiguous() ? centers : centers.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_update_cuda", [&] {
    if (c.scalar_type() == at::kDouble) {
      launch_update<scalar_t, double>(f, y, c, alpha);
    } else {
      launch_update<scalar_t, float>(f, y, c, alpha);
    }
  });
  if (!c.is_same(centers)) centers.copy_(c);
}

}  // namespace

TORCH_LIBRARY_IMPL(amgsn, CUDA, m) {
  m.impl("center_loss_forward", &center_loss_forward_cuda);
  m.impl("center_loss_backward", &center_loss_backward_cuda);
  m.impl("center_stats", &center_stats_cuda);
  m.impl("center_apply", &center_apply_cuda);
  m.impl("center_update", &center_update_cuda);
}

}  // namespace amgsn
