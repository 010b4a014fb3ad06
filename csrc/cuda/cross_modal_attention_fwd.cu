// Cross-modal attention forward (DESIGN.md 2.1) on CUDA: one launch over all M key/value
// segments with one online softmax, no concatenation; key blocks past the valid length are
// skipped. One kernel body with two tile policies (cross_modal_attention_fwd_kernels.cuh): tensor
// cores for fp16/bf16 up to head dim 128 on sm_80+, SIMT fp32 tiles otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>

#include "cross_modal_attention_host.h"
#include "cuda_common.cuh"
#include "cross_modal_attention_fwd_kernels.cuh"

namespace mmkernels {
namespace cuda {
namespace {

template <typename Tiles, typename T>
void launch_fwd_tiles(const CrossModalAttentionPrepared& r, T* out, T* out_ung, float* lse, int device, cudaStream_t stream) {
  constexpr size_t smem = Tiles::smem_bytes();
  auto kernel = cross_modal_attention_fwd_kernel<Tiles, T>;
  set_smem(kernel, smem, device);
  const dim3 grid((unsigned)((r.Lq + Tiles::BM - 1) / Tiles::BM), (unsigned)r.Hq, (unsigned)r.B);
  kernel<<<grid, kFwdThreads, smem, stream>>>(r.p, out, out_ung, lse);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int DPAD>
void launch_fwd(const CrossModalAttentionPrepared& r, at::Tensor& out, at::Tensor& out_ung, at::Tensor& lse, cudaStream_t stream) {
  const int device = r.q.get_device();
  T* outp = static_cast<T*>(out.data_ptr());
  T* outup = out_ung.numel() ? static_cast<T*>(out_ung.data_ptr()) : nullptr;
  if constexpr (!std::is_same_v<T, float> && DPAD <= 128) {
    if (has_tensor_cores(device)) {
      launch_fwd_tiles<FwdTensorCoreTiles<T, DPAD>>(r, outp, outup, lse.data_ptr<float>(), device, stream);
      return;
    }
  }
  launch_fwd_tiles<FwdSimtTiles<T, DPAD>>(r, outp, outup, lse.data_ptr<float>(), device, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_fwd_cuda(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& q_lengths, const std::optional<at::Tensor>& modality_bias,
    const std::optional<at::Tensor>& head_gate, double scale, bool causal,
    const std::optional<at::TensorList>& kv_masks) {
  c10::cuda::CUDAGuard guard(q.device());
  CrossModalAttentionPrepared r = prepare_cross_modal_attention(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, kv_masks);
  at::Tensor out = at::empty({r.B, r.Lq, r.Hq, r.Dv}, q.options());
  at::Tensor lse = at::empty({r.B, r.Hq, r.Lq}, q.options().dtype(at::kFloat));
  const bool gated = r.gate.defined();
  at::Tensor out_ung = gated ? at::empty({r.B, r.Lq, r.Hq, r.Dv}, q.options()) : at::empty({0}, q.options());
  if (r.B == 0 || r.Lq == 0 || r.Hq == 0) return {out, lse, out_ung};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  const int dpad = head_dim_bucket(r.D, r.Dv);
  MMK_CUDA_DISPATCH_FLOAT(q.scalar_type(), [&] {
    MMK_CUDA_DISPATCH_DPAD(dpad, [&] { launch_fwd<scalar_t, DPAD>(r, out, out_ung, lse, stream); });
  });
  return {out, lse, out_ung};
}

}  // namespace
}  // namespace cuda
}  // namespace mmkernels

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("cross_modal_attention_fwd", &mmkernels::cuda::cross_modal_attention_fwd_cuda);
}
