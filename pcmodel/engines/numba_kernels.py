"""The numba kernels of pcmodel.engines.numba_quadratic, compiled on first use and cached on disk.

Imported only where numba is installed and the backend runs (importing numba takes ~0.5 s).
"""

import numpy as np
from numba import njit

jit = njit(cache=True, fastmath={"contract"}, nogil=True, boundscheck=False)  # contract: a*b + c may be one FMA


@jit
def one(v, m, o):  # pragma: no cover - compiled
    """o = v @ m for one row, summed over k in order, four k per pass."""
    n, total = m.shape[1], m.shape[0]
    for j in range(n):
        o[j] = 0.0
    k = 0
    while k + 4 <= total:
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
        for j in range(n):
            o[j] = (((o[j] + v0 * m0[j]) + v1 * m1[j]) + v2 * m2[j]) + v3 * m3[j]
        k += 4
    while k < total:
        v0, m0 = v[k], m[k]
        for j in range(n):
            o[j] = o[j] + v0 * m0[j]
        k += 1


@jit
def four(a, b, c, d, m, oa, ob, oc, od):  # pragma: no cover - compiled
    """`one` for four rows at once: each row's expression exactly as alone; each row of m loaded once."""
    n, total = m.shape[1], m.shape[0]
    for j in range(n):
        oa[j] = 0.0
        ob[j] = 0.0
        oc[j] = 0.0
        od[j] = 0.0
    k = 0
    while k + 4 <= total:
        m0, m1, m2, m3 = m[k], m[k + 1], m[k + 2], m[k + 3]
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        c0, c1, c2, c3 = c[k], c[k + 1], c[k + 2], c[k + 3]
        d0, d1, d2, d3 = d[k], d[k + 1], d[k + 2], d[k + 3]
        for j in range(n):
            x0, x1, x2, x3 = m0[j], m1[j], m2[j], m3[j]
            oa[j] = (((oa[j] + a0 * x0) + a1 * x1) + a2 * x2) + a3 * x3
            ob[j] = (((ob[j] + b0 * x0) + b1 * x1) + b2 * x2) + b3 * x3
            oc[j] = (((oc[j] + c0 * x0) + c1 * x1) + c2 * x2) + c3 * x3
            od[j] = (((od[j] + d0 * x0) + d1 * x1) + d2 * x2) + d3 * x3
        k += 4
    while k < total:
        m0 = m[k]
        a0, b0, c0, d0 = a[k], b[k], c[k], d[k]
        for j in range(n):
            oa[j] = oa[j] + a0 * m0[j]
            ob[j] = ob[j] + b0 * m0[j]
            oc[j] = oc[j] + c0 * m0[j]
            od[j] = od[j] + d0 * m0[j]
        k += 1


@jit
def matmul_rows(a, m, out, lo, hi):  # pragma: no cover - compiled
    """out[b] = a[b] @ m for rows lo..hi-1."""
    b = lo
    while b + 4 <= hi:
        four(a[b], a[b + 1], a[b + 2], a[b + 3], m, out[b], out[b + 1], out[b + 2], out[b + 3])
        b += 4
    while b < hi:
        one(a[b], m, out[b])
        b += 1


@jit
def steps_rows(m, c, qinv, has_cauchy, count, last, states, drives, lo, hi):  # pragma: no cover - compiled
    """`count` steps of the recurrence for rows lo..hi-1 from states[0]: drives[t] = c + states[t] M, then
    states[t + 1] from both; with `last` the final drive is step T's and no state follows it."""
    n = m.shape[0]
    for t in range(count):
        matmul_rows(states[t], m, drives[t], lo, hi)
        for b in range(lo, hi):
            z, cb = drives[t, b], c[b]
            for j in range(n):
                z[j] = cb[j] + z[j]
        if last and t == count - 1:
            break
        for b in range(lo, hi):
            s, z, nxt = states[t, b], drives[t, b], states[t + 1, b]
            if has_cauchy:
                for j in range(n):
                    nxt[j] = z[j] - s[j] / (qinv[j] + s[j] * s[j])
            else:
                for j in range(n):
                    nxt[j] = z[j]


@jit
def energy_rows(states, drives, c, weight, logs, alpha, base, has_cauchy, out, lo, hi):  # pragma: no cover
    """out[t, b] = base[b] + sum_i weight_i s_i (s_i - z_i - c_i) [+ sum_i alpha_i logs_i], in a fixed order.

    8 partial sums (i mod 8), added in a fixed order at the end: the same operations for every image.
    """
    n = states.shape[2]
    part = np.empty(8, dtype=states.dtype)
    for b in range(lo, hi):
        cb = c[b]
        for t in range(states.shape[0]):
            s = states[t, b]
            z = drives[t, b]
            part[:] = 0.0
            for i in range(n):
                term = weight[i] * (s[i] * (s[i] - z[i] - cb[i]))
                if has_cauchy:
                    term = term + alpha[i] * logs[t, b, i]
                part[i % 8] += term
            total = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))
            out[t, b] = base[b] + total


@jit
def gather_rows(a, source, weight, out, lo, hi):  # pragma: no cover - compiled
    """out[b, j] = a[b, source[j]] * weight[j] for rows lo..hi-1 (a target map with one entry per column)."""
    for b in range(lo, hi):
        row, o = a[b], out[b]
        for j in range(source.shape[0]):
            o[j] = row[source[j]] * weight[j]
