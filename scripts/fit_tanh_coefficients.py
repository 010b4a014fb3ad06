"""Fit the coefficients of the CPU kernels' tanh (csrc/common/fast_math.h, kTanhP*/kTanhQ*).

tanh(x) ~= x P(s) / Q(s), s = x^2, |x| <= 9, P(0) = Q(0) = 1, P of degree 5 and Q of degree 3 in s:
Lawson-weighted linearised least squares on the relative error, fitted in double in v = s / 81 (for
conditioning) and rescaled to s. Prints the float constants as fast_math.h spells them.

    python scripts/fit_tanh_coefficients.py
"""
import numpy as np

CLAMP = 9.0
P_TERMS, Q_TERMS = 6, 4


def fit(p_terms=P_TERMS, q_terms=Q_TERMS, iters=300):
    """(max relative error of the fit in double, P coefficients, Q coefficients), lowest power first."""
    scale = CLAMP * CLAMP
    x = np.concatenate([np.linspace(1e-5, 1, 8000), np.linspace(1, CLAMP, 16000)])
    v = x * x / scale
    r = np.tanh(x) / x
    q = np.zeros(q_terms)
    q[0] = 1
    weights = np.ones_like(x)
    best = None
    for it in range(iters):
        w = weights / (r * np.polyval(q[::-1], v))
        a = np.concatenate([v[:, None] ** np.arange(1, p_terms), -(r[:, None] * v[:, None] ** np.arange(1, q_terms))], 1)
        sol, *_ = np.linalg.lstsq(a * w[:, None], (r - 1.0) * w, rcond=None)
        p = np.concatenate([[1.0], sol[: p_terms - 1]])
        q = np.concatenate([[1.0], sol[p_terms - 1:]])
        err = np.polyval(p[::-1], v) / np.polyval(q[::-1], v) / r - 1
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, p.copy(), q.copy())
        if it > 5:  # Lawson: weight where the error is large, towards the minimax fit
            weights = weights * np.abs(err) ** 0.5 + 1e-300
            weights *= len(x) / weights.sum()
    worst, p, q = best
    return worst, p / scale ** np.arange(p_terms), q / scale ** np.arange(q_terms)


def main():
    worst, p, q = fit()
    print(f"// max relative error of the fit in double: {worst:.2e}")
    print(", ".join(f"kTanhP{k} = {np.float32(c)!r}f" for k, c in enumerate(p) if k).replace("np.float32(", "").replace(")f", "f"))
    print(", ".join(f"kTanhQ{k} = {np.float32(c)!r}f" for k, c in enumerate(q) if k).replace("np.float32(", "").replace(")f", "f"))


if __name__ == "__main__":
    main()
