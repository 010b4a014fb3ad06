// fp32 row loops of the CPU attention kernels with explicit vectors of W floats (see vec.h):
// the max of a row of scores, exp(s - c) in place with its sum (forward), and the backward's
// P = exp(s - c), dS = P (dP - delta) in place with the sum of dS. c is the row's max or log-sum-exp,
// so exp's argument is <= 0: vexp_nonpositive, exactly 0 for -inf.
#pragma once

template <int W>
inline float hsum(typename Vec<W>::F x) {
  float t = 0.f;
  for (int i = 0; i < W; ++i) t += x[i];
  return t;
}

template <int W>
float row_max_rows(const float* s, long long n) {
  typedef typename Vec<W>::F F;
  const float ninf = -__builtin_inff();
  F m = Vec<W>::splat(ninf).v;
  long long j = 0;
  for (; j + W <= n; j += W) m = vmax<W>(m, Vec<W>::load(s + j).v);
  float r = ninf;
  for (int i = 0; i < W; ++i) r = m[i] > r ? m[i] : r;
  for (; j < n; ++j) r = s[j] > r ? s[j] : r;
  return r;
}

template <int W>
float exp_sum_rows(float* s, long long n, float c) {
  typedef typename Vec<W>::F F;
  F acc = Vec<W>::splat(0.f).v;
  long long j = 0;
  for (; j + W <= n; j += W) {
    const F e = vexp_nonpositive<W>(Vec<W>::load(s + j).v - c);
    Vec<W>{e}.store(s + j);
    acc += e;
  }
  float t = hsum<W>(acc);
  if (j < n) {  // the tail through a padded vector (padding -inf: exp gives 0)
    float buf[W];
    for (int i = 0; i < W; ++i) buf[i] = j + i < n ? s[j + i] : -__builtin_inff();
    const F e = vexp_nonpositive<W>(Vec<W>::load(buf).v - c);
    Vec<W>{e}.store(buf);
    for (int i = 0; j + i < n; ++i) s[j + i] = buf[i];
    t += hsum<W>(e);
  }
  return t;
}

template <int W>
float exp_ds_rows(float* s, float* dp, long long n, float c, float delta) {
  typedef typename Vec<W>::F F;
  F acc = Vec<W>::splat(0.f).v;
  long long j = 0;
  for (; j + W <= n; j += W) {
    const F p = vexp_nonpositive<W>(Vec<W>::load(s + j).v - c);
    const F ds = p * (Vec<W>::load(dp + j).v - delta);
    Vec<W>{p}.store(s + j);
    Vec<W>{ds}.store(dp + j);
    acc += ds;
  }
  float t = hsum<W>(acc);
  if (j < n) {  // the tail through padded vectors (s padding -inf: P = 0, so dS = 0 there)
    float bs[W], bd[W];
    for (int i = 0; i < W; ++i) {
      bs[i] = j + i < n ? s[j + i] : -__builtin_inff();
      bd[i] = j + i < n ? dp[j + i] : 0.f;
    }
    const F p = vexp_nonpositive<W>(Vec<W>::load(bs).v - c);
    const F ds = p * (Vec<W>::load(bd).v - delta);
    Vec<W>{p}.store(bs);
    Vec<W>{ds}.store(bd);
    for (int i = 0; j + i < n; ++i) {
      s[j + i] = bs[i];
      dp[j + i] = bd[i];
    }
    t += hsum<W>(ds);
  }
  return t;
}
