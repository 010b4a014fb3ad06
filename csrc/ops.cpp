// The one place where mmkernels' op schemas are declared. Kernels register per
// dispatch key in csrc/cpu and csrc/cuda; fake kernels and autograd live in
// mmkernels/ops/*.py.
#include <torch/library.h>

namespace mmkernels::cpu {
int64_t cpu_isa_op(int64_t level);  // csrc/cpu/cpu_isa.cpp
}

TORCH_LIBRARY(mmkernels, m) {
  // Cross-modal attention forward. Returns (out, lse, out_ungated):
  //   out         (B, Lq, Hq, Dv), q's dtype, contiguous
  //   lse         (B, Hq, Lq), fp32 (fp64 for fp64 inputs); -inf where a row has no valid key
  //   out_ungated (B, Lq, Hq, Dv) before the tanh(head_gate) factor when head_gate is given
  //               (backward needs it: tanh(0) = 0 loses it), else an empty tensor of shape (0,)
  // kv_masks: None, or one bool (B, Lk_m) per segment, True = attend; a key is valid when it is
  // within kv_lengths and its mask says so (the causal offset still comes from the lengths).
  m.def(
      "cross_modal_attention_fwd(Tensor q, Tensor[] keys, Tensor[] values, Tensor? kv_lengths, Tensor? q_lengths, "
      "Tensor? modality_bias, Tensor? head_gate, float scale, bool causal, Tensor[]? kv_masks=None) "
      "-> (Tensor, Tensor, Tensor)");
  // Cross-modal attention backward (FlashAttention-2 style: probabilities recomputed from lse).
  // `out_ungated` is fwd's third output when head_gate is given, else fwd's `out`.
  // Returns (grad_q, grad_keys, grad_values, grad_bias (Hq, M), grad_gate (Hq,)); the last two
  // are fp32 (fp64 for fp64 inputs) and are zeros when the matching input is None.
  m.def(
      "cross_modal_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor[] keys, Tensor[] values, "
      "Tensor out_ungated, Tensor lse, Tensor? kv_lengths, Tensor? q_lengths, Tensor? modality_bias, "
      "Tensor? head_gate, float scale, bool causal, Tensor[]? kv_masks=None) "
      "-> (Tensor, Tensor[], Tensor[], Tensor, Tensor)");
  // Gated fusion on flattened inputs: features, gate_logits (M, N, H); present bool (M, N) or None;
  // activation 0 = tanh, 1 = identity. Returns (fused (N, H), gates (M, N, H) if return_gates else (0,)).
  m.def(
      "gated_fusion_fwd(Tensor features, Tensor gate_logits, Tensor? present, int activation, "
      "bool return_gates) -> (Tensor, Tensor)");
  // Returns (grad_features, grad_gate_logits), both (M, N, H) in the inputs' dtype.
  m.def(
      "gated_fusion_bwd(Tensor grad_fused, Tensor? grad_gates, Tensor features, Tensor gate_logits, "
      "Tensor? present, int activation) -> (Tensor, Tensor)");
  // The instruction-set level of the CPU kernels: 0 baseline, 1 avx2, 2 avx512. level >= 0 sets it
  // (tests), -1 reads it, -2 returns the best this CPU supports. No tensors: one kernel for all keys.
  m.def("cpu_isa(int level) -> int", &mmkernels::cpu::cpu_isa_op);
}
