"""Independent float64 NumPy reference for SOT (log-domain Sinkhorn), used only by the tests.

Written from the definitions, sharing no code with sotjax:

    OT_eps(a, b) = min_{T in Pi(a,b)} <T, C> + eps KL(T || a b^T),
    T_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),
    J(theta) = (1 - lam) L(w, safe) - lam L(w, harmful) + tau KL(w || 1/n),  w = softmax(theta).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_cost(x, y):
    return np.clip(1.0 - unit(x) @ unit(y).T, 0.0, 2.0)


def sinkhorn_log(C, a, b, eps, tol=1e-14, max_iter=100_000):
    """Returns (f, g, T) with centred potentials (T = a b^T exp((f+g-C)/eps))."""
    la, lb = np.log(a), np.log(b)
    f = np.zeros(C.shape[0])
    g = np.zeros(C.shape[1])
    for _ in range(max_iter):
        f = -eps * logsumexp((g[None, :] - C) / eps + lb[None, :], axis=1)
        g = -eps * logsumexp((f[:, None] - C) / eps + la[:, None], axis=0)
        T = np.exp((f[:, None] + g[None, :] - C) / eps + la[:, None] + lb[None, :])
        if np.abs(T.sum(1) - a).sum() < tol:
            break
    return f, g, T


def symmetric_potential(C, a, eps, tol=1e-14, max_iter=100_000):
    """OT_eps(a, a): averaged fixed point p <- (p + T(p)) / 2 (Feydy et al. 2019, Eq. 25)."""
    la = np.log(a)
    p = np.zeros(C.shape[0])
    for _ in range(max_iter):
        new = 0.5 * (p - eps * logsumexp((p[None, :] - C) / eps + la[None, :], axis=1))
        done = np.abs(new - p).max() < tol
        p = new
        if done:
            break
    return p


def transport_cost(C, a, b, eps):
    _, _, T = sinkhorn_log(C, a, b, eps)
    return float(np.sum(T * C))


def regularized_ot(C, a, b, eps):
    f, g, _ = sinkhorn_log(C, a, b, eps)
    return float(f @ a + g @ b)


def sinkhorn_divergence(Cxy, Cxx, Cyy, a, b, eps):
    ot_aa = 2 * symmetric_potential(Cxx, a, eps) @ a
    ot_bb = 2 * symmetric_potential(Cyy, b, eps) @ b
    return regularized_ot(Cxy, a, b, eps) - 0.5 * ot_aa - 0.5 * ot_bb


def softmax(theta):
    z = np.exp(theta - theta.max())
    return z / z.sum()


def objective(theta, corpus, safe, harmful, lam=0.5, eps=0.1, loss="transport", tau=0.0):
    """J(theta) and its (pull, push) terms, from the definitions."""
    w = softmax(np.asarray(theta, dtype=np.float64))
    n = w.size
    terms = []
    for ref in (safe, harmful):
        m = ref.shape[0]
        b = np.full(m, 1.0 / m)
        C = cosine_cost(corpus, ref)
        if loss == "transport":
            terms.append(transport_cost(C, w, b, eps))
        elif loss == "regularized":
            terms.append(regularized_ot(C, w, b, eps))
        else:
            terms.append(sinkhorn_divergence(C, cosine_cost(corpus, corpus), cosine_cost(ref, ref), w, b, eps))
    pull, push = terms
    value = (1 - lam) * pull - lam * push + tau * float(np.sum(w * np.log(n * w)))
    return value, pull, push


def finite_difference_grad(fun, theta, h=1e-5):
    """Central differences of a scalar function of a vector."""
    theta = np.asarray(theta, dtype=np.float64)
    grad = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        grad[i] = (fun(theta + e) - fun(theta - e)) / (2 * h)
    return grad


def auroc(scores, positive):
    """P(score of a positive > score of a negative), ties counted 1/2 (Mann-Whitney)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (pos.size * neg.size)
