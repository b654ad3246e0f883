// Shared declarations of the debiased center-loss operators (docs/method.md §3.6–3.7): the argument
// checks that the CPU (center_loss.cpp) and CUDA (cuda/center_loss.cu) halves both run before
// touching memory, so a direct torch.ops.amgsn.* call with bad shapes raises instead of reading out
// of bounds. Value checks (label range, finiteness) live in the kernels themselves.
#pragma once

#include <ATen/ATen.h>

namespace amgsn {
namespace center_loss {

// Arithmetic dtype of every kernel: float64 when features or centers are float64, else float32
// (bf16 / fp16 features are accumulated in float32).
inline at::ScalarType compute_dtype(const at::Tensor& features, const at::Tensor& centers) {
  return (features.scalar_type() == at::kDouble || centers.scalar_type() == at::kDouble) ? at::kDouble
                                                                                           : at::kFloat;
}

inline void check_features(const at::Tensor& features) {
  TORCH_CHECK_VALUE(features.dim() == 2, "features must have shape (B, D), got ", features.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(features.scalar_type()),
                   "features must be a floating-point tensor, got ", features.scalar_type());
}

inline void check_labels(const at::Tensor& labels, const at::Tensor& features) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == features.size(0),
                    "labels must have shape (B,) = (", features.size(0), ",), got ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == features.device(), "labels must be on the device of features (",
                    features.device(), "), got ", labels.device());
}

inline void check_centers(const at::Tensor& centers, const at::Tensor& features) {
  TORCH_CHECK_TYPE(centers.scalar_type() == at::kFloat || centers.scalar_type() == at::kDouble,
                   "centers must be float32 or float64, got ", centers.scalar_type());
  TORCH_CHECK_VALUE(centers.dim() == 2 && centers.size(0) >= 1 && centers.size(1) == features.size(1),
                    "centers must have shape (C, D) with C >= 1 and D = ", features.size(1),
                    " (the feature width), got ", centers.sizes());
  TORCH_CHECK_VALUE(centers.device() == features.device(), "centers must be on the device of features (",
                    features.device(), "), got ", centers.device());
}

inline void check_class_weights(const at::Tensor& class_weights, const at::Tensor& centers,
                                const at::Tensor& features) {
  TORCH_CHECK_TYPE(at::isFloatingType(class_weights.scalar_type()),
                   "class_weights must be a floating-point tensor, got ", class_weights.scalar_type());
  TORCH_CHECK_VALUE(class_weights.dim() == 1 && class_weights.size(0) == centers.size(0),
                    "class_weights must have shape (C,) = (", centers.size(0), ",), got ",
                    class_weights.sizes());
  TORCH_CHECK_VALUE(class_weights.device() == features.device(),
                    "class_weights must be on the device of features (", features.device(), "), got ",
                    class_weights.device());
}

inline void check_backward_scalars(const at::Tensor& grad_loss, const at::Tensor& inv_wsum,
                                   const at::Tensor& features) {
  TORCH_CHECK_VALUE(grad_loss.dim() == 0 && inv_wsum.dim() == 0, "grad_loss and inv_wsum must be 0-dim, got ",
                    grad_loss.sizes(), " and ", inv_wsum.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_loss.scalar_type()) &&
                       (inv_wsum.scalar_type() == at::kFloat || inv_wsum.scalar_type() == at::kDouble),
                   "center_loss_backward: grad_loss must be floating, inv_wsum float32 or float64");
  TORCH_CHECK_VALUE(grad_loss.device() == features.device() && inv_wsum.device() == features.device(),
                    "center_loss_backward: grad_loss and inv_wsum must be on the device of features");
}

inline void check_stats(const at::Tensor& centers, const at::Tensor& delta_sums, const at::Tensor& counts) {
  TORCH_CHECK_TYPE(centers.scalar_type() == at::kFloat || centers.scalar_type() == at::kDouble,
                   "centers must be float32 or float64, got ", centers.scalar_type());
  TORCH_CHECK_VALUE(centers.dim() == 2 && centers.size(0) >= 1, "centers must have shape (C, D), got ",
                    centers.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(delta_sums.scalar_type()),
                   "delta_sums must be a floating-point tensor, got ", delta_sums.scalar_type());
  TORCH_CHECK_VALUE(delta_sums.sizes() == centers.sizes(), "delta_sums must have the shape of centers ",
                    centers.sizes(), ", got ", delta_sums.sizes());
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == centers.size(0), "counts must have shape (C,) = (",
                    centers.size(0), ",), got ", counts.sizes());
  TORCH_CHECK_VALUE(delta_sums.device() == centers.device() && counts.device() == centers.device(),
                    "centers, delta_sums and counts must be on one device, got ", centers.device(), ", ",
                    delta_sums.device(), ", ", counts.device());
}

}  // namespace center_loss
}  // namespace amgsn
