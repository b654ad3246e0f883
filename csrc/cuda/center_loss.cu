// CUDA kernels of the debiased center loss (docs/method.md §3.6) and the center update (§3.7). Same
// schemas and semantics as the CPU kernels in ../center_loss.cpp (see the table there).
//
// * loss_forward_kernel — one block per sample, one pass over the features: the loss (nothing of
//   size B×D is written: backward recomputes from the inputs). The last block to finish (a
//   "threadfence reduction") sums the per-row partials in a fixed order, so the loss is
//   bit-reproducible and the forward costs one launch. Its block counter and the per-row partials
//   live in a persistent per-(device, stream) workspace: the last block resets the counter, so no
//   call allocates or zero-fills scratch memory. With check_finite (opt-in on CUDA) it also ORs
//   finiteness flags into a small buffer that the host reads: the op's only host sync.
// * Per-class column sums (the forward's statistics, the in-place update): every output element
//   has exactly one writer and sums its rows in index order — no atomics, deterministic, nothing
//   to zero first, and the two label paths below give the same bits.
//   - C <= kSmallClasses: class_column_kernel — one block per (class, 32-256 columns: narrower when
//     the classes are few, so the grid fills the GPU) compacts the rows of its class from the whole
//     label vector (ballot + prefix): O(C·B) label reads, cheapest for the few classes of FER.
//   - larger C: segment_kernel (one block) sorts the batch by class — a counting sort: histogram,
//     exclusive scan (class starts + the list of present classes), stable placement — into the
//     workspace; segment_column_kernel then reads only its own class's rows: O(B + C) label work.
//     The update launches blocks for the present classes only (grid min(B, C) × column blocks).
// * backward_kernel — ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i]), one block per row;
//   the scalars are read on the device (no host sync) in their own dtype (a bf16 grad_loss is not
//   copied to float32 first).
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
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "center_loss.h"

namespace amgsn {
namespace {

using at::Tensor;
using namespace center_loss;

constexpr int kThreads = 256;  // every kernel here but segment_kernel assumes exactly this block size
constexpr int kWarps = kThreads / 32;
constexpr int kSegThreads = 1024;  // segment_kernel: one block
constexpr int kSegWarps = kSegThreads / 32;
// Up to this many classes the per-class kernels scan the labels themselves (class_column_kernel);
// above it the batch is segmented by class first (segment_kernel + segment_column_kernel).
constexpr int64_t kSmallClasses = 32;
// segment_kernel keeps its per-class cursors in shared memory up to this many classes (32 KiB).
constexpr int64_t kSharedCursors = 8192;

// Finiteness flags reported by loss_forward_kernel (one int, OR-ed).
constexpr int kBadFeatures = 1;
constexpr int kBadCenters = 2;
constexpr int kBadWeights = 4;

// ---------------------------------------------------------------------------------------------
// Persistent workspace: one byte buffer per (device, stream), grown on demand, never shrunk.
// Kernels on one stream run in order, so consecutive calls can share it; the one piece of state
// that must hold between calls — loss_forward_kernel's block counter — is reset to 0 by the kernel
// that used it. A new buffer is zeroed once (cudaMemsetAsync on the stream). The map is leaked on
// purpose: no tensor is freed after the CUDA runtime has shut down at exit.
// ---------------------------------------------------------------------------------------------

struct Layout {
  // int32 words: [0] block counter of loss_forward_kernel, [1] number of present classes.
  static constexpr int64_t kHeader = 64;  // bytes, keeps what follows 64-byte aligned
  int64_t row_sq = kHeader;                // B doubles (float or double partials)
  int64_t starts = 0;                      // C + 1 int32: class segment starts (counts while building)
  int64_t present = 0;                     // C int32: present classes, ascending
  int64_t cursor = 0;                      // C int32: segment_kernel's cursors when not in shared memory
  int64_t order = 0;                       // B int32: rows sorted by class, index order within a class
  int64_t bytes = 0;

  Layout(int64_t B, int64_t C, bool segments) {
    auto align = [](int64_t x) { return (x + 63) / 64 * 64; };
    int64_t at = align(row_sq + B * static_cast<int64_t>(sizeof(double)));
    if (segments) {
      starts = at;
      at = align(starts + (C + 1) * 4);
      present = at;
      at = align(present + C * 4);
      cursor = at;
      at = align(cursor + (C > kSharedCursors ? C : 0) * 4);
      order = at;
      at = align(order + B * 4);
    }
    bytes = at;
  }
};

uint8_t* workspace(const at::Device& device, int64_t bytes) {
  static std::mutex mutex;
  static auto* buffers = new std::unordered_map<int64_t, Tensor>();  // leaked: see above
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const int64_t key = (static_cast<int64_t>(stream.id()) << 8) ^ static_cast<int64_t>(device.index());
  const std::lock_guard<std::mutex> lock(mutex);
  Tensor& buf = (*buffers)[key];
  if (!buf.defined() || buf.numel() < bytes) {
    const int64_t size = std::max<int64_t>(bytes, buf.defined() ? 2 * buf.numel() : 4096);
    // The old buffer goes back to the caching allocator, which reuses it only in stream order.
    buf = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
    C10_CUDA_CHECK(cudaMemsetAsync(buf.data_ptr(), 0, static_cast<size_t>(size), stream.stream()));
  }
  return buf.data_ptr<uint8_t>();
}

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
                        int64_t C, int* __restrict__ counter, acc_t* __restrict__ row_sq,
                        int* __restrict__ flags, scalar_t* __restrict__ loss, acc_t* __restrict__ inv_wsum) {
  __shared__ acc_t red[kWarps];
  __shared__ double red64[kWarps];
  __shared__ bool is_last;
  const int64_t i = blockIdx.x;
  const int64_t j = y[i];
  const bool valid = j >= 0 && j < C;
  CUDA_KERNEL_ASSERT_MSG(valid, "center_loss_forward: labels must lie in [0, C)");
  const bool check_finite = flags != nullptr;
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
  if (bad) atomicOr(flags, bad);
  sq = block_sum(sq, red);
  if (threadIdx.x == 0) {
    row_sq[i] = sq;
    __threadfence();  // publish row_sq[i] before counting this block as done
    is_last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
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
    *counter = 0;  // every other block has counted: the workspace is ready for the next call
  }
}

// Writes the column sum of class j over the rows rows(0..n) (in the order given) and, per mode,
// the statistics or the moved center. Shared by the two label paths, so both give the same bits.
template <typename cen_t, typename acc_t, bool kUpdate>
__device__ __forceinline__ void finish_column(cen_t* c, int64_t j, int64_t D, int64_t col, bool has_col, acc_t cv,
                                              acc_t acc, int64_t n, acc_t alpha, acc_t* sums, int64_t* counts) {
  if constexpr (kUpdate) {
    if (has_col && n > 0) c[j * D + col] = static_cast<cen_t>(cv + alpha * acc / static_cast<acc_t>(1 + n));
  } else {
    if (has_col) sums[j * D + col] = acc;
    if (blockIdx.y == 0 && threadIdx.x == 0) counts[j] = n;
  }
}

// kUpdate = false: sums[j, col] = Σ_{i: y_i = j} (f_i − c_j)[col], counts[j] = n_j.
// kUpdate = true:  c[j, col] += α · that sum / (1 + n_j)   (in place, classes with n_j > 0).
// Small C: each block finds its class's rows by scanning all labels. kCols threads per block, one
// column each: with few classes the launcher narrows the blocks so that the grid still fills the GPU
// (C = 7, D = 768: 7 × 3 blocks of 256 would leave 111 of 132 SMs idle; 7 × 24 blocks of 32 do not).
// Every column still sums its rows in index order: the same bits at every width.
template <typename scalar_t, typename cen_t, typename acc_t, bool kUpdate, int kCols>
__global__ void __launch_bounds__(kCols)
    class_column_kernel(const scalar_t* __restrict__ f, const int64_t* __restrict__ y, cen_t* __restrict__ c,
                        int64_t B, int64_t D, int64_t C, acc_t alpha, acc_t* __restrict__ sums,
                        int64_t* __restrict__ counts) {
  static_assert(kCols % 32 == 0 && kCols <= kThreads, "kCols: whole warps, at most kThreads");
  constexpr int kColWarps = kCols / 32;
  __shared__ int rows[kCols];
  __shared__ int warp_total[kColWarps];
  const int64_t j = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kCols + threadIdx.x;
  const bool has_col = col < D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t cv = has_col ? static_cast<acc_t>(c[j * D + col]) : acc_t(0);
  acc_t acc = 0;
  int64_t n = 0;
  for (int64_t base = 0; base < B; base += kCols) {
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
    for (int w = 0; w < kColWarps; ++w) {
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
  finish_column<cen_t, acc_t, kUpdate>(c, j, D, col, has_col, cv, acc, n, alpha, sums, counts);
}

// Exclusive block-wide sum over kSegThreads threads (deterministic); *total gets the block's sum.
__device__ int seg_block_exclusive_sum(int v, int* smem, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int s = smem[lane];  // kSegWarps == 32 partial sums
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, s, o);
      if (lane >= o) s += t;
    }
    smem[lane] = s;  // inclusive prefix over warps
  }
  __syncthreads();
  const int warp_prefix = warp > 0 ? smem[warp - 1] : 0;
  *total = smem[kSegWarps - 1];
  __syncthreads();  // smem is reused by the next call
  return warp_prefix + incl - v;
}

// One block of kSegThreads: a stable counting sort of the batch by class, into the workspace.
//   starts[j]   first position of class j in order[] (starts[C] = number of rows with a valid label)
//   present[p]  the p-th class present in the batch (ascending), *num_present of them
//   order[r]    rows sorted by class, in index order within a class
// Work O(B + C); no atomics decide an order (the histogram's integer atomics only count).
__global__ void __launch_bounds__(kSegThreads)
    segment_kernel(const int64_t* __restrict__ y, int64_t B, int64_t C, int* __restrict__ starts,
                   int* __restrict__ present, int* __restrict__ num_present, int* __restrict__ global_cursor,
                   int* __restrict__ order) {
  extern __shared__ int shared_cursor[];  // C ints when C <= kSharedCursors, else unused
  __shared__ int scan_smem[kSegWarps];
  __shared__ int carry[2];
  int* cursor = C <= kSharedCursors ? shared_cursor : global_cursor;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // 1. histogram (counts kept in starts[])
  for (int64_t j = tid; j <= C; j += kSegThreads) starts[j] = 0;
  if (tid == 0) {
    carry[0] = 0;
    carry[1] = 0;
  }
  __syncthreads();
  for (int64_t i = tid; i < B; i += kSegThreads) {
    const int64_t yi = y[i];
    CUDA_KERNEL_ASSERT_MSG(yi >= 0 && yi < C, "center statistics: labels must lie in [0, C)");
    if (yi >= 0 && yi < C) atomicAdd(starts + yi, 1);
  }
  __syncthreads();
  // 2. exclusive scan of the counts -> starts (and cursors), and the list of present classes
  for (int64_t base = 0; base < C; base += kSegThreads) {
    const int64_t j = base + tid;
    const int n = j < C ? __ldcg(starts + j) : 0;  // the histogram's atomics went to L2
    int tile_rows = 0, tile_present = 0;
    const int before = seg_block_exclusive_sum(n, scan_smem, &tile_rows);
    const int rank = seg_block_exclusive_sum(n > 0 ? 1 : 0, scan_smem, &tile_present);
    if (j < C) {
      const int start = carry[0] + before;
      starts[j] = start;
      cursor[j] = start;
      if (n > 0) present[carry[1] + rank] = static_cast<int>(j);
    }
    __syncthreads();  // every thread has read carry[]
    if (tid == 0) {
      carry[0] += tile_rows;
      carry[1] += tile_present;
    }
    __syncthreads();
  }
  if (tid == 0) {
    starts[C] = carry[0];
    *num_present = carry[1];
  }
  __syncthreads();
  // 3. stable placement, 1024 rows at a time: lanes of a warp with the same label rank among
  // themselves (match + popc), the warps of a tile take their places one after the other.
  for (int64_t base = 0; base < B; base += kSegThreads) {
    const int64_t i = base + tid;
    int64_t yi = i < B ? y[i] : -1;
    if (yi >= C) yi = -1;  // invalid labels (asserted above) take no place
    const unsigned peers = __match_any_sync(0xffffffffu, yi);
    const int leader = __ffs(peers) - 1;
    const int my_rank = __popc(peers & ((1u << lane) - 1u));
    const int64_t rows_left = B - base;
    const int active_warps = rows_left >= kSegThreads ? kSegWarps : static_cast<int>((rows_left + 31) / 32);
    for (int w = 0; w < active_warps; ++w) {
      if (warp == w) {
        int first = 0;
        if (yi >= 0 && lane == leader) {
          first = cursor[yi];
          cursor[yi] = first + __popc(peers);
        }
        first = __shfl_sync(0xffffffffu, first, leader);
        if (yi >= 0) order[first + my_rank] = static_cast<int>(i);
      }
      __syncthreads();  // the next warp reads the cursors this one moved
    }
  }
}

// The per-class column sums from the segments: grid (classes, column blocks). For the statistics
// block x is class x (absent classes write zeros); for the update it is the x-th present class.
template <typename scalar_t, typename cen_t, typename acc_t, bool kUpdate>
__global__ void __launch_bounds__(kThreads)
    segment_column_kernel(const scalar_t* __restrict__ f, const int* __restrict__ starts,
                          const int* __restrict__ present, const int* __restrict__ num_present,
                          const int* __restrict__ order, cen_t* __restrict__ c, int64_t D, acc_t alpha,
                          acc_t* __restrict__ sums, int64_t* __restrict__ counts) {
  int64_t j = blockIdx.x;
  if constexpr (kUpdate) {
    if (static_cast<int>(blockIdx.x) >= *num_present) return;
    j = present[blockIdx.x];
  }
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool has_col = col < D;
  const int first = starts[j], last = starts[j + 1];
  const acc_t cv = has_col ? static_cast<acc_t>(c[j * D + col]) : acc_t(0);
  acc_t acc = 0;
  if (has_col) {
    for (int r = first; r < last; ++r) acc += static_cast<acc_t>(f[static_cast<int64_t>(order[r]) * D + col]) - cv;
  }
  finish_column<cen_t, acc_t, kUpdate>(c, j, D, col, has_col, cv, acc, static_cast<int64_t>(last - first), alpha,
                                       sums, counts);
}

// ∂L/∂f_i = grad_loss · inv_wsum · w[y_i]·(f_i − c[y_i]); grid = rows. grad_loss and inv_wsum are
// read in their own dtypes (grad_t, inv_t).
template <typename scalar_t, typename acc_t, typename grad_t, typename inv_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const grad_t* __restrict__ grad_loss, const scalar_t* __restrict__ f,
                    const int64_t* __restrict__ y, const acc_t* __restrict__ c, const acc_t* __restrict__ w,
                    const inv_t* __restrict__ inv_wsum, int64_t D, int64_t C, scalar_t* __restrict__ out) {
  const int64_t i = blockIdx.x;
  const int64_t j = y[i];
  const bool valid = j >= 0 && j < C;
  CUDA_KERNEL_ASSERT_MSG(valid, "center_loss_backward: labels must lie in [0, C)");
  const acc_t s =
      valid ? static_cast<acc_t>(*grad_loss) * static_cast<acc_t>(*inv_wsum) * w[j] : acc_t(0);
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

// SMs of a device, asked once per device (cudaDeviceGetAttribute does not synchronise).
int64_t multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int64_t> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return counts[device] = std::max(sms, 1);
}

unsigned column_blocks(int64_t C, int64_t D) {
  const int64_t col_blocks = (D + kThreads - 1) / kThreads;
  TORCH_CHECK_VALUE(C <= 2147483647 && col_blocks <= 65535, "centers of shape (", C, ", ", D,
                    ") are too large for the CUDA kernels");
  return static_cast<unsigned>(std::max<int64_t>(col_blocks, 1));
}

// Per-class column sums (statistics into sums/counts, or the in-place update of c) by the label
// path that suits C. B >= 1.
template <typename scalar_t, typename cen_t, typename acc_t, bool kUpdate>
void launch_class_columns(const Tensor& f, const Tensor& y, cen_t* c, int64_t C, acc_t alpha, acc_t* sums,
                          int64_t* counts) {
  const int64_t B = f.size(0), D = f.size(1);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const unsigned cols = column_blocks(C, D);
  if (C <= kSmallClasses) {
    // The widest block (of 256, 128, 64, 32 columns) whose grid has at least two blocks per SM.
    const int64_t target = 2 * multiprocessor_count(f.device().index());
    int width = kThreads;
    while (width > 32 && C * ((D + width - 1) / width) < target) width /= 2;
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(std::max<int64_t>((D + width - 1) / width, 1)));
    const auto* fp = f.data_ptr<scalar_t>();
    const auto* yp = y.data_ptr<int64_t>();
    switch (width) {
      case 256:
        class_column_kernel<scalar_t, cen_t, acc_t, kUpdate, 256><<<grid, 256, 0, stream>>>(fp, yp, c, B, D, C, alpha, sums, counts);
        break;
      case 128:
        class_column_kernel<scalar_t, cen_t, acc_t, kUpdate, 128><<<grid, 128, 0, stream>>>(fp, yp, c, B, D, C, alpha, sums, counts);
        break;
      case 64:
        class_column_kernel<scalar_t, cen_t, acc_t, kUpdate, 64><<<grid, 64, 0, stream>>>(fp, yp, c, B, D, C, alpha, sums, counts);
        break;
      default:
        class_column_kernel<scalar_t, cen_t, acc_t, kUpdate, 32><<<grid, 32, 0, stream>>>(fp, yp, c, B, D, C, alpha, sums, counts);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  TORCH_CHECK_VALUE(B <= 2147483647, "features has too many rows for the CUDA kernels: ", B);
  const Layout layout(B, C, /*segments=*/true);
  uint8_t* ws = workspace(f.device(), layout.bytes);
  int* header = reinterpret_cast<int*>(ws);
  int* starts = reinterpret_cast<int*>(ws + layout.starts);
  int* present = reinterpret_cast<int*>(ws + layout.present);
  int* order = reinterpret_cast<int*>(ws + layout.order);
  int* global_cursor = reinterpret_cast<int*>(ws + layout.cursor);
  const size_t smem = C <= kSharedCursors ? static_cast<size_t>(C) * sizeof(int) : 0;
  segment_kernel<<<1, kSegThreads, smem, stream>>>(y.data_ptr<int64_t>(), B, C, starts, present, header + 1,
                                                   global_cursor, order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The update needs blocks for the present classes only: at most min(B, C) of them.
  const int64_t blocks = kUpdate ? std::min(B, C) : C;
  segment_column_kernel<scalar_t, cen_t, acc_t, kUpdate><<<dim3(static_cast<unsigned>(blocks), cols), kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), starts, present, header + 1, order, c, D, alpha, sums, counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_forward(const Tensor& f, const Tensor& y, const Tensor& c, const Tensor& w, bool with_stats,
                    int* flags, Tensor& loss, Tensor& inv_wsum, Tensor& sums, Tensor& counts) {
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Layout layout(B, C, /*segments=*/false);
  uint8_t* ws = workspace(f.device(), layout.bytes);
  loss_forward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<acc_t>(), w.data_ptr<acc_t>(), B, D, C,
      reinterpret_cast<int*>(ws), reinterpret_cast<acc_t*>(ws + layout.row_sq), flags, loss.data_ptr<scalar_t>(),
      inv_wsum.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_stats) {
    launch_class_columns<scalar_t, acc_t, acc_t, false>(f, y, const_cast<acc_t*>(c.data_ptr<acc_t>()), C, acc_t(0),
                                                        sums.data_ptr<acc_t>(), counts.data_ptr<int64_t>());
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
  const Tensor f = features.contiguous();  // bf16 / fp16 features are read as they are
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();  // no copy in the usual float32 / float32 case
  const Tensor w = class_weights.to(acc).contiguous();
  Tensor loss = at::empty({}, f.options());  // written by the last block of loss_forward_kernel
  Tensor inv_wsum = at::empty({}, f.options().dtype(acc));
  // The column kernels write every element: no zero fill needed.
  Tensor sums = at::empty({with_stats ? C : 0, D}, f.options().dtype(acc));
  Tensor counts = at::empty({with_stats ? C : 0}, f.options().dtype(at::kLong));
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
  // Opt-in check (check_finite=True): its own zeroed flag word, read back below — the one host sync.
  Tensor flags = check_finite ? at::zeros({1}, f.options().dtype(at::kInt)) : Tensor();
  int* flags_ptr = check_finite ? flags.data_ptr<int>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_forward_cuda", [&] {
    if (acc == at::kDouble) {
      launch_forward<scalar_t, double>(f, y, c, w, with_stats, flags_ptr, loss, inv_wsum, sums, counts);
    } else {
      launch_forward<scalar_t, float>(f, y, c, w, with_stats, flags_ptr, loss, inv_wsum, sums, counts);
    }
  });
  if (check_finite) {
    const int bits = flags.item<int>();
    TORCH_CHECK_VALUE(!(bits & kBadFeatures),
                      "features contains non-finite values (pass check_finite=False to skip this check)");
    TORCH_CHECK_VALUE(!(bits & kBadCenters),
                      "centers contains non-finite values (pass check_finite=False to skip this check)");
    TORCH_CHECK_VALUE(!(bits & kBadWeights), "class_weights must be finite and >= 0");
  }
  return {loss, inv_wsum, sums, counts};
}

template <typename scalar_t, typename acc_t, typename grad_t, typename inv_t>
void launch_backward(const Tensor& go, const Tensor& f, const Tensor& y, const Tensor& c, const Tensor& w,
                     const Tensor& inv, Tensor& out) {
  const int64_t B = f.size(0), D = f.size(1), C = c.size(0);
  backward_kernel<scalar_t, acc_t, grad_t, inv_t>
      <<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          go.data_ptr<grad_t>(), f.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), c.data_ptr<acc_t>(),
          w.data_ptr<acc_t>(), inv.data_ptr<inv_t>(), D, C, out.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Tensor center_loss_backward_cuda(const Tensor& grad_loss, const Tensor& features, const Tensor& labels,
                                 const Tensor& centers, const Tensor& class_weights, const Tensor& inv_wsum) {
  check_features(features);
  check_labels(labels, features);
  check_centers(centers, features);
  check_class_weights(class_weights, centers, features);
  check_backward_scalars(grad_loss, inv_wsum, features);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = features.size(0), D = features.size(1);
  TORCH_CHECK_VALUE(B <= 2147483647, "features has too many rows for the CUDA kernel: ", B);
  const auto acc = compute_dtype(features, centers);
  const Tensor f = features.contiguous();
  const Tensor y = labels.contiguous();
  const Tensor c = centers.to(acc).contiguous();
  const Tensor w = class_weights.to(acc).contiguous();
  // The two 0-dim scalars are read by the kernel in their own dtypes: autograd's grad_loss has the
  // dtype of the loss (= features), inv_wsum the compute dtype. Any other pairing (a direct call of
  // the op) is converted here, 1 element each.
  const Tensor go = grad_loss.scalar_type() == f.scalar_type() ? grad_loss : grad_loss.to(acc);
  const Tensor inv = inv_wsum.to(acc);
  Tensor out = at::empty({B, D}, f.options());
  if (B == 0 || D == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_loss_backward_cuda", [&] {
    const bool same = go.scalar_type() == f.scalar_type();
    if (acc == at::kDouble) {
      if (same) {
        launch_backward<scalar_t, double, scalar_t, double>(go, f, y, c, w, inv, out);
      } else {
        launch_backward<scalar_t, double, double, double>(go, f, y, c, w, inv, out);
      }
    } else {
      if (same) {
        launch_backward<scalar_t, float, scalar_t, float>(go, f, y, c, w, inv, out);
      } else {
        launch_backward<scalar_t, float, float, float>(go, f, y, c, w, inv, out);
      }
    }
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
  if (B == 0) {
    sums.zero_();
    counts.zero_();
    return {sums, counts};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.scalar_type(), "center_stats_cuda", [&] {
    if (acc == at::kDouble) {
      launch_class_columns<scalar_t, double, double, false>(f, y, const_cast<double*>(c.data_ptr<double>()), C, 0.0,
                                                            sums.data_ptr<double>(), counts.data_ptr<int64_t>());
    } else {
      launch_class_columns<scalar_t, float, float, false>(f, y, const_cast<float*>(c.data_ptr<float>()), C, 0.0f,
                                                          sums.data_ptr<float>(), counts.data_ptr<int64_t>());
    }
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
  launch_class_columns<scalar_t, cen_t, acc_t, true>(f, y, c.data_ptr<cen_t>(), c.size(0), static_cast<acc_t>(alpha),
                                                     nullptr, nullptr);
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
