// Cross-modal attention forward (DESIGN.md 2.1) on CUDA: one launch over all M key/value
// segments with one online softmax, no concatenation; key blocks past the valid length are
// skipped. SIMT tiled kernel: one CTA (128 threads) per (query block, head, batch); Q, K and V
// tiles staged in shared memory as fp32; fp32 accumulation in registers.
//
// Thread layout: tid = rg * 8 + cg, rg in [0, 16), cg in [0, 8). Thread owns query rows
// rg*TM + i (i < TM), score columns cg + 8*jj (jj < TN), output columns k*32 + cg*4 + e.
// The 8 threads sharing a row are consecutive lanes, so row reductions are 3 xor-shuffles.
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

template <typename T, int DPAD>
void launch_fwd(const CrossModalAttentionPrepared& r, at::Tensor& out, at::Tensor& out_ung, at::Tensor& lse, cudaStream_t stream) {
  const int device = r.q.get_device();
  T* outp = static_cast<T*>(out.data_ptr());
  T* outup = out_ung.numel() ? static_cast<T*>(out_ung.data_ptr()) : nullptr;
  if constexpr (!std::is_same_v<T, float> && DPAD <= 128) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (major >= 8) {  // tensor-core path (WMMA bf16 needs sm_80)
      constexpr int BM = FwdTcCfg<DPAD>::BM;
      constexpr int BN = FwdTcCfg<DPAD>::BN;
      constexpr size_t smem = fwd_tc_smem_bytes<T, BM, BN, DPAD>();
      auto kernel = cross_modal_attention_fwd_tc_kernel<T, BN, DPAD>;
      set_smem(kernel, smem, device);
      const dim3 grid((unsigned)((r.Lq + BM - 1) / BM), (unsigned)r.Hq, (unsigned)r.B);
      kernel<<<grid, kFwdThreads, smem, stream>>>(r.p, outp, outup, lse.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  constexpr int BM = FwdCfg<DPAD>::BM;
  constexpr int BN = FwdCfg<DPAD>::BN;
  constexpr size_t smem = fwd_smem_bytes<BM, BN, DPAD>();
  auto kernel = cross_modal_attention_fwd_kernel<T, BM, BN, DPAD>;
  set_smem(kernel, smem, device);
  const dim3 grid((unsigned)((r.Lq + BM - 1) / BM), (unsigned)r.Hq, (unsigned)r.B);
  kernel<<<grid, kFwdThreads, smem, stream>>>(r.p, outp, outup, lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_fwd_cuda(
    const at::Tensor& q, at::TensorList keys, at::TensorList values, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& q_lengths, const std::optional<at::Tensor>& modality_bias,
    const std::optional<at::Tensor>& head_gate, double scale, bool causal) {
  c10::cuda::CUDAGuard guard(q.device());
  CrossModalAttentionPrepared r = prepare_cross_modal_attention(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal);
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
