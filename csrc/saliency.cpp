// CPU kernels of the saliency-bank operators (docs/method.md §4.4).
//
// The CPU halves of the public ops in amgsn/ops/saliency.py (torch.library custom ops whose CUDA
// halves are the Triton kernels in kernels/saliency.py). The bank holds one map (Gh, Gw) per
// training image in the original image's coordinates; a view is a crop box (top, left, height,
// width) in fractions of the original image plus a horizontal flip, resized to the same (Gh, Gw)
// patch grid.
//
// * read:  view patch (r, c) -> x = (c + .5) / Gw (1 - x if flipped), y = (r + .5) / Gh ->
//          u = left + width * x, v = top + height * y in the original image -> the bank sampled
//          bilinearly there (pixel centres at (j + .5) / Gw, border clamp: grid_sample's
//          align_corners=False + padding_mode="border").
// * write: bank cell (i, j) at u = (j + .5) / Gw, v = (i + .5) / Gh -> x = (u - left) / width,
//          y = (v - top) / height; s = the view's min-max normalised scores sampled bilinearly at
//          (1 - x if flipped, y). Every cell of a never-seen image takes s; a seen image's cells with
//          x, y in [0, 1] move towards it: m <- m + alpha * (s - m) (alpha = 1: overwrite).
//
// Every coordinate is computed in float32 in the order written above, as in the reference and the
// Triton kernels, so the three agree to float32 rounding of the interpolation. Python validates the
// arguments; the checks here only guarantee no out-of-bounds access on a direct call.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace amgsn {
namespace {

// Bilinear sample of a (H, W) map at pixel coordinates (px, py) (centres at integers), border clamp.
template <typename T>
inline float bilinear(const T* map, int64_t H, int64_t W, float px, float py) {
  if (!(px == px)) px = 0.0f;  // NaN coordinates (degenerate boxes) stay in bounds
  if (!(py == py)) py = 0.0f;
  px = std::min(std::max(px, 0.0f), static_cast<float>(W - 1));
  py = std::min(std::max(py, 0.0f), static_cast<float>(H - 1));
  const int64_t x0 = static_cast<int64_t>(std::floor(px)), y0 = static_cast<int64_t>(std::floor(py));
  const int64_t x1 = std::min(x0 + 1, W - 1), y1 = std::min(y0 + 1, H - 1);
  const float wx = px - static_cast<float>(x0), wy = py - static_cast<float>(y0);
  const float a = static_cast<float>(map[y0 * W + x0]), b = static_cast<float>(map[y0 * W + x1]);
  const float c = static_cast<float>(map[y1 * W + x0]), d = static_cast<float>(map[y1 * W + x1]);
  const float top = (1.0f - wx) * a + wx * b;
  const float bottom = (1.0f - wx) * c + wx * d;
  return (1.0f - wy) * top + wy * bottom;
}

void check_views(const at::Tensor& indices, const at::Tensor& boxes, const at::Tensor& flips, int64_t B,
                 int64_t M) {
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == B, "indices must be (B,)");
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(0) == B && boxes.size(1) == 4, "boxes must be (B, 4)");
  TORCH_CHECK_VALUE(flips.dim() == 1 && flips.size(0) == B, "flips must be (B,)");
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(ip[b] >= 0 && ip[b] < M, "indices must lie in [0, M) (rows of the bank)");
  }
}

at::Tensor saliency_bank_read_cpu(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& boxes,
                                  const at::Tensor& flips) {
  TORCH_CHECK_VALUE(bank.dim() == 3, "bank must be (M, Gh, Gw)");
  const int64_t M = bank.size(0), H = bank.size(1), W = bank.size(2), B = indices.numel();
  check_views(indices, boxes, flips, B, M);
  const at::Tensor bk = bank.contiguous();
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor bx = boxes.to(at::kFloat).contiguous();
  const at::Tensor fl = flips.to(at::kBool).contiguous();
  at::Tensor out = at::empty({B, H * W}, bank.options().dtype(at::kFloat));
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* bp = bx.data_ptr<float>();
  const bool* fp = fl.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(bk.scalar_type(), "saliency_bank_read_cpu", [&] {
    const scalar_t* mp = bk.data_ptr<scalar_t>();
    at::parallel_for(0, B, 4, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* map = mp + ip[b] * H * W;
        const float top = bp[b * 4], left = bp[b * 4 + 1], height = bp[b * 4 + 2], width = bp[b * 4 + 3];
        for (int64_t r = 0; r < H; ++r) {
          const float y = (static_cast<float>(r) + 0.5f) / static_cast<float>(H);
          const float v = top + height * y;
          const float py = v * static_cast<float>(H) - 0.5f;
          for (int64_t c = 0; c < W; ++c) {
            float x = (static_cast<float>(c) + 0.5f) / static_cast<float>(W);
            if (fp[b]) x = 1.0f - x;
            const float u = left + width * x;
            op[b * H * W + r * W + c] = bilinear(map, H, W, u * static_cast<float>(W) - 0.5f, py);
          }
        }
      }
    });
  });
  return out;
}

void saliency_bank_write_cpu(const at::Tensor& bank, const at::Tensor& indices, const at::Tensor& scores,
                             const at::Tensor& boxes, const at::Tensor& flips, const at::Tensor& fresh,
                             double alpha_d) {
  const float alpha = static_cast<float>(alpha_d);
  TORCH_CHECK_VALUE(bank.dim() == 3 && bank.is_contiguous(), "bank must be a contiguous (M, Gh, Gw) tensor");
  const int64_t M = bank.size(0), H = bank.size(1), W = bank.size(2), B = indices.numel();
  check_views(indices, boxes, flips, B, M);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == B && scores.size(1) == H * W, "scores must be (B, Gh*Gw)");
  TORCH_CHECK_VALUE(fresh.dim() == 1 && fresh.size(0) == B, "fresh must be (B,)");
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  const at::Tensor sc = scores.to(at::kFloat).contiguous();
  const at::Tensor bx = boxes.to(at::kFloat).contiguous();
  const at::Tensor fl = flips.to(at::kBool).contiguous();
  const at::Tensor fr = fresh.to(at::kBool).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* sp = sc.data_ptr<float>();
  const float* bp = bx.data_ptr<float>();
  const bool* fp = fl.data_ptr<bool>();
  const bool* frp = fr.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(bank.scalar_type(), "saliency_bank_write_cpu", [&] {
    scalar_t* mp = bank.data_ptr<scalar_t>();
    // Sequential over views: a repeated index is written in batch order (the last view wins).
    std::vector<float> norm(H * W);
    for (int64_t b = 0; b < B; ++b) {
      const float* s = sp + b * H * W;
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t n = 0; n < H * W; ++n) {
        lo = std::min(lo, s[n]);
        hi = std::max(hi, s[n]);
      }
      const float span = hi - lo;
      for (int64_t n = 0; n < H * W; ++n) norm[n] = span > 0.0f ? (s[n] - lo) / span : 0.0f;
      const float top = bp[b * 4], left = bp[b * 4 + 1], height = bp[b * 4 + 2], width = bp[b * 4 + 3];
      scalar_t* map = mp + ip[b] * H * W;
      at::parallel_for(0, H, 8, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const float v = (static_cast<float>(i) + 0.5f) / static_cast<float>(H);
          const float y = (v - top) / height;
          const bool in_y = y >= 0.0f && y <= 1.0f;
          const float py = y * static_cast<float>(H) - 0.5f;
          for (int64_t j = 0; j < W; ++j) {
            const float u = (static_cast<float>(j) + 0.5f) / static_cast<float>(W);
            float x = (u - left) / width;
            const bool inside = in_y && x >= 0.0f && x <= 1.0f;
            if (!(inside || frp[b])) continue;
            if (fp[b]) x = 1.0f - x;
            const float s = bilinear(norm.data(), H, W, x * static_cast<float>(W) - 0.5f, py);
            if (frp[b]) {
              map[i * W + j] = static_cast<scalar_t>(s);
            } else {
              const float old = static_cast<float>(map[i * W + j]);
              map[i * W + j] = static_cast<scalar_t>(old + alpha * (s - old));
            }
          }
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(amgsn, m) {
  m.def("_saliency_bank_read_cpu(Tensor bank, Tensor indices, Tensor boxes, Tensor flips) -> Tensor");
  m.def("_saliency_bank_write_cpu(Tensor(a!) bank, Tensor indices, Tensor scores, Tensor boxes, Tensor flips, "
        "Tensor fresh, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(amgsn, CPU, m) {
  m.impl("_saliency_bank_read_cpu", &saliency_bank_read_cpu);
  m.impl("_saliency_bank_write_cpu", &saliency_bank_write_cpu);
}

}  // namespace amgsn
