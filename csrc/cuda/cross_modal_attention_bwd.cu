// Cross-modal attention backward on CUDA (FlashAttention-2 style: probabilities recomputed from
// the forward's lse; the Lq x Lk matrix is never materialised). Deterministic: no float atomics.
//   1. pre kernel   : per query row, rowdot = grad_out . O_raw and Delta = t * rowdot - grad_lse
//   2. dK/dV kernel : one CTA per (key block of one segment, kv head, batch), loops over the
//                     query rows of every query head of the GQA group
//   3. dQ kernel    : one CTA per (query block, head, batch), loops over the valid keys of all
//                     segments; also writes per-CTA partial sums of dS for grad_bias
// grad_bias / grad_gate are reduced from the partial buffers with at::sum (deterministic).
//
// Math (t = tanh(gate[h]) or 1, dO = t * grad_out, P = exp(scale q.k + bias - lse)):
//   dV_j += P_ij dO_i; dP_ij = dO_i . v_j; dS_ij = P_ij (dP_ij - Delta_i)
//   dQ_i += scale dS_ij k_j; dK_j += scale dS_ij q_i; grad_bias[h, m] = sum dS;
//   grad_gate[h] = (1 - t^2) sum_{b,i} grad_out_i . O_raw_i
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cross_modal_attention_host.h"
#include "cuda_common.cuh"
#include "cross_modal_attention_bwd_kernels.cuh"

namespace mmkernels {
namespace cuda {
namespace {

// ------------------------------------------------------------------ host
// 2. dK / dV over all key blocks of all segments (also zero-fills grads of padded keys), then
// 3. dQ and the grad_bias partials.
template <typename DkdvTiles, typename DqTiles, typename T>
void launch_bwd_tiles(CrossModalAttentionPrepared& r, const at::Tensor& go, bool go_vec4, const at::Tensor& lse,
                      at::Tensor& delta, at::Tensor& grad_q, at::Tensor& bias_part, int device, cudaStream_t stream) {
  const T* gop = static_cast<const T*>(go.data_ptr());
  {
    AttnParams p = r.p;
    int64_t total = 0;
    for (int64_t m = 0; m < r.M; ++m) {
      p.seg[m].blk_start = total;
      total += (p.seg[m].len + DkdvTiles::BN - 1) / DkdvTiles::BN;
    }
    TORCH_CHECK(total < (int64_t(1) << 31), "mmkernels CUDA cross_modal_attention_bwd: too many key blocks");
    if (total > 0 && r.B > 0) {
      constexpr size_t smem = DkdvTiles::smem_bytes();
      auto kernel = cross_modal_attention_bwd_dkdv_kernel<DkdvTiles, T>;
      set_smem(kernel, smem, device);
      const dim3 grid((unsigned)total, (unsigned)r.Hkv, (unsigned)r.B);
      kernel<<<grid, kBwdThreads, smem, stream>>>(p, gop, go_vec4 ? 1 : 0, lse.data_ptr<float>(), delta.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  const int64_t nqb = (r.Lq + DqTiles::BM - 1) / DqTiles::BM;
  if (r.bias.defined()) bias_part = at::zeros({r.Hq, r.M, r.B * nqb}, r.q.options().dtype(at::kFloat));
  if (nqb > 0 && r.B > 0) {
    constexpr size_t smem = DqTiles::smem_bytes();
    auto kernel = cross_modal_attention_bwd_dq_kernel<DqTiles, T>;
    set_smem(kernel, smem, device);
    const dim3 grid((unsigned)nqb, (unsigned)r.Hq, (unsigned)r.B);
    kernel<<<grid, kBwdThreads, smem, stream>>>(r.p, gop, go_vec4 ? 1 : 0, lse.data_ptr<float>(), delta.data_ptr<float>(),
                                                static_cast<T*>(grad_q.data_ptr()), grad_q.stride(0), grad_q.stride(1),
                                                grad_q.stride(2), bias_part.defined() ? bias_part.data_ptr<float>() : nullptr,
                                                nqb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int DPAD>
void launch_bwd(CrossModalAttentionPrepared& r, const at::Tensor& go, const at::Tensor& out_ung, const at::Tensor& glse,
                const at::Tensor& lse, at::Tensor& delta, at::Tensor& rowdot, at::Tensor& grad_q,
                at::Tensor& bias_part, cudaStream_t stream) {
  const int device = r.q.get_device();
  const bool go_vec4 = (r.Dv % 4 == 0) && (reinterpret_cast<uintptr_t>(go.data_ptr()) % (4 * sizeof(T)) == 0);

  // 1. preprocess (only rows of real queries exist when Lq > 0)
  const int64_t rows = r.B * r.Lq * r.Hq;
  if (rows > 0) {
    const int64_t blocks = (rows + kBwdThreads / 32 - 1) / (kBwdThreads / 32);
    TORCH_CHECK(blocks < (int64_t(1) << 31), "mmkernels CUDA cross_modal_attention_bwd: too many rows");
    cross_modal_attention_bwd_pre_kernel<T><<<(unsigned)blocks, kBwdThreads, 0, stream>>>(
        static_cast<const T*>(go.data_ptr()), static_cast<const T*>(out_ung.data_ptr()),
        glse.defined() ? glse.data_ptr<float>() : nullptr, r.p.gate, r.p.q_lengths, (int)r.B, (int)r.Lq, (int)r.Hq,
        (int)r.Dv, delta.data_ptr<float>(), rowdot.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if constexpr (!std::is_same_v<T, float> && DPAD <= 128) {
    if (has_tensor_cores(device)) {
      launch_bwd_tiles<DkdvTensorCoreTiles<T, DPAD>, DqTensorCoreTiles<T, DPAD>, T>(r, go, go_vec4, lse, delta, grad_q,
                                                                                 bias_part, device, stream);
      return;
    }
  }
  launch_bwd_tiles<DkdvSimtTiles<T, DPAD>, DqSimtTiles<T, DPAD>, T>(r, go, go_vec4, lse, delta, grad_q, bias_part, device,
                                                                 stream);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> cross_modal_attention_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, at::TensorList keys,
    at::TensorList values, const at::Tensor& out_ungated, const at::Tensor& lse,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& q_lengths,
    const std::optional<at::Tensor>& modality_bias, const std::optional<at::Tensor>& head_gate, double scale,
    bool causal, const std::optional<at::TensorList>& kv_masks) {
  c10::cuda::CUDAGuard guard(q.device());
  CrossModalAttentionPrepared r = prepare_cross_modal_attention(q, keys, values, kv_lengths, q_lengths, modality_bias, head_gate, scale, causal, kv_masks);
  const auto fopts = q.options().dtype(at::kFloat);

  TORCH_CHECK(grad_out.device() == q.device() && grad_out.scalar_type() == q.scalar_type(),
              "mmkernels CUDA cross_modal_attention_bwd: grad_out must be on q's device with q's dtype");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == r.B && grad_out.size(1) == r.Lq && grad_out.size(2) == r.Hq &&
                  grad_out.size(3) == r.Dv,
              "mmkernels CUDA cross_modal_attention_bwd: grad_out must have shape (B, Lq, Hq, Dv), got ", grad_out.sizes());
  TORCH_CHECK(out_ungated.device() == q.device() && out_ungated.scalar_type() == q.scalar_type() &&
                  out_ungated.sizes() == grad_out.sizes(),
              "mmkernels CUDA cross_modal_attention_bwd: out_ungated must be (B, Lq, Hq, Dv) with q's dtype, got ", out_ungated.sizes());
  TORCH_CHECK(lse.device() == q.device() && lse.dim() == 3 && lse.size(0) == r.B && lse.size(1) == r.Hq &&
                  lse.size(2) == r.Lq,
              "mmkernels CUDA cross_modal_attention_bwd: lse must have shape (B, Hq, Lq), got ", lse.sizes());
  at::Tensor go = grad_out.contiguous();  // grads may arrive expanded (stride 0) or strided
  at::Tensor o = out_ungated.contiguous();
  at::Tensor lse_c = lse.to(at::kFloat).contiguous();
  at::Tensor glse;
  if (grad_lse.has_value() && grad_lse->defined()) {
    TORCH_CHECK(grad_lse->device() == q.device() && grad_lse->sizes() == lse.sizes(),
                "mmkernels CUDA cross_modal_attention_bwd: grad_lse must have lse's shape (B, Hq, Lq), got ", grad_lse->sizes());
    glse = grad_lse->to(at::kFloat).contiguous();
  }

  at::Tensor grad_q = grad_like(q);
  std::vector<at::Tensor> grad_k, grad_v;
  for (int64_t m = 0; m < r.M; ++m) {
    grad_k.push_back(grad_like(keys[m]));
    grad_v.push_back(grad_like(values[m]));
    Segment& s = r.p.seg[m];
    const at::Tensor& gk = grad_k.back();
    const at::Tensor& gv = grad_v.back();
    s.dk = gk.data_ptr();
    s.dv = gv.data_ptr();
    s.dk_sb = gk.stride(0); s.dk_sl = gk.stride(1); s.dk_sh = gk.stride(2);
    s.dv_sb = gv.stride(0); s.dv_sl = gv.stride(1); s.dv_sh = gv.stride(2);
  }
  at::Tensor delta = at::empty({r.B, r.Hq, r.Lq}, fopts);
  at::Tensor rowdot = at::empty({r.B, r.Hq, r.Lq}, fopts);
  at::Tensor bias_part;
  if (r.Hq > 0) {
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
    const int dpad = head_dim_bucket(r.D, r.Dv);
    MMK_CUDA_DISPATCH_FLOAT(q.scalar_type(), [&] {
      MMK_CUDA_DISPATCH_DPAD(dpad, [&] {
        launch_bwd<scalar_t, DPAD>(r, go, o, glse, lse_c, delta, rowdot, grad_q, bias_part, stream);
      });
    });
  }
  at::Tensor grad_bias = bias_part.defined() ? bias_part.sum(-1) : at::zeros({r.Hq, r.M}, fopts);
  at::Tensor grad_gate;
  if (r.gate.defined()) {
    at::Tensor t = at::tanh(r.gate);
    grad_gate = rowdot.sum(at::IntArrayRef{0, 2}).mul(t.mul(t).neg_().add_(1.0));
  } else {
    grad_gate = at::zeros({r.Hq}, fopts);
  }
  return {grad_q, grad_k, grad_v, grad_bias, grad_gate};
}

}  // namespace
}  // namespace cuda
}  // namespace mmkernels

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("cross_modal_attention_bwd", &mmkernels::cuda::cross_modal_attention_bwd_cuda);
}
