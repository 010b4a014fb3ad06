// One key block of the fp32 attention forward with explicit vectors of W floats (see vec.h), on a
// query tile held transposed: rp = the tile's rows padded to a multiple of W, and everything per row
// is laid out with rows contiguous, so vectors run across query rows:
// - S^T = K Q^T broadcasts each key element against Q^T (D x rp), built once per tile: neither K
//   nor Q is re-laid per block;
// - the online softmax keeps each row's max, sum and bias in vector lanes, and a key's mask bias
//   and each row's visible-key limit are one compare per key;
// - O^T = V^T P^T (Dv x rp) broadcasts each value element against P^T's rows.
// Both products are one register-tiled kernel (tile_product): a tile of accumulators stays in
// registers over the whole reduction, sized to the level's register file.
#pragma once

// Accumulator tile of tile_product: RC vectors of query rows by outer_tile<W, RC>() outputs (keys or
// value dims), about 24 of AVX-512's 32 vector registers and 12 of the 16 below; fewer row vectors
// take more outputs so that enough independent accumulators hide the FMA latency. AVX2 takes 4 row
// vectors by 3 rather than 2 by 6: 7 loads per 12 FMAs instead of 8, and each key or value element
// broadcast once per 32 rows (4-6% off the forward on Zen 1, whose 256-bit FMAs run one a cycle).
template <int W>
constexpr int row_vecs() {
  return W == 4 ? 2 : 4;
}
template <int W, int RC>
constexpr int outer_tile() {
  if (W == 16) return RC == 4 ? 6 : RC == 3 ? 8 : RC == 2 ? 12 : 16;
  return RC == 4 ? 3 : RC == 3 ? 4 : RC == 2 ? 6 : 12;
}

// out[i * ldo + c * W + l] = init + sum over t < len of b[i * b_outer + t * b_inner] * a[t * lda + c * W + l]
// for i < JJ, c < RC, lanes l; init = 0, out's own value, or out's own value times scale[c * W + l].
template <int W, int RC, int JJ>
inline void tile_product(const float* __restrict__ a, long long lda, const float* __restrict__ b, long long b_outer,
                         long long b_inner, long long len, float* __restrict__ out, long long ldo, int init,
                         const float* __restrict__ scale) {
  typedef typename Vec<W>::F F;
  F acc[JJ][RC];
  if (init == kTileZero) {
#pragma GCC unroll 16
    for (int i = 0; i < JJ; ++i)
#pragma GCC unroll 16
      for (int c = 0; c < RC; ++c) acc[i][c] = Vec<W>::splat(0.f).v;
  } else {
#pragma GCC unroll 16
    for (int c = 0; c < RC; ++c) {
      const F s = init == kTileScale ? Vec<W>::load(scale + c * W).v : Vec<W>::splat(1.f).v;
#pragma GCC unroll 16
      for (int i = 0; i < JJ; ++i) acc[i][c] = Vec<W>::load(out + i * ldo + c * W).v * s;
    }
  }
  for (long long t = 0; t < len; ++t) {
    F av[RC];
#pragma GCC unroll 16
    for (int c = 0; c < RC; ++c) av[c] = Vec<W>::load(a + t * lda + c * W).v;
#pragma GCC unroll 16
    for (int i = 0; i < JJ; ++i) {
      const F bv = Vec<W>::splat(b[i * b_outer + t * b_inner]).v;
#pragma GCC unroll 16
      for (int c = 0; c < RC; ++c) acc[i][c] += bv * av[c];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < JJ; ++i)
#pragma GCC unroll 16
    for (int c = 0; c < RC; ++c) Vec<W>{acc[i][c]}.store(out + i * ldo + c * W);
}

// Outputs [0, outer) of lane vectors [0, RC): full tiles, then the rest (below outer_tile <= 16) in
// tiles of 8, 4, 2 and 1.
template <int W, int RC>
inline void tile_product_outer(const TileProduct& t, const float* a, float* out, const float* scale) {
  constexpr int JJ = outer_tile<W, RC>();
  static_assert(JJ <= 16, "the rest is split into tiles of 8, 4, 2 and 1");
  long long i = 0;
  for (; i + JJ <= t.outer; i += JJ)
    tile_product<W, RC, JJ>(a, t.lda, t.b + i * t.b_outer, t.b_outer, t.b_inner, t.len, out + i * t.ldo, t.ldo,
                            t.init, scale);
#define MMK_TILE_REST(K)                                                                                      \
  if (t.outer - i >= K) {                                                                                     \
    tile_product<W, RC, K>(a, t.lda, t.b + i * t.b_outer, t.b_outer, t.b_inner, t.len, out + i * t.ldo, t.ldo, \
                           t.init, scale);                                                                    \
    i += K;                                                                                                   \
  }
  MMK_TILE_REST(8)
  MMK_TILE_REST(4)
  MMK_TILE_REST(2)
  MMK_TILE_REST(1)
#undef MMK_TILE_REST
}

// The whole product (see TileProduct), in lane chunks of row_vecs vectors.
template <int W>
inline void tile_product_all(const TileProduct& t) {
  constexpr int RC = row_vecs<W>();
  long long c = 0;
  for (; c + RC <= t.vecs; c += RC)
    tile_product_outer<W, RC>(t, t.a + c * W, t.out + c * W, t.scale ? t.scale + c * W : nullptr);
  if (c == t.vecs) return;
  const float* ac = t.a + c * W;
  float* oc = t.out + c * W;
  const float* sc = t.scale ? t.scale + c * W : nullptr;
  if constexpr (RC == 4) {  // rests of 2 and 3 exist only where a chunk is 4 vectors (AVX2, AVX-512)
    switch (t.vecs - c) {
      case 1: tile_product_outer<W, 1>(t, ac, oc, sc); break;
      case 2: tile_product_outer<W, 2>(t, ac, oc, sc); break;
      default: tile_product_outer<W, 3>(t, ac, oc, sc); break;
    }
  } else {
    static_assert(RC == 2, "the rest below a chunk of 2 is one vector");
    tile_product_outer<W, 1>(t, ac, oc, sc);
  }
}

// Keys taken U at a time by the softmax's exponentials, forward and backward (see vexp_nonpositive_n);
// a block's last n % U keys go one at a time (a check per key in the U-wide step costs 1.5-3%).
constexpr int kExpKeys = 4;

// Keys [0, U) of one lane chunk of P^T (rows of rp floats from st): s becomes exp(s - shift); sum gains it.
template <int W, int U>
inline void softmax_exp_keys(float* st, long long rp, typename Vec<W>::F shift, typename Vec<W>::F& sum) {
  typename Vec<W>::F e[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) e[u] = Vec<W>::load(st + u * rp).v - shift;
  vexp_nonpositive_n<W, U>(e);
  typename Vec<W>::F part = e[0];  // one add a step on sum's chain
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    Vec<W>{e[u]}.store(st + u * rp);
    if (u > 0) part += e[u];
  }
  sum += part;
}

// The online softmax of one block over S^T (n x rp), in place: S^T becomes P^T (exp(s - c), 0 where
// a key is masked or past the row's limit), each row's running max and sum move on, and alpha gets
// the factor that rescales the row's accumulated output (0 while it has seen no key).
template <int W>
inline void softmax_block(float* st, long long rp, long long n, const float* mask_bias, const int* limit,
                          const float* row_bias, float* row_max, float* row_sum, float* alpha) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const F vninf = Vec<W>::splat(-__builtin_inff()).v;
  const F zero = Vec<W>::splat(0.f).v;
  for (long long c = 0; c < rp; c += W) {
    I lim;
    __builtin_memcpy(&lim, limit + c, sizeof(I));
    F mx = vninf;
    for (long long j = 0; j < n; ++j) {
      float* row = st + j * rp + c;
      F s = Vec<W>::load(row).v;
      if (mask_bias != nullptr) s += mask_bias[j];
      const I jv = I{} + static_cast<int>(j);
      s = jv < lim ? s : vninf;
      Vec<W>{s}.store(row);
      mx = vmax<W>(mx, s);
    }
    const F b = Vec<W>::load(row_bias + c).v;
    const F m_old = Vec<W>::load(row_max + c).v;
    const F nm = vmax<W>(m_old, mx + b);
    // exp(s + b - nm); where nm is -inf (no key yet, or a bias of -inf) every P is 0
    const F shift = nm == vninf ? -vninf : nm - b;
    F sum = zero;
    long long j = 0;
    for (; j + kExpKeys <= n; j += kExpKeys) softmax_exp_keys<W, kExpKeys>(st + j * rp + c, rp, shift, sum);
    for (; j < n; ++j) softmax_exp_keys<W, 1>(st + j * rp + c, rp, shift, sum);
    const F a = m_old == vninf ? zero : vexp_nonpositive<W>(m_old - nm);
    Vec<W>{Vec<W>::load(row_sum + c).v * a + sum}.store(row_sum + c);
    Vec<W>{nm}.store(row_max + c);
    Vec<W>{a}.store(alpha + c);
  }
}

// The whole block: S^T = K Q^T, its online softmax, and O^T = O^T * alpha + V^T P^T.
template <int W>
void attention_fwd_block_rows(const AttnFwdBlock& a) {
  // S^T[j, r] = sum_d K[j, d] Q^T[d, r], in chunks of keys between which the next block's rows are
  // prefetched: spread over the product, the requests overlap its arithmetic.
  constexpr long long kChunk = 12;
  const long long per_chunk = a.next_k == nullptr ? 0 : (a.next_n * kChunk + a.n - 1) / a.n;
  long long fetched = 0;
  for (long long j = 0; j < a.n; j += kChunk) {
    const long long until = fetched + per_chunk < a.next_n ? fetched + per_chunk : a.next_n;
    for (; fetched < until; ++fetched) {
      const long long row = a.next_rows == nullptr ? fetched : a.next_rows[fetched];
      const char* kr = static_cast<const char*>(a.next_k) + row * a.next_k_stride;
      const char* vr = static_cast<const char*>(a.next_v) + row * a.next_v_stride;
      for (long long off = 0; off < a.next_row_bytes_k; off += 64) __builtin_prefetch(kr + off, 0, 2);
      for (long long off = 0; off < a.next_row_bytes_v; off += 64) __builtin_prefetch(vr + off, 0, 2);
    }
    const long long keys = a.n - j < kChunk ? a.n - j : kChunk;
    tile_product_all<W>(TileProduct{a.qt, a.rp, a.k + j * a.ldk, a.ldk, 1, a.D, a.st + j * a.rp, a.rp,
                                    kTileZero, nullptr, keys, a.rp / W});
  }
  softmax_block<W>(a.st, a.rp, a.n, a.mask_bias, a.limit, a.row_bias, a.row_max, a.row_sum, a.alpha);
  // O^T[d, r] = alpha[r] O^T[d, r] + sum_j V[j, d] P^T[j, r]
  tile_product_all<W>(TileProduct{a.st, a.rp, a.v, 1, a.ldv, a.n, a.acc_t, a.rp, kTileScale, a.alpha, a.Dv,
                                  a.rp / W});
}

// Keys [j, j + U) of the backward's elementwise step on lane chunk c (see attention_bwd_scores_rows).
template <int W, int U>
inline void bwd_scores_keys(const AttnBwdScores& a, long long c, long long j, typename Vec<W>::I lim,
                            typename Vec<W>::F shift, typename Vec<W>::F di, typename Vec<W>::F& sum) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const F zero = Vec<W>::splat(0.f).v;
  F x[U];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    x[u] = Vec<W>::load(a.st + (j + u) * a.rp + c).v - shift;
    if (a.mask_bias != nullptr) x[u] += a.mask_bias[j + u];
    x[u] = x[u] > zero ? zero : x[u];  // <= 0 up to rounding for the forward's lse; an lse from elsewhere must not wrap exp
  }
  vexp_nonpositive_n<W, U>(x);
  F part = zero;  // one add a step on sum's chain
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u) {
    float* s = a.st + (j + u) * a.rp + c;
    float* dp = a.dpt + (j + u) * a.rp + c;
    const I jv = I{} + static_cast<int>(j + u);
    const F pj = jv < lim ? x[u] : zero;
    const F ds = pj * (Vec<W>::load(dp).v - di);
    Vec<W>{pj}.store(s);
    Vec<W>{ds}.store(dp);
    part += ds;
  }
  sum += part;
}

// The backward's elementwise step on one (key block x row block), transposed (n x rp, rows in lanes):
// P = exp(s + mask bias - shift) for keys below the row's limit (0 elsewhere), shift = lse - bias, and
// dS = P (dP - Di); s becomes P, dp becomes dS, and ds_sum (per row) gains the sum of dS.
template <int W>
void attention_bwd_scores_rows(const AttnBwdScores& a) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  const F zero = Vec<W>::splat(0.f).v;
  for (long long c = 0; c < a.rp; c += W) {
    I lim;
    __builtin_memcpy(&lim, a.limit + c, sizeof(I));
    const F shift = Vec<W>::load(a.shift + c).v;
    const F di = Vec<W>::load(a.di + c).v;
    F sum = zero;
    long long j = 0;
    for (; j + kExpKeys <= a.n; j += kExpKeys) bwd_scores_keys<W, kExpKeys>(a, c, j, lim, shift, di, sum);
    for (; j < a.n; ++j) bwd_scores_keys<W, 1>(a, c, j, lim, shift, di, sum);
    Vec<W>{Vec<W>::load(a.ds_sum + c).v + sum}.store(a.ds_sum + c);
  }
}
