// Gated fusion (DESIGN.md 2.2) on CUDA: fused = sum_m g_m act(f_m), g = softmax over the present
// modalities of the gate logits; a position with no present modality gives 0 (no NaN).
// Elementwise over (N, H): each thread handles V consecutive units of one position (vector
// loads when H % 4 == 0 and pointers are aligned) and loops over the M modalities. For M <= MC
// the per-modality values stay in registers (one pass over memory); larger M re-reads them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda_common.cuh"
#include "gated_fusion_kernels.cuh"

namespace mmkernels {
namespace cuda {
namespace {

bool aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void check_gf_inputs(const at::Tensor& features, const at::Tensor& gate_logits, const at::Tensor& present_c,
                     int64_t activation) {
  TORCH_CHECK(features.is_cuda(), "mmkernels CUDA gated_fusion: features must be a CUDA tensor");
  TORCH_CHECK(features.dim() == 3, "mmkernels CUDA gated_fusion: features must have shape (M, N, H), got ", features.sizes());
  TORCH_CHECK(gate_logits.sizes() == features.sizes(), "mmkernels CUDA gated_fusion: gate_logits must have features' shape ",
              features.sizes(), ", got ", gate_logits.sizes());
  const auto st = features.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "mmkernels CUDA gated_fusion: dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(gate_logits.scalar_type() == st, "mmkernels CUDA gated_fusion: gate_logits must have features' dtype");
  TORCH_CHECK(gate_logits.device() == features.device(), "mmkernels CUDA gated_fusion: inputs must be on one device");
  TORCH_CHECK(activation == 0 || activation == 1, "mmkernels CUDA gated_fusion: activation must be 0 (tanh) or 1 (identity)");
  TORCH_CHECK(features.size(0) <= (int64_t(1) << 30), "mmkernels CUDA gated_fusion: too many modalities");
  if (present_c.defined()) {
    TORCH_CHECK(present_c.device() == features.device(), "mmkernels CUDA gated_fusion: present must be on features' device");
    TORCH_CHECK(present_c.dim() == 2 && present_c.size(0) == features.size(0) && present_c.size(1) == features.size(1),
                "mmkernels CUDA gated_fusion: present must have shape (M, N), got ", present_c.sizes());
  }
}

unsigned gf_blocks(int64_t chunks) {
  int64_t blocks = (chunks + kGfThreads - 1) / kGfThreads;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;  // grid-stride loop covers the rest
  return (unsigned)(blocks < 1 ? 1 : blocks);
}

#define MMK_GF_DISPATCH_TYPES(st, ...)                                           \
  [&] {                                                                          \
    switch (st) {                                                                \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                \
      case at::kHalf: { using T = __half; return __VA_ARGS__(); }                \
      default: { using T = __nv_bfloat16; return __VA_ARGS__(); }                \
    }                                                                            \
  }()

std::tuple<at::Tensor, at::Tensor> gated_fusion_fwd_cuda(const at::Tensor& features_in, const at::Tensor& gate_logits_in,
                                                         const std::optional<at::Tensor>& present,
                                                         int64_t activation, bool return_gates) {
  c10::cuda::CUDAGuard guard(features_in.device());
  at::Tensor present_c;
  if (present.has_value() && present->defined()) present_c = present->to(at::kBool).contiguous();
  check_gf_inputs(features_in, gate_logits_in, present_c, activation);
  const at::Tensor f = features_in.contiguous();
  const at::Tensor lg = gate_logits_in.contiguous();
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  at::Tensor fused = at::empty({N, H}, f.options());
  at::Tensor gates = return_gates ? at::empty({M, N, H}, f.options()) : at::empty({0}, f.options());
  if (N * H == 0) return {fused, gates};
  if (M == 0) {
    fused.zero_();
    return {fused, gates};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(f.get_device()).stream();
  const int64_t es = f.element_size();
  const bool vec = H % 4 == 0 && aligned(f, 4 * es) && aligned(lg, 4 * es) && aligned(fused, 4 * es) &&
                   (!return_gates || aligned(gates, 4 * es));
  const bool* pres = present_c.defined() ? present_c.data_ptr<bool>() : nullptr;
  MMK_GF_DISPATCH_TYPES(f.scalar_type(), [&] {
    T* gp = return_gates ? static_cast<T*>(gates.data_ptr()) : nullptr;
    auto go = [&](auto kernel, int V) {
      kernel<<<gf_blocks(N * H / V), kGfThreads, 0, stream>>>(static_cast<const T*>(f.data_ptr()),
                                                             static_cast<const T*>(lg.data_ptr()), pres, (int)M, N, H,
                                                             (int)activation, static_cast<T*>(fused.data_ptr()), gp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      if (M <= kGfCache) go(gf_fwd_kernel<T, 4, kGfCache>, 4); else go(gf_fwd_kernel<T, 4, 0>, 4);
    } else {
      if (M <= kGfCache) go(gf_fwd_kernel<T, 1, kGfCache>, 1); else go(gf_fwd_kernel<T, 1, 0>, 1);
    }
  });
  return {fused, gates};
}

std::tuple<at::Tensor, at::Tensor> gated_fusion_bwd_cuda(const at::Tensor& grad_fused, const std::optional<at::Tensor>& grad_gates,
                                                         const at::Tensor& features_in, const at::Tensor& gate_logits_in,
                                                         const std::optional<at::Tensor>& present, int64_t activation) {
  c10::cuda::CUDAGuard guard(features_in.device());
  at::Tensor present_c;
  if (present.has_value() && present->defined()) present_c = present->to(at::kBool).contiguous();
  check_gf_inputs(features_in, gate_logits_in, present_c, activation);
  const at::Tensor f = features_in.contiguous();
  const at::Tensor lg = gate_logits_in.contiguous();
  const int64_t M = f.size(0), N = f.size(1), H = f.size(2);
  TORCH_CHECK(grad_fused.dim() == 2 && grad_fused.size(0) == N && grad_fused.size(1) == H,
              "mmkernels CUDA gated_fusion_bwd: grad_fused must have shape (N, H) = (", N, ", ", H, "), got ",
              grad_fused.sizes());
  TORCH_CHECK(grad_fused.device() == f.device(), "mmkernels CUDA gated_fusion_bwd: grad_fused must be on features' device");
  const at::Tensor gfz = grad_fused.to(f.scalar_type()).contiguous();
  at::Tensor ggz;
  if (grad_gates.has_value() && grad_gates->defined()) {
    TORCH_CHECK(grad_gates->sizes() == f.sizes() && grad_gates->device() == f.device(),
                "mmkernels CUDA gated_fusion_bwd: grad_gates must have features' shape ", f.sizes(), ", got ",
                grad_gates->sizes());
    ggz = grad_gates->to(f.scalar_type()).contiguous();
  }
  at::Tensor df = at::empty({M, N, H}, f.options());
  at::Tensor dl = at::empty({M, N, H}, f.options());
  if (M * N * H == 0) return {df, dl};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(f.get_device()).stream();
  const int64_t es = f.element_size();
  const bool vec = H % 4 == 0 && aligned(f, 4 * es) && aligned(lg, 4 * es) && aligned(gfz, 4 * es) &&
                   aligned(ggz, 4 * es) && aligned(df, 4 * es) && aligned(dl, 4 * es);
  const bool* pres = present_c.defined() ? present_c.data_ptr<bool>() : nullptr;
  MMK_GF_DISPATCH_TYPES(f.scalar_type(), [&] {
    const T* ggp = ggz.defined() ? static_cast<const T*>(ggz.data_ptr()) : nullptr;
    auto go = [&](auto kernel, int V) {
      kernel<<<gf_blocks(N * H / V), kGfThreads, 0, stream>>>(
          static_cast<const T*>(gfz.data_ptr()), ggp, static_cast<const T*>(f.data_ptr()),
          static_cast<const T*>(lg.data_ptr()), pres, (int)M, N, H, (int)activation, static_cast<T*>(df.data_ptr()),
          static_cast<T*>(dl.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) {
      if (M <= kGfCache) go(gf_bwd_kernel<T, 4, kGfCache>, 4); else go(gf_bwd_kernel<T, 4, 0>, 4);
    } else {
      if (M <= kGfCache) go(gf_bwd_kernel<T, 1, kGfCache>, 1); else go(gf_bwd_kernel<T, 1, 0>, 1);
    }
  });
  return {df, dl};
}

}  // namespace
}  // namespace cuda
}  // namespace mmkernels

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("gated_fusion_fwd", &mmkernels::cuda::gated_fusion_fwd_cuda);
  m.impl("gated_fusion_bwd", &mmkernels::cuda::gated_fusion_bwd_cuda);
}
