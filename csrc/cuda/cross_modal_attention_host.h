// Host-side argument checking and parameter packing shared by the CUDA attention forward and
// backward translation units.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "../cross_modal_attention_checks.h"
#include "cuda_common.cuh"

namespace mmkernels {
namespace cuda {

// Bucket of the padded head dim served by one kernel instantiation.
static_assert(kMaxGpuHeadDim == 256, "head_dim_bucket and the DPAD dispatch end at 256");
inline int head_dim_bucket(int64_t D, int64_t Dv) {
  const int64_t x = D > Dv ? D : Dv;
  return x <= 64 ? 64 : (x <= 128 ? 128 : 256);
}

// 4-element vector loads are legal on t when its rows of `ncols` elements start 4-aligned.
inline bool vec4_ok(const at::Tensor& t, int64_t ncols) {
  if (ncols % 4 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 4 != 0) return false;
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0;
}

// Last dim contiguous (the kernels read rows with unit stride); copies only if it is not.
inline at::Tensor last_dim_contig(const at::Tensor& t) {
  return (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// Allocate a gradient like `t` (same strides as the fake kernel's empty_like where possible),
// falling back to contiguous when the last dim would not be unit-stride.
inline at::Tensor grad_like(const at::Tensor& t) {
  at::Tensor g = at::empty_like(t);
  if (g.dim() > 0 && g.size(-1) > 1 && g.stride(-1) != 1) g = at::empty(t.sizes(), t.options());
  return g;
}

struct CrossModalAttentionPrepared {
  AttnParams p;
  at::Tensor q;
  std::vector<at::Tensor> keys, values;
  at::Tensor kvl, ql, bias, gate;  // converted copies kept alive until the launches are queued
  std::vector<at::Tensor> masks;   // kv_masks as contiguous bytes, likewise
  int64_t B, Lq, Hq, Hkv, D, Dv, M;
};

inline CrossModalAttentionPrepared prepare_cross_modal_attention(const at::Tensor& q_in, at::TensorList keys_in, at::TensorList values_in,
                               const std::optional<at::Tensor>& kv_lengths,
                               const std::optional<at::Tensor>& q_lengths,
                               const std::optional<at::Tensor>& modality_bias,
                               const std::optional<at::Tensor>& head_gate, double scale, bool causal,
                               const std::optional<at::TensorList>& kv_masks) {
  CrossModalAttentionPrepared r;
  TORCH_CHECK(q_in.is_cuda(), "mmkernels CUDA cross_modal_attention: q must be a CUDA tensor");
  {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q_in.get_device()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q_in.get_device()));
    TORCH_CHECK(major * 10 + minor >= kMinCudaCapability, "mmkernels CUDA cross_modal_attention: needs compute capability ",
                kMinCudaCapability / 10, ".", kMinCudaCapability % 10, " or newer, got ", major, ".", minor);
  }
  const CrossModalAttentionSizes sz = check_cross_modal_attention_args(
      q_in, keys_in, values_in, kv_lengths, q_lengths, modality_bias, head_gate, causal, kMaxGpuHeadDim,
      /*float64=*/false);
  check_kv_masks(kv_masks, q_in, sz);
  const int64_t B = sz.B, Lq = sz.Lq, Hq = sz.Hq, Hkv = sz.Hkv, D = sz.D, Dv = sz.Dv, M = sz.M;
  r.q = last_dim_contig(q_in);
  // Limits of the CUDA launch grid and of the kernels' 32-bit row indices.
  TORCH_CHECK(B <= 65535 && Hq <= 65535 && Hkv <= 65535, "mmkernels CUDA cross_modal_attention: B and H must be <= 65535");
  TORCH_CHECK(Lq < (int64_t(1) << 31), "mmkernels CUDA cross_modal_attention: Lq too large");
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor& k = keys_in[m];
    const at::Tensor& v = values_in[m];
    TORCH_CHECK(k.size(1) < (int64_t(1) << 31), "mmkernels CUDA cross_modal_attention: Lk too large");
    r.keys.push_back(last_dim_contig(k));
    r.values.push_back(last_dim_contig(v));
  }
  AttnParams& p = r.p;
  p = AttnParams{};
  for (int64_t m = 0; m < M; ++m) {
    const at::Tensor& k = r.keys[m];
    const at::Tensor& v = r.values[m];
    Segment& s = p.seg[m];
    s.k = k.data_ptr();
    s.v = v.data_ptr();
    s.k_sb = k.stride(0); s.k_sl = k.stride(1); s.k_sh = k.stride(2);
    s.v_sb = v.stride(0); s.v_sl = v.stride(1); s.v_sh = v.stride(2);
    s.len = k.size(1);
    s.vec4 = vec4_ok(k, D) && vec4_ok(v, Dv);
    if (kv_masks.has_value()) {  // bool is one byte: read as uint8, 1 = attend
      r.masks.push_back((*kv_masks)[m].contiguous());
      s.mask = reinterpret_cast<const uint8_t*>(r.masks.back().data_ptr<bool>());
      s.mask_sb = r.masks.back().stride(0);
    }
  }
  p.num_seg = static_cast<int>(M);
  p.B = static_cast<int>(B); p.Lq = static_cast<int>(Lq); p.Hq = static_cast<int>(Hq);
  p.Hkv = static_cast<int>(Hkv); p.D = static_cast<int>(D); p.Dv = static_cast<int>(Dv);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  if (kv_lengths.has_value() && kv_lengths->defined()) {
    const at::Tensor& t = *kv_lengths;
    r.kvl = t.to(at::kLong).contiguous();
    p.kv_lengths = r.kvl.data_ptr<int64_t>();
  }
  if (q_lengths.has_value() && q_lengths->defined()) {
    const at::Tensor& t = *q_lengths;
    r.ql = t.to(at::kLong).contiguous();
    p.q_lengths = r.ql.data_ptr<int64_t>();
  }
  if (modality_bias.has_value() && modality_bias->defined()) {
    const at::Tensor& t = *modality_bias;
    r.bias = t.to(at::kFloat).contiguous();
    p.bias = r.bias.data_ptr<float>();
  }
  if (head_gate.has_value() && head_gate->defined()) {
    const at::Tensor& t = *head_gate;
    r.gate = t.to(at::kFloat).contiguous();
    p.gate = r.gate.data_ptr<float>();
  }
  p.q = r.q.data_ptr();
  p.q_sb = r.q.stride(0); p.q_sl = r.q.stride(1); p.q_sh = r.q.stride(2);
  p.q_vec4 = vec4_ok(r.q, D);
  r.B = B; r.Lq = Lq; r.Hq = Hq; r.Hkv = Hkv; r.D = D; r.Dv = Dv; r.M = M;
  return r;
}

// Tensor-core tile policies (WMMA bf16) need sm_80.
inline bool has_tensor_cores(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// Opt in to the dynamic shared memory a kernel needs (> 48 KB needs it) and check the device has it.
template <typename Kernel>
inline void set_smem(Kernel kernel, size_t smem, int device) {
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(static_cast<size_t>(optin) >= smem, "mmkernels CUDA: kernel needs ", smem,
              " bytes of shared memory per block, the device allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

}  // namespace cuda
}  // namespace mmkernels

// Dispatch on the CUDA element type: defines `scalar_t` (float, __half or __nv_bfloat16).
#define MMK_CUDA_DISPATCH_FLOAT(st, ...)                                                       \
  [&] {                                                                                        \
    switch (st) {                                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                       \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }                       \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); }            \
      default: TORCH_CHECK(false, "mmkernels CUDA: unsupported dtype ", st);                   \
    }                                                                                          \
  }()

#define MMK_CUDA_DISPATCH_DPAD(dpad, ...)                                                      \
  [&] {                                                                                        \
    switch (dpad) {                                                                            \
      case 64: { constexpr int DPAD = 64; return __VA_ARGS__(); }                              \
      case 128: { constexpr int DPAD = 128; return __VA_ARGS__(); }                            \
      default: { constexpr int DPAD = 256; return __VA_ARGS__(); }                             \
    }                                                                                          \
  }()
