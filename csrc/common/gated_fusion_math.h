// Scalar math of the gated fusion op, shared by CPU and CUDA kernels.
//   fused = sum_m g_m * act(f_m),  g = softmax over present modalities of the gate logits
// Backward, with a_m = act(f_m), dg_m = grad_fused * a_m (+ grad_gates_m):
//   dl_m = g_m * (dg_m - sum_k g_k dg_k)
//   df_m = grad_fused * g_m * act'(f_m)
#pragma once

#include <cmath>

#include "macros.h"

namespace mmkernels {

enum GatedActivation : int { kActTanh = 0, kActIdentity = 1 };

template <typename T>
MMK_HD T gf_act(T x, int activation) {
  return activation == kActTanh ? std::tanh(x) : x;
}

// Derivative of the activation expressed through its output a = act(x).
template <typename T>
MMK_HD T gf_act_grad_from_out(T a, int activation) {
  return activation == kActTanh ? T(1) - a * a : T(1);
}

// Gradient of a tanh gate: d tanh(x)/dx from t = tanh(x).
template <typename T>
MMK_HD T tanh_grad_from_out(T t) {
  return T(1) - t * t;
}

}  // namespace mmkernels
