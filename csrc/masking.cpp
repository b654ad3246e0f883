// CPU kernels of the ABMG masking operators (docs/method.md §3.1–3.5).
//
// These are the CPU halves of the public ops in amgsn/ops/masking.py (torch.library custom ops,
// whose CUDA halves are Triton kernels). Argument validation with readable messages happens in
// Python before these run; the checks here only guarantee that a direct call with bad indices
// raises instead of reading or writing out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace amgsn {
namespace {

// Work per image is small (N ~ 200): hand each thread a few images at a time.
constexpr int64_t kImagesPerTask = 4;

// (B, N) scores -> per-image kept ids (ascending) and the mask (True = masked).
//
// Values are ranked in float64: v = f64(s) + f64(noise) * scale, scale = 1 or the image's score range
// (relative noise). Each input keeps at least its own precision: float64 scores / noise are read as they
// are, narrower ones go through float32 first (exact), and the range is taken in the scores' precision
// (float32, or float64 for float64 scores). For float32 operands the product is exact in double, so this
// matches the reference and the Triton kernel bit for bit; with a float64 operand all three multiply and
// then add without contraction (this file is built without FMA). Order = (v descending, index
// ascending); the first N - num_keep in that order are masked. std::nth_element finds that set in O(N)
// per image. NaN (docs/method.md, "Masking ops: edge cases"): a NaN value ranks as -inf, and the
// relative-noise range is taken over the non-NaN scores — the rule of the reference and the Triton kernels.
template <typename S, typename Z>
void select_images(const S* sp, const Z* np, const int64_t* kp, const int32_t* cp, int64_t B, int64_t N,
                   bool relative_noise, int64_t* ip, bool* mp) {
  at::parallel_for(0, B, kImagesPerTask, [&](int64_t begin, int64_t end) {
    std::vector<double> v(N);
    std::vector<int32_t> order(N);
    for (int64_t b = begin; b < end; ++b) {
      const S* s = sp + b * N;
      double scale = 1.0;
      if (np != nullptr && relative_noise) {
        S lo = INFINITY, hi = -INFINITY;
        for (int64_t n = 0; n < N; ++n) {
          if (std::isnan(s[n])) continue;
          lo = std::min(lo, s[n]);
          hi = std::max(hi, s[n]);
        }
        const S span = hi - lo;  // in the scores' precision, as the reference
        if (span > S(0)) scale = static_cast<double>(span);
      }
      for (int64_t n = 0; n < N; ++n) {
        double value = static_cast<double>(s[n]);
        if (np != nullptr) value += static_cast<double>(np[b * N + n]) * scale;
        // NaN would break the strict ordering nth_element relies on: it ranks as -inf.
        v[n] = std::isnan(value) ? -INFINITY : value;
      }
      const int64_t num_mask = N - kp[b];
      bool* m = mp + b * N;
      std::fill(m, m + N, false);
      if (num_mask > 0) {
        std::iota(order.begin(), order.end(), 0);
        const auto before = [&v](int32_t i, int32_t j) { return v[i] > v[j] || (v[i] == v[j] && i < j); };
        if (num_mask < N) std::nth_element(order.begin(), order.begin() + (num_mask - 1), order.end(), before);
        for (int64_t r = 0; r < num_mask; ++r) m[order[r]] = true;
      }
      int64_t* out = ip + cp[b];
      for (int64_t n = 0; n < N; ++n)
        if (!m[n]) *out++ = n;
    }
  });
}

// float64 stays float64; every narrower float goes to float32 (exactly).
at::Tensor widen(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t : t.to(at::kFloat)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> abmg_select_cpu(const at::Tensor& scores, const at::Tensor& num_keep,
                                                   const at::Tensor& cu_seqlens, int64_t total,
                                                   const std::optional<at::Tensor>& noise,
                                                   bool relative_noise) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be (B, N)");
  const int64_t B = scores.size(0), N = scores.size(1);
  const at::Tensor s = widen(scores);
  const at::Tensor nk = num_keep.to(at::kLong).contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  TORCH_CHECK_VALUE(nk.numel() == B && cu.numel() == B + 1, "num_keep/cu_seqlens do not match scores");
  at::Tensor z;
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(noise->sizes() == scores.sizes(), "noise must have the shape of scores");
    z = widen(*noise);
  }
  const int64_t* kp = nk.data_ptr<int64_t>();
  const int32_t* cp = cu.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(kp[b] >= 1 && kp[b] <= N, "num_keep must lie in [1, N]");
    TORCH_CHECK_VALUE(cp[b + 1] - cp[b] == kp[b], "cu_seqlens must be the prefix sums of num_keep");
  }
  TORCH_CHECK_VALUE(cp[0] == 0 && cp[B] == total, "cu_seqlens must start at 0 and end at total");

  at::Tensor ids_keep = at::empty({total}, scores.options().dtype(at::kLong));
  at::Tensor mask = at::empty({B, N}, scores.options().dtype(at::kBool));
  int64_t* ip = ids_keep.data_ptr<int64_t>();
  bool* mp = mask.data_ptr<bool>();
  const bool s64 = s.scalar_type() == at::kDouble, z64 = z.defined() && z.scalar_type() == at::kDouble;
  const auto run = [&](auto* sp) {
    if (!z.defined()) {
      select_images(sp, static_cast<const float*>(nullptr), kp, cp, B, N, false, ip, mp);
    } else if (z64) {
      select_images(sp, z.const_data_ptr<double>(), kp, cp, B, N, relative_noise, ip, mp);
    } else {
      select_images(sp, z.const_data_ptr<float>(), kp, cp, B, N, relative_noise, ip, mp);
    }
  };
  if (s64) {
    run(s.const_data_ptr<double>());
  } else {
    run(s.const_data_ptr<float>());
  }
  return {ids_keep, mask};
}

// Checks that image b's ids lie in [0, N) (direct calls only; Python validates first).
inline void check_ids(const int64_t* ids, int64_t count, int64_t N, std::atomic<bool>& bad) {
  for (int64_t t = 0; t < count; ++t)
    if (ids[t] < 0 || ids[t] >= N) bad = true;
}

void check_cu(const int32_t* cp, int64_t B, int64_t T) {
  TORCH_CHECK_VALUE(cp[0] == 0 && cp[B] == T, "cu_seqlens must start at 0 and end at len(ids_keep)");
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK_VALUE(cp[b + 1] >= cp[b], "cu_seqlens must be non-decreasing");
}

// out[t] = x[b(t), ids_keep[t]] for x (B, N, D) of any strides; rows are copied as raw bytes.
at::Tensor gather_visible_cpu(const at::Tensor& x, const at::Tensor& ids_keep, const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(x.dim() == 3, "x must be (B, N, D)");
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), T = ids_keep.numel();
  const at::Tensor ids = ids_keep.contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  TORCH_CHECK_VALUE(cu.numel() == B + 1, "cu_seqlens must have B + 1 entries");
  const int32_t* cp = cu.data_ptr<int32_t>();
  check_cu(cp, B, T);
  at::Tensor out = at::empty({T, D}, x.options());
  if (T == 0 || D == 0) return out;
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t es = x.element_size();
  const int64_t sb = x.stride(0) * es, sn = x.stride(1) * es, sd = x.stride(2) * es;
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  std::atomic<bool> bad{false};
  at::parallel_for(0, B, kImagesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* ib = ip + cp[b];
      const int64_t count = cp[b + 1] - cp[b];
      check_ids(ib, count, N, bad);
      if (bad) return;
      char* dst = op + static_cast<int64_t>(cp[b]) * D * es;
      for (int64_t t = 0; t < count; ++t, dst += D * es) {
        const char* src = xp + b * sb + ib[t] * sn;
        if (sd == es) {
          std::memcpy(dst, src, D * es);
        } else {
          for (int64_t d = 0; d < D; ++d) std::memcpy(dst + d * es, src + d * sd, es);
        }
      }
    }
  });
  TORCH_CHECK_VALUE(!bad, "ids_keep holds an index outside [0, N)");
  return out;
}

// Maps image b's positions to token slots: slot[n] = t if ids[t] == n, else -1. False on duplicates.
inline bool fill_slots(const int64_t* ids, int64_t first, int64_t count, int64_t N, std::vector<int64_t>& slot) {
  std::fill(slot.begin(), slot.end(), -1);
  for (int64_t t = 0; t < count; ++t) {
    const int64_t n = ids[first + t];
    if (n < 0 || n >= N || slot[n] >= 0) return false;
    slot[n] = first + t;
  }
  return true;
}

// out[b, ids_keep[t]] = y[t]; every other position = mask_token. Each output row written once.
at::Tensor scatter_visible_cpu(const at::Tensor& y, const at::Tensor& ids_keep, const at::Tensor& cu_seqlens,
                               const at::Tensor& mask_token, int64_t N) {
  TORCH_CHECK_VALUE(y.dim() == 2 && mask_token.dim() == 1 && mask_token.size(0) == y.size(1),
                    "y must be (T, D) and mask_token (D,)");
  const int64_t T = y.size(0), D = y.size(1), B = cu_seqlens.numel() - 1;
  const at::Tensor yc = y.contiguous();
  const at::Tensor token = mask_token.to(y.scalar_type()).contiguous();
  const at::Tensor ids = ids_keep.contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  TORCH_CHECK_VALUE(ids.numel() == T, "ids_keep must have one entry per row of y");
  const int32_t* cp = cu.data_ptr<int32_t>();
  check_cu(cp, B, T);
  at::Tensor out = at::empty({B, N, D}, y.options());
  if (B == 0 || N == 0 || D == 0) return out;
  const int64_t row = D * y.element_size();
  const char* yp = static_cast<const char*>(yc.const_data_ptr());
  const char* tp = static_cast<const char*>(token.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, B, kImagesPerTask, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> slot(N);
    for (int64_t b = begin; b < end; ++b) {
      if (!fill_slots(ip, cp[b], cp[b + 1] - cp[b], N, slot)) {
        bad = true;
        return;
      }
      char* dst = op + b * N * row;
      for (int64_t n = 0; n < N; ++n, dst += row) std::memcpy(dst, slot[n] >= 0 ? yp + slot[n] * row : tp, row);
    }
  });
  TORCH_CHECK_VALUE(!bad, "ids_keep holds an index outside [0, N) or a repeated index within an image");
  return out;
}

// Backward of scatter_visible: grad_y[t] = grad_out[b, ids_keep[t]]; grad_mask_token = sum of
// grad_out over masked positions, accumulated per image in at least the input's precision (float32 for
// half types and float32, float64 for float64) and then summed over images in a fixed order
// (deterministic for any thread count).
std::tuple<at::Tensor, at::Tensor> scatter_visible_backward_cpu(const at::Tensor& grad_out, const at::Tensor& ids_keep,
                                                                const at::Tensor& cu_seqlens) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3, "grad_out must be (B, N, D)");
  const int64_t B = grad_out.size(0), N = grad_out.size(1), D = grad_out.size(2), T = ids_keep.numel();
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ids = ids_keep.contiguous();
  const at::Tensor cu = cu_seqlens.to(at::kInt).contiguous();
  const int32_t* cp = cu.data_ptr<int32_t>();
  check_cu(cp, B, T);
  at::Tensor grad_y = at::empty({T, D}, grad_out.options());
  const auto acc_dtype = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({B, D}, grad_out.options().dtype(acc_dtype));
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "scatter_visible_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* yp = grad_y.data_ptr<scalar_t>();
    acc_t* pp = partial.data_ptr<acc_t>();
    at::parallel_for(0, B, kImagesPerTask, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> slot(N);
      for (int64_t b = begin; b < end; ++b) {
        if (!fill_slots(ip, cp[b], cp[b + 1] - cp[b], N, slot)) {
          bad = true;
          return;
        }
        acc_t* acc = pp + b * D;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* src = gp + (b * N + n) * D;
          if (slot[n] >= 0) {
            std::memcpy(yp + slot[n] * D, src, D * sizeof(scalar_t));
          } else {
            for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<acc_t>(src[d]);
          }
        }
      }
    });
  });
  TORCH_CHECK_VALUE(!bad, "ids_keep holds an index outside [0, N) or a repeated index within an image");
  return {grad_y, partial.sum(0)};
}

constexpr int64_t kPrefetchBytes = 2048;

// a · b over n elements in W independent lanes (a fixed order, vectorised by the compiler), then a
// pairwise sum of the lanes.
template <typename T>
inline T dot_lanes(const T* a, const T* b, int64_t n) {
  constexpr int64_t W = 8;
  T acc[W] = {};
  int64_t c = 0;
  for (; c + W <= n; c += W)
    for (int64_t l = 0; l < W; ++l) acc[l] += a[c + l] * b[c + l];
  T tail = 0;
  for (; c < n; ++c) tail += a[c] * b[c];
  return (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + tail;
}

// docs/method.md §3.1 without the N×N matrix: per head softmax(q_cls · kᵀ / sqrt(d)) over the 1+N keys,
// CLS column dropped, mean over heads. Computed in float32 (float64 when q_cls or k is float64).
//
// Each (image, head) is a matrix-vector product (1+N keys · the CLS query): no operand is reused, so the
// op is bound by reading k once. Measured on the 2-core dev machine (AMD EPYC, 1 thread, B = 256, H = 12,
// N = 196, d = 64, fp32, medians): at::bmm(k, q) (MKL, one GEMV per head) 44 ms, at::bmm(q, kᵀ) (what
// einsum runs) 15.6 ms, k.sum() (streaming k) 8.4 ms; the prefetched lane dot below ~9 ms. The softmax and
// the head mean are ATen's (vectorised) ops on the small (B, H, 1+N) logits (~1.2 ms).
at::Tensor cls_attention_scores_cpu(const at::Tensor& q_cls, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q_cls.dim() == 3 && k.dim() == 4, "q_cls must be (B, H, d) and k (B, H, 1+N, d)");
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), d = k.size(3), N = L - 1;
  TORCH_CHECK_VALUE(q_cls.size(0) == B && q_cls.size(1) == H && q_cls.size(2) == d && N >= 1,
                    "q_cls must be (B, H, d) and k (B, H, 1+N, d) with N >= 1");
  const bool f64 = q_cls.scalar_type() == at::kDouble || k.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  const at::Tensor q = q_cls.to(acc).contiguous();
  const at::Tensor kc = k.to(acc).contiguous();
  at::Tensor logits = at::empty({B, H, L}, k.options().dtype(acc));
  if (logits.numel() == 0) return at::zeros({B, N}, k.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "cls_attention_scores", [&] {
    const scalar_t scale = scalar_t(1) / std::sqrt(static_cast<scalar_t>(d));
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = kc.const_data_ptr<scalar_t>();
    scalar_t* lp = logits.data_ptr<scalar_t>();
    // k is read once, front to back: prefetch each key row kPrefetchBytes ahead of the one being read
    // (the hardware prefetcher alone left ~20 % of the streaming rate on the table on the dev machine).
    const char* k_last = reinterpret_cast<const char*>(kp + (B * H * L - 1) * d);
    const int64_t row_bytes = d * static_cast<int64_t>(sizeof(scalar_t));
    at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const scalar_t* qh = qp + bh * d;
        const scalar_t* kh = kp + bh * L * d;
        scalar_t* out = lp + bh * L;
        for (int64_t j = 0; j < L; ++j) {
          const char* ahead = std::min(reinterpret_cast<const char*>(kh + j * d) + kPrefetchBytes, k_last);
          for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off);
          out[j] = dot_lanes(qh, kh + j * d, d) * scale;
        }
      }
    });
  });
  return at::_softmax(logits, 2, false).narrow(2, 1, N).mean(1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amgsn, m) {
  m.def("_abmg_select_cpu(Tensor scores, Tensor num_keep, Tensor cu_seqlens, int total, Tensor? noise, "
        "bool relative_noise) -> (Tensor, Tensor)");
  m.def("_gather_visible_cpu(Tensor x, Tensor ids_keep, Tensor cu_seqlens) -> Tensor");
  m.def("_scatter_visible_cpu(Tensor y, Tensor ids_keep, Tensor cu_seqlens, Tensor mask_token, int N) -> Tensor");
  m.def("_scatter_visible_backward_cpu(Tensor grad_out, Tensor ids_keep, Tensor cu_seqlens) -> (Tensor, Tensor)");
  m.def("_cls_attention_scores_cpu(Tensor q_cls, Tensor k) -> Tensor");
}

TORCH_LIBRARY_IMPL(amgsn, CPU, m) {
  m.impl("_abmg_select_cpu", &abmg_select_cpu);
  m.impl("_gather_visible_cpu", &gather_visible_cpu);
  m.impl("_scatter_visible_cpu", &scatter_visible_cpu);
  m.impl("_scatter_visible_backward_cpu", &scatter_visible_backward_cpu);
  m.impl("_cls_attention_scores_cpu", &cls_attention_scores_cpu);
}

}  // namespace amgsn
