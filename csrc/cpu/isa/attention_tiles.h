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
// take more outputs so that enough independent accumulators hide the FMA latency.
template <int W>
constexpr int row_vecs() {
  return W == 16 ? 4 : 2;
}
template <int W, int RC>
constexpr int outer_tile() {
  if (W == 16) return RC == 4 ? 6 : RC == 3 ? 8 : RC == 2 ? 12 : 16;
  return RC == 2 ? 6 : 12;
}

// out[i * rp + c * W + l] = init + sum over t < len of b[i * b_outer + t * b_inner] * a[t * rp + c * W + l]
// for i < JJ, c < RC, lanes l; init = 0, or out's own value times scale[c * W + l] when scale is set.
template <int W, int RC, int JJ>
inline void tile_product(const float* __restrict__ a, long long rp, const float* __restrict__ b, long long b_outer,
                         long long b_inner, long long len, float* __restrict__ out,
                         const float* __restrict__ scale) {
  typedef typename Vec<W>::F F;
  F acc[JJ][RC];
  if (scale == nullptr) {
#pragma GCC unroll 16
    for (int i = 0; i < JJ; ++i)
#pragma GCC unroll 16
      for (int c = 0; c < RC; ++c) acc[i][c] = Vec<W>::splat(0.f).v;
  } else {
#pragma GCC unroll 16
    for (int c = 0; c < RC; ++c) {
      const F s = Vec<W>::load(scale + c * W).v;
#pragma GCC unroll 16
      for (int i = 0; i < JJ; ++i) acc[i][c] = Vec<W>::load(out + i * rp + c * W).v * s;
    }
  }
  for (long long t = 0; t < len; ++t) {
    F av[RC];
#pragma GCC unroll 16
    for (int c = 0; c < RC; ++c) av[c] = Vec<W>::load(a + t * rp + c * W).v;
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
    for (int c = 0; c < RC; ++c) Vec<W>{acc[i][c]}.store(out + i * rp + c * W);
}

// Outputs [0, outer) of row vectors [0, RC): full tiles, then the rest (below outer_tile <= 16) in
// tiles of 8, 4, 2 and 1.
template <int W, int RC>
inline void tile_product_outer(const float* a, long long rp, const float* b, long long b_outer, long long b_inner,
                               long long len, float* out, const float* scale, long long outer) {
  constexpr int JJ = outer_tile<W, RC>();
  static_assert(JJ <= 16, "the rest is split into tiles of 8, 4, 2 and 1");
  long long i = 0;
  for (; i + JJ <= outer; i += JJ)
    tile_product<W, RC, JJ>(a, rp, b + i * b_outer, b_outer, b_inner, len, out + i * rp, scale);
  if (outer - i >= 8) {
    tile_product<W, RC, 8>(a, rp, b + i * b_outer, b_outer, b_inner, len, out + i * rp, scale);
    i += 8;
  }
  if (outer - i >= 4) {
    tile_product<W, RC, 4>(a, rp, b + i * b_outer, b_outer, b_inner, len, out + i * rp, scale);
    i += 4;
  }
  if (outer - i >= 2) {
    tile_product<W, RC, 2>(a, rp, b + i * b_outer, b_outer, b_inner, len, out + i * rp, scale);
    i += 2;
  }
  if (outer - i >= 1) tile_product<W, RC, 1>(a, rp, b + i * b_outer, b_outer, b_inner, len, out + i * rp, scale);
}

// The whole (outer x rp) product, in column chunks of row_vecs vectors.
template <int W>
inline void tile_product_all(const float* a, long long rp, const float* b, long long b_outer, long long b_inner,
                             long long len, float* out, const float* scale, long long outer) {
  constexpr int RC = row_vecs<W>();
  const long long nvec = rp / W;
  long long c = 0;
  for (; c + RC <= nvec; c += RC)
    tile_product_outer<W, RC>(a + c * W, rp, b, b_outer, b_inner, len, out + c * W, scale ? scale + c * W : nullptr,
                              outer);
  if (c == nvec) return;
  const float* ac = a + c * W;
  float* oc = out + c * W;
  const float* sc = scale ? scale + c * W : nullptr;
  switch (nvec - c) {
    case 1: tile_product_outer<W, 1>(ac, rp, b, b_outer, b_inner, len, oc, sc, outer); break;
    case 2: tile_product_outer<W, 2>(ac, rp, b, b_outer, b_inner, len, oc, sc, outer); break;
    default: tile_product_outer<W, 3>(ac, rp, b, b_outer, b_inner, len, oc, sc, outer); break;
  }
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
    for (long long j = 0; j < n; ++j) {
      float* row = st + j * rp + c;
      const F e = vexp_nonpositive<W>(Vec<W>::load(row).v - shift);
      Vec<W>{e}.store(row);
      sum += e;
    }
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
      const char* kr = static_cast<const char*>(a.next_k) + fetched * a.next_k_stride;
      const char* vr = static_cast<const char*>(a.next_v) + fetched * a.next_v_stride;
      for (long long off = 0; off < a.next_row_bytes_k; off += 64) __builtin_prefetch(kr + off, 0, 2);
      for (long long off = 0; off < a.next_row_bytes_v; off += 64) __builtin_prefetch(vr + off, 0, 2);
    }
    tile_product_all<W>(a.qt, a.rp, a.k + j * a.ldk, a.ldk, 1, a.D, a.st + j * a.rp, nullptr,
                        a.n - j < kChunk ? a.n - j : kChunk);
  }
  softmax_block<W>(a.st, a.rp, a.n, a.mask_bias, a.limit, a.row_bias, a.row_max, a.row_sum, a.alpha);
  // O^T[d, r] = alpha[r] O^T[d, r] + sum_j V[j, d] P^T[j, r]
  tile_product_all<W>(a.st, a.rp, a.v, 1, a.ldv, a.n, a.acc_t, a.alpha, a.Dv);
}
