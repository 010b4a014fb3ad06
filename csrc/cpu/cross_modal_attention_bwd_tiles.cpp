// CPU backward of mmkernels::cross_modal_attention_bwd with fp32 accumulation (float, half, bfloat16):
// the register-tiled products and elementwise step of the chosen instruction-set level
// (isa/attention_tiles.h). Tasks as in the fp64 path: (batch, kv head), each owning its dK/dV rows and
// the dQ rows of its G query heads (no races, no atomics), partials reduced in a fixed order.
#include <ATen/core/Tensor.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_isa.h"
#include "cross_modal_attention_bwd.h"
#include "cross_modal_attention_common.h"

namespace mmkernels::cpu {
namespace {

// Gradients larger than this (bytes, all segments) are stored with non-temporal stores: they are
// written once, row by row, and would otherwise first be read into caches they do not fit.
constexpr int64_t kStreamGradBytes = int64_t(8) << 20;

// Writes n floats of src to the gradient row dst (as scalar_t); with `stream`, fp32 rows aligned
// to 16 bytes go through non-temporal stores (the caller fences).
template <typename scalar_t>
inline void store_row(scalar_t* dst, const float* src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (stream && n % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
      for (int64_t d = 0; d < n; d += 4) _mm_stream_ps(dst + d, _mm_loadu_ps(src + d));
      return;
    }
  }
#endif
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<scalar_t>(src[d]);
}

}  // namespace

// fp32 accumulation (float, half, bfloat16 inputs): the level's register-tiled products
// (isa/attention_tiles.h). Query rows run in vector lanes for S^T = K Q^T, dP^T = V dO^T and
// dQ^T += K^T dS^T (Q^T, dO^T and dQ^T held per task), value and head dims for dV += P^T dO and
// dK += dS^T Q (rows of dO and Q padded to whole vectors, the pad zero).
template <typename scalar_t>
void cross_modal_attention_bwd_tiles(const CrossModalAttentionProblem& p, BwdTensors& io) {
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, Hkv = p.Hkv, D = p.D, Dv = p.Dv, M = p.M, G = p.G;
  const float scale = static_cast<float>(io.scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  const CpuIsaKernels& isa = current_kernels();
  const int64_t width = isa.width;
  auto round_up = [&](int64_t x) { return (x + width - 1) / width * width; };
  const int64_t Dp = round_up(D), Dvp = round_up(Dv);
  const int64_t Rp_max = round_up(Lq * G);

  const BwdRowReader<scalar_t, float> rows(io.q, io.go, io.o_raw, io.lse, io.glse);
  const SegmentTensors<scalar_t> ks(io.keys), vs(io.values);

  // Partials of the bias and gate gradients, only where there is a bias or a gate.
  const bool has_bias = !p.bias.empty(), has_gate = !p.gate_t.empty();
  std::vector<double> gb_part(static_cast<size_t>(B * Hq * M), 0.0);
  std::vector<double> gg_part(static_cast<size_t>(B * Hq), 0.0);
  // Key and value gradients past the caches are written around them (see store_row).
  int64_t grad_bytes = 0;
  for (int64_t m = 0; m < M; ++m) grad_bytes += (io.dk[m].numel() + io.dv[m].numel()) * int64_t(sizeof(scalar_t));
  const bool stream = grad_bytes > kStreamGradBytes;

  struct Scratch {
    // per task (rows Rp): Q^T, dO^T, dQ^T in panels of a row block (dims x its rows, see panel); Q and
    // dO rows (Rp x Dp, Rp x Dvp)
    std::vector<float> qt, dot, dqt, q_rows, do_rows, lse_r, di, shift, ds_sum;
    std::vector<int64_t> visible;
    std::vector<double> head_sum;  // (G,) this task's per-head partial of grad_gate
    // per block
    std::vector<float> st, dpt, dk_blk, dv_blk, Kt, Vt, mbias;
    std::vector<int> limit, kept;
    void trim() {
      for (auto* v : {&qt, &dot, &dqt, &q_rows, &do_rows}) trim_scratch(*v);
      trim_scratch(kept);
    }
  };
  auto size_scratch = [&](Scratch& sc) {
    sc.qt.resize(D * Rp_max), sc.dot.resize(Dv * Rp_max), sc.dqt.resize(D * Rp_max);
    sc.q_rows.resize(Rp_max * Dp), sc.do_rows.resize(Rp_max * Dvp);
    for (auto* v : {&sc.lse_r, &sc.di, &sc.shift, &sc.ds_sum}) v->resize(Rp_max);
    sc.visible.resize(Rp_max);
    sc.head_sum.resize(G);
    sc.st.resize(kBwdKeys * kBwdRows), sc.dpt.resize(kBwdKeys * kBwdRows);
    sc.dk_blk.resize(kBwdKeys * Dp), sc.dv_blk.resize(kBwdKeys * Dvp);
    sc.Kt.resize(kBwdKeys * D), sc.Vt.resize(kBwdKeys * Dv), sc.mbias.resize(kBwdKeys);
    sc.limit.resize(kBwdRows);
  };
  parallel_tasks<Scratch>(B * Hkv, size_scratch, [&](int64_t t, Scratch& sc) {
    const int64_t b = t / Hkv, kvh = t % Hkv;
    const int64_t ql = p.q_len[b];
    const int64_t R = ql * G;  // valid rows, row r <-> (i = r / G, g = r % G)
    const int64_t Rp = round_up(R);
    float* qt = sc.qt.data();
    float* dot = sc.dot.data();
    // Element (d, r) of a transposed (dims x Rp) matrix stored as one panel per row block of kBwdRows
    // rows (the block's dims x its rows, contiguous: the block's products read it with stride rbp,
    // and writing it row by row stays within a few KB instead of striding over Rp).
    auto panel = [&](int64_t dims, int64_t d, int64_t r) {
      const int64_t r0 = r / kBwdRows * kBwdRows;
      return r0 * dims + d * std::min(kBwdRows, Rp - r0) + (r - r0);
    };
    std::fill(sc.dqt.begin(), sc.dqt.begin() + D * Rp, 0.f);
    std::fill(sc.head_sum.begin(), sc.head_sum.end(), 0.0);
    // Row r <-> (position i, head g of the group), counted instead of divided: at small head dims a
    // division per row costs as much as the row's work.
    for (int64_t r = 0, i = 0, g = 0; r < Rp; ++r, g = g + 1 == G ? (++i, 0) : g + 1) {
      if (r >= R) {
        for (int64_t d = 0; d < D; ++d) qt[panel(D, d, r)] = 0.f;
        for (int64_t d = 0; d < Dv; ++d) dot[panel(Dv, d, r)] = 0.f;
        sc.lse_r[r] = ninf, sc.di[r] = 0.f;
        continue;
      }
      const int64_t h = kvh * G + g;
      const float dotp = rows.read(
          b, i, h, Lq, scale, static_cast<float>(p.gate_at(h)),
          [&](int64_t d, float v) { qt[panel(D, d, r)] = v, sc.q_rows[r * Dp + d] = v; },
          [&](int64_t d, float v) { dot[panel(Dv, d, r)] = v, sc.do_rows[r * Dvp + d] = v; }, &sc.lse_r[r],
          &sc.di[r]);
      // The rows' pad to whole vectors (the dK and dV products read rows below R only).
      std::fill(sc.q_rows.begin() + r * Dp + D, sc.q_rows.begin() + (r + 1) * Dp, 0.f);
      std::fill(sc.do_rows.begin() + r * Dvp + Dv, sc.do_rows.begin() + (r + 1) * Dvp, 0.f);
      sc.head_sum[g] += static_cast<double>(dotp);
    }
    if (has_gate)
      for (int64_t g = 0; g < G; ++g) gg_part[b * Hq + kvh * G + g] += sc.head_sum[g];

    for (int64_t m = 0; m < M; ++m) {
      int64_t maxlim = 0;
      for (int64_t r = 0, i = 0, g = 0; r < Rp; ++r, g = g + 1 == G ? (++i, 0) : g + 1) {
        const bool live = r < R && sc.lse_r[r] != ninf;
        sc.visible[r] = live ? p.visible(b, m, i) : 0;
        maxlim = std::max(maxlim, sc.visible[r]);
        sc.shift[r] = live ? sc.lse_r[r] - static_cast<float>(p.bias_at(kvh * G + g, m)) : 0.f;
        sc.ds_sum[r] = 0.f;
      }
      const scalar_t* kbase = ks.rows(m, b, kvh);
      const scalar_t* vbase = vs.rows(m, b, kvh);
      const bool* mask = p.mask_row(b, m);
      const at::Tensor& dkm = io.dk[m];
      const at::Tensor& dvm = io.dv[m];
      scalar_t* dk0 = io.dk[m].data_ptr<scalar_t>() + b * dkm.stride(0) + kvh * dkm.stride(2);
      scalar_t* dv0 = io.dv[m].data_ptr<scalar_t>() + b * dvm.stride(0) + kvh * dvm.stride(2);
      const int64_t dks = dkm.stride(1), dvs = dvm.stride(1);
      // One key block: keys j0 + [0, n), or (rows given) the kept keys rows[0, n) gathered into a packed
      // block; its grads are written to the keys' own rows.
      auto key_block = [&](int64_t j0, int64_t n, const int* rows) {
        // The first row block that runs writes the block's dK and dV rows, the others add to them; where
        // none runs (a fully masked block, no row that sees it) they are zero.
        bool written = false;
        if (rows != nullptr || mask_bias(sc.mbias.data(), mask, j0, n)) {  // a fully masked block: zero grads
          int64_t ldk = D, ldv = Dv;
          const float* Kp = sc.Kt.data();
          const float* Vp = sc.Vt.data();
          if (rows != nullptr) {
            pack_rows<scalar_t>(kbase, ks.row_stride(m), rows, n, D, sc.Kt.data());
            pack_rows<scalar_t>(vbase, vs.row_stride(m), rows, n, Dv, sc.Vt.data());
          } else {
            Kp = load_rows<scalar_t, float>(kbase, ks.row_stride(m), j0, n, D, sc.Kt.data(), &ldk);
            Vp = load_rows<scalar_t, float>(vbase, vs.row_stride(m), j0, n, Dv, sc.Vt.data(), &ldv);
          }
          const float* block_mask = rows == nullptr && mask != nullptr ? sc.mbias.data() : nullptr;
          // Rows are ordered by query position, so (causal) visibility is nondecreasing in r except
          // for rows without keys; skip leading row blocks that see nothing of this block.
          int64_t rstart = 0;
          if (p.causal) {
            while (rstart < R && sc.visible[rstart] <= j0) ++rstart;
            rstart = (rstart / kBwdRows) * kBwdRows;
          }
          for (int64_t r0 = rstart; r0 < R; r0 += kBwdRows) {
            const int64_t rbp = std::min(kBwdRows, Rp - r0);  // lanes: a multiple of the width
            const int64_t rbv = std::min(rbp, R - r0);         // valid rows
            const int64_t vecs = rbp / width;
            for (int64_t r = 0; r < rbp; ++r)  // gathered keys: every live row sees the whole block
              sc.limit[r] = rows != nullptr ? (sc.visible[r0 + r] > 0 ? static_cast<int>(n) : 0)
                                            : static_cast<int>(std::clamp<int64_t>(sc.visible[r0 + r] - j0, 0, n));
            float* st = sc.st.data();
            float* dpt = sc.dpt.data();
            isa.tile_product(TileProduct{qt + r0 * D, rbp, Kp, ldk, 1, D, st, rbp, kTileZero, nullptr, n, vecs});
            isa.tile_product(TileProduct{dot + r0 * Dv, rbp, Vp, ldv, 1, Dv, dpt, rbp, kTileZero, nullptr, n, vecs});
            isa.attention_bwd_scores(AttnBwdScores{st, dpt, n, rbp, block_mask, sc.limit.data(), sc.shift.data() + r0,
                                                   sc.di.data() + r0, sc.ds_sum.data() + r0});
            // dV[j] += sum_r P[r, j] dO[r]; dK[j] += sum_r dS[r, j] Q[r] (Q carries the scale)
            const int init = written ? kTileAccumulate : kTileZero;
            isa.tile_product(TileProduct{sc.do_rows.data() + r0 * Dvp, Dvp, st, rbp, 1, rbv, sc.dv_blk.data(),
                                         Dvp, init, nullptr, n, Dvp / width});
            isa.tile_product(TileProduct{sc.q_rows.data() + r0 * Dp, Dp, dpt, rbp, 1, rbv, sc.dk_blk.data(), Dp,
                                         init, nullptr, n, Dp / width});
            written = true;
            // dQ^T[d, r] += sum_j K[j, d] dS^T[j, r] (scaled at the end)
            isa.tile_product(TileProduct{dpt, rbp, Kp, 1, ldk, n, sc.dqt.data() + r0 * D, rbp, kTileAccumulate,
                                         nullptr, D, vecs});
          }
        }
        if (!written) {
          std::fill(sc.dk_blk.begin(), sc.dk_blk.begin() + n * Dp, 0.f);
          std::fill(sc.dv_blk.begin(), sc.dv_blk.begin() + n * Dvp, 0.f);
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t key = rows != nullptr ? rows[j] : j0 + j;
          store_row<scalar_t>(dk0 + key * dks, sc.dk_blk.data() + j * Dp, D, stream);
          store_row<scalar_t>(dv0 + key * dvs, sc.dv_blk.data() + j * Dvp, Dv, stream);
        }
      };
      if (mask != nullptr && !p.causal && compact_keys(mask, maxlim, sc.kept)) {
        for (int64_t j = 0; j < maxlim; ++j) {  // the masked keys' grads are 0
          if (!mask[j]) {
            zero_grad_rows(dk0, dks, D, j, j + 1);
            zero_grad_rows(dv0, dvs, Dv, j, j + 1);
          }
        }
        const int64_t kept = static_cast<int64_t>(sc.kept.size());
        for (int64_t c0 = 0; c0 < kept; c0 += kBwdKeys) key_block(0, std::min(kBwdKeys, kept - c0), sc.kept.data() + c0);
      } else {
        // The keys before the first kept one get zero grads like those past the last visible one.
        const int64_t first = std::min(p.first_key(b, m), maxlim);
        zero_grad_rows(dk0, dks, D, 0, first);
        zero_grad_rows(dv0, dvs, Dv, 0, first);
        for (int64_t j0 = first; j0 < maxlim; j0 += kBwdKeys) key_block(j0, std::min(kBwdKeys, maxlim - j0), nullptr);
      }
      zero_grad_rows(dk0, dks, D, maxlim, p.Lk[m]);
      zero_grad_rows(dv0, dvs, Dv, maxlim, p.Lk[m]);
      if (has_bias) {  // one write per head: tasks on other threads write the neighbouring entries
        for (int64_t g = 0; g < G; ++g) {
          double sum = 0.0;
          for (int64_t r = g; r < R; r += G) sum += static_cast<double>(sc.ds_sum[r]);
          gb_part[(b * Hq + kvh * G + g) * M + m] += sum;
        }
      }
    }

    write_dq_rows<scalar_t, float>(p, io.dq, b, kvh, ql, scale,
                                   [&](int64_t r, int64_t d) { return sc.dqt[panel(D, d, r)]; });
#if defined(__SSE2__)
    if (stream) _mm_sfence();  // this task's streamed rows are visible before the op returns
#endif
  });
  reduce_partials<float>(p, gb_part, gg_part, io.gbias, io.ggate);
}

#define MMK_INSTANTIATE(T) \
  template void cross_modal_attention_bwd_tiles<T>(const CrossModalAttentionProblem&, BwdTensors&);
MMK_INSTANTIATE(float)
MMK_INSTANTIATE(c10::Half)
MMK_INSTANTIATE(c10::BFloat16)
#undef MMK_INSTANTIATE

}  // namespace mmkernels::cpu
