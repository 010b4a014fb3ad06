// Device code of gated_fusion.cu (no torch headers: also compiled by the host emulator test in emu/).
#pragma once

#include <cstdint>
#include <limits>

#include "../common/gated_fusion_math.h"
#include "cuda_common.cuh"

namespace mmkernels {
namespace cuda {

constexpr int kGfThreads = 256;
constexpr int kGfCache = 4;  // modalities kept in registers

// The activation and its derivative: csrc/common/gated_fusion_math.h, as on CPU.

template <typename T, int V>
__device__ __forceinline__ void load_v(const T* __restrict__ p, float (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = to_f(p[0]);
  } else {
    const VecT<T, V> g = *reinterpret_cast<const VecT<T, V>*>(p);
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_f(g.v[v]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_v(T* __restrict__ p, const float (&x)[V]) {
  if constexpr (V == 1) {
    p[0] = from_f<T>(x[0]);
  } else {
    VecT<T, V> g;
#pragma unroll
    for (int v = 0; v < V; ++v) g.v[v] = from_f<T>(x[v]);
    *reinterpret_cast<VecT<T, V>*>(p) = g;
  }
}

// MC > 0: M <= MC, values cached in registers. MC == 0: any M, values re-read.
template <typename T, int V, int MC>
__global__ void __launch_bounds__(kGfThreads)
    gf_fwd_kernel(const T* __restrict__ f, const T* __restrict__ lg, const bool* __restrict__ present, int M, int64_t N,
                  int64_t H, int act, T* __restrict__ fused, T* __restrict__ gates) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t NH = N * H;
  const int64_t chunks = NH / V;
  for (int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; ch < chunks; ch += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e0 = ch * V;  // element offset within one modality's (N, H) slab
    const int64_t n = e0 / H;
    float mx[V], sum[V], acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      mx[v] = NEG_INF;
      sum[v] = 0.f;
      acc[v] = 0.f;
    }
    if constexpr (MC > 0) {
      float l[MC][V], a[MC][V];
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
          const bool pres = present == nullptr || present[(int64_t)m * N + n];
          float fv[V];
          load_v<T, V>(lg + m * NH + e0, l[m]);
          load_v<T, V>(f + m * NH + e0, fv);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (!pres) l[m][v] = NEG_INF;
            // A -inf logit takes no part: select its features out (0 * NaN would be NaN).
            a[m][v] = l[m][v] == NEG_INF ? 0.f : gf_act<float>(fv[v], act);
            mx[v] = fmaxf(mx[v], l[m][v]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float ev = l[m][v] == NEG_INF ? 0.f : expf(l[m][v] - mx[v]);
            l[m][v] = ev;  // now the unnormalised weight
            sum[v] += ev;
            acc[v] += ev * a[m][v];
          }
        }
      }
      float inv[V], out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        inv[v] = sum[v] > 0.f ? 1.f / sum[v] : 0.f;
        out[v] = acc[v] * inv[v];
      }
      store_v<T, V>(fused + e0, out);
      if (gates) {
#pragma unroll
        for (int m = 0; m < MC; ++m) {
          if (m < M) {
            float gv[V];
#pragma unroll
            for (int v = 0; v < V; ++v) gv[v] = l[m][v] * inv[v];
            store_v<T, V>(gates + m * NH + e0, gv);
          }
        }
      }
    } else {
      for (int m = 0; m < M; ++m) {  // online softmax, one read of f and logits
        if (present != nullptr && !present[(int64_t)m * N + n]) continue;
        float l[V], fv[V];
        load_v<T, V>(lg + m * NH + e0, l);
        load_v<T, V>(f + m * NH + e0, fv);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (l[v] == NEG_INF) continue;
          const float nm = fmaxf(mx[v], l[v]);
          const float sc = mx[v] == NEG_INF ? 0.f : expf(mx[v] - nm);
          const float ev = expf(l[v] - nm);
          sum[v] = sum[v] * sc + ev;
          acc[v] = acc[v] * sc + ev * gf_act<float>(fv[v], act);
          mx[v] = nm;
        }
      }
      float inv[V], out[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        inv[v] = sum[v] > 0.f ? 1.f / sum[v] : 0.f;
        out[v] = acc[v] * inv[v];
      }
      store_v<T, V>(fused + e0, out);
      if (gates) {
        for (int m = 0; m < M; ++m) {
          const bool pres = present == nullptr || present[(int64_t)m * N + n];
          float l[V], gv[V];
          load_v<T, V>(lg + m * NH + e0, l);
#pragma unroll
          for (int v = 0; v < V; ++v) gv[v] = (pres && l[v] != NEG_INF) ? expf(l[v] - mx[v]) * inv[v] : 0.f;
          store_v<T, V>(gates + m * NH + e0, gv);
        }
      }
    }
  }
}

template <typename T, int V, int MC>
__global__ void __launch_bounds__(kGfThreads)
    gf_bwd_kernel(const T* __restrict__ gfused, const T* __restrict__ ggates, const T* __restrict__ f,
                  const T* __restrict__ lg, const bool* __restrict__ present, int M, int64_t N, int64_t H, int act,
                  T* __restrict__ df, T* __restrict__ dl) {
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t NH = N * H;
  const int64_t chunks = NH / V;
  for (int64_t ch = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; ch < chunks; ch += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e0 = ch * V;
    const int64_t n = e0 / H;
    float go[V], mx[V], sum[V], S[V];
    load_v<T, V>(gfused + e0, go);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      mx[v] = NEG_INF;
      sum[v] = 0.f;
      S[v] = 0.f;
    }
    if constexpr (MC > 0) {
      float l[MC][V], a[MC][V], dg[MC][V];
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
          const bool pres = present == nullptr || present[(int64_t)m * N + n];
          float fv[V], gg[V];
          load_v<T, V>(lg + m * NH + e0, l[m]);
          load_v<T, V>(f + m * NH + e0, fv);
          if (ggates) load_v<T, V>(ggates + m * NH + e0, gg);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (!pres) l[m][v] = NEG_INF;
            const bool part = l[m][v] != NEG_INF;  // else selected out, see the forward
            a[m][v] = part ? gf_act<float>(fv[v], act) : 0.f;
            dg[m][v] = part ? go[v] * a[m][v] + (ggates ? gg[v] : 0.f) : 0.f;
            mx[v] = fmaxf(mx[v], l[m][v]);
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float ev = l[m][v] == NEG_INF ? 0.f : expf(l[m][v] - mx[v]);
            l[m][v] = ev;
            sum[v] += ev;
          }
        }
      }
      float inv[V];
#pragma unroll
      for (int v = 0; v < V; ++v) inv[v] = sum[v] > 0.f ? 1.f / sum[v] : 0.f;
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            l[m][v] *= inv[v];  // gate g_m
            S[v] += l[m][v] * dg[m][v];
          }
        }
      }
#pragma unroll
      for (int m = 0; m < MC; ++m) {
        if (m < M) {
          float dfv[V], dlv[V];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float g = l[m][v];
            dlv[v] = g * (dg[m][v] - S[v]);
            dfv[v] = go[v] * g * gf_act_grad_from_out<float>(a[m][v], act);
          }
          store_v<T, V>(df + m * NH + e0, dfv);
          store_v<T, V>(dl + m * NH + e0, dlv);
        }
      }
    } else {
      // pass 1: softmax statistics over the present logits
      for (int m = 0; m < M; ++m) {
        if (present != nullptr && !present[(int64_t)m * N + n]) continue;
        float l[V];
        load_v<T, V>(lg + m * NH + e0, l);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (l[v] == NEG_INF) continue;
          const float nm = fmaxf(mx[v], l[v]);
          const float sc = mx[v] == NEG_INF ? 0.f : expf(mx[v] - nm);
          sum[v] = sum[v] * sc + expf(l[v] - nm);
          mx[v] = nm;
        }
      }
      float inv[V];
#pragma unroll
      for (int v = 0; v < V; ++v) inv[v] = sum[v] > 0.f ? 1.f / sum[v] : 0.f;
      // pass 2: S = sum_k g_k dg_k; pass 3: outputs
      for (int pass = 0; pass < 2; ++pass) {
        for (int m = 0; m < M; ++m) {
          const bool pres = present == nullptr || present[(int64_t)m * N + n];
          float l[V], fv[V], gg[V];
          load_v<T, V>(lg + m * NH + e0, l);
          load_v<T, V>(f + m * NH + e0, fv);
          if (ggates) load_v<T, V>(ggates + m * NH + e0, gg);
          float dfv[V], dlv[V];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const bool part = pres && l[v] != NEG_INF;
            const float g = part ? expf(l[v] - mx[v]) * inv[v] : 0.f;
            const float a = part ? gf_act<float>(fv[v], act) : 0.f;
            const float dg = part ? go[v] * a + (ggates ? gg[v] : 0.f) : 0.f;
            if (pass == 0) {
              S[v] += g * dg;
            } else {
              dlv[v] = g * (dg - S[v]);
              dfv[v] = go[v] * g * gf_act_grad_from_out<float>(a, act);
            }
          }
          if (pass == 1) {
            store_v<T, V>(df + m * NH + e0, dfv);
            store_v<T, V>(dl + m * NH + e0, dlv);
          }
        }
      }
    }
  }
}


}  // namespace cuda
}  // namespace mmkernels
