"""The numba kernels of pcmodel.engines.numba_quadratic, compiled on first use and cached on disk.

Imported only where numba is installed and the backend runs (importing numba takes ~0.5 s).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, register_model
from numba.np.arrayobj import make_array

jit = njit(cache=True, fastmath={"contract"}, nogil=True, boundscheck=False)  # contract: a*b + c may be one FMA
inlined = njit(cache=True, fastmath={"contract"}, nogil=True, boundscheck=False, inline="always")  # into its caller

# The step kernel's blocks of 16 float32 (one 512-bit register; LLVM splits it in two 256-bit halves where
# the CPU has no AVX-512): numba has no vector type, so one is declared here with the few operations the
# kernel needs, each one LLVM instruction. The products are explicit FMAs (llvm.fma: one rounding), so an
# element's arithmetic is what the IR says, whatever LLVM's contraction and whichever kernel computes it.
W = 16  # floats per block
BLOCK = 2 * W  # the step kernel's columns per block; n is padded to a multiple of it


class F32x16Type(types.Type):
    def __init__(self) -> None:
        super().__init__(name="F32x16")


f32x16 = F32x16Type()
_VEC = ir.VectorType(ir.FloatType(), W)


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:  # type: ignore[no-untyped-def]
        super().__init__(dmm, fe_type, _VEC)


class F64x16Type(types.Type):
    def __init__(self) -> None:
        super().__init__(name="F64x16")


f64x16 = F64x16Type()  # the prior's energy: 16 products in float64 (`vfactors`, `vlogparts`)
_DVEC = ir.VectorType(ir.DoubleType(), W)
_LVEC = ir.VectorType(ir.IntType(64), W)


@register_model(F64x16Type)
class _F64x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:  # type: ignore[no-untyped-def]
        super().__init__(dmm, fe_type, _DVEC)


def _pointer(context, builder, arrty, arr, offset):  # type: ignore[no-untyped-def]
    """A <16 x float>* to the array's element `offset` (flat, C order)."""
    data = make_array(arrty)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [offset]), _VEC.as_pointer())


def _fma(builder, a, b, c):  # type: ignore[no-untyped-def]
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC] * 3), "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


@intrinsic
def vzero(typingctx):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return ir.Constant(_VEC, None)

    return f32x16(), codegen


@intrinsic
def vload(typingctx, arr, offset):  # type: ignore[no-untyped-def]
    """arr's 16 elements from the flat index `offset`."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.load(_pointer(context, builder, sig.args[0], args[0], args[1]), align=4)

    return f32x16(arr, offset), codegen


@intrinsic
def vstore(typingctx, arr, offset, v):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()

    return types.none(arr, offset, v), codegen


@intrinsic
def vfma(typingctx, x, v, acc):  # type: ignore[no-untyped-def]
    """acc + x v, one rounding per element (x a float32, broadcast)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        one = builder.insert_element(ir.Constant(_VEC, ir.Undefined), args[0], ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), W), None)
        return _fma(builder, builder.shuffle_vector(one, ir.Constant(_VEC, ir.Undefined), zeros), args[1], args[2])

    return f32x16(types.float32, v, acc), codegen


@intrinsic
def vnext(typingctx, z, s, q):  # type: ignore[no-untyped-def]
    """z - s / fma(s, s, q): the plain step's next state from its drive z, each operation rounded once."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        z, s, q = args
        return builder.fsub(z, builder.fdiv(s, _fma(builder, s, s, q)))

    return f32x16(z, s, q), codegen


@intrinsic
def vones64(typingctx):  # type: ignore[no-untyped-def]
    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return ir.Constant(_DVEC, [1.0] * W)

    return f64x16(), codegen


@intrinsic
def vfactors(typingctx, acc, s, a):  # type: ignore[no-untyped-def]
    """acc (1 + a s^2) per lane in float64 (s, a: float32 blocks, widened exactly; s^2 is then exact)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        acc, s, a = args
        s, a = builder.fpext(s, _DVEC), builder.fpext(a, _DVEC)
        factor = builder.fadd(ir.Constant(_DVEC, [1.0] * W), builder.fmul(a, builder.fmul(s, s)))
        return builder.fmul(acc, factor)

    return f64x16(acc, s, a), codegen


@intrinsic
def vlogparts(typingctx, acc):  # type: ignore[no-untyped-def]
    """(m, e, bad): the 16 lanes' product as m 2^e, m the product of their mantissas in [1/2, 1) in a fixed
    order (halves multiplied lane by lane), e the sum of their exponents; bad where a lane is inf or NaN.
    Lanes are products of factors >= 1: normal numbers, so the mantissa and exponent are the bit fields."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        bits = builder.bitcast(args[0], _LVEC)
        i64 = ir.IntType(64)
        field = builder.and_(builder.lshr(bits, ir.Constant(_LVEC, [52] * W)), ir.Constant(_LVEC, [0x7FF] * W))
        half = builder.or_(
            builder.and_(bits, ir.Constant(_LVEC, [(1 << 52) - 1] * W)), ir.Constant(_LVEC, [1022 << 52] * W)
        )
        m = builder.bitcast(half, _DVEC)
        width = W
        while width > 1:
            width //= 2
            mask = ir.VectorType(ir.IntType(32), width)
            low = builder.shuffle_vector(m, m, ir.Constant(mask, list(range(width))))
            high = builder.shuffle_vector(m, m, ir.Constant(mask, list(range(width, 2 * width))))
            m = builder.fmul(low, high)
        mantissa = builder.extract_element(m, ir.Constant(ir.IntType(32), 0))
        add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [_LVEC]), "llvm.vector.reduce.add.v16i64"
        )
        exponent = builder.add(builder.call(add, [field]), ir.Constant(i64, -1022 * W))
        flags = builder.icmp_unsigned("==", field, ir.Constant(_LVEC, [0x7FF] * W))
        bad = builder.icmp_unsigned("!=", builder.bitcast(flags, ir.IntType(W)), ir.Constant(ir.IntType(W), 0))
        return context.make_tuple(builder, sig.return_type, [mantissa, exponent, bad])

    return types.Tuple((types.float64, types.int64, types.boolean))(acc), codegen


@jit
def one(v, m, spans, o):  # pragma: no cover - compiled
    """o = v @ m for one row, summed over k in order, four k per pass; pass g (rows 4g..4g+3 of m, the
    last pass the rows left) touches only columns spans[g, 0]..spans[g, 1]-1, outside which those rows of m
    are zero (`matmul_spans`): skipping exact zeros leaves every sum as it is (the maps are block-sparse:
    a module's causes predict its own patch). The columns are sliced so that loops start at 0 (numba then
    knows the index is not negative and vectorises)."""
    n, total = m.shape[1], m.shape[0]
    for j in range(n):
        o[j] = 0.0
    k = 0
    while k + 4 <= total:
        j0, j1 = spans[k // 4, 0], spans[k // 4, 1]
        v0, v1, v2, v3 = v[k], v[k + 1], v[k + 2], v[k + 3]
        m0, m1, m2, m3 = m[k, j0:j1], m[k + 1, j0:j1], m[k + 2, j0:j1], m[k + 3, j0:j1]
        oo = o[j0:j1]
        for j in range(j1 - j0):
            oo[j] = (((oo[j] + v0 * m0[j]) + v1 * m1[j]) + v2 * m2[j]) + v3 * m3[j]
        k += 4
    while k < total:
        j0, j1 = spans[k // 4, 0], spans[k // 4, 1]
        v0, m0, oo = v[k], m[k, j0:j1], o[j0:j1]
        for j in range(j1 - j0):
            oo[j] = oo[j] + v0 * m0[j]
        k += 1


@jit
def four(a, b, c, d, m, spans, oa, ob, oc, od):  # pragma: no cover - compiled
    """`one` for four rows at once: each row's expression exactly as alone; each row of m loaded once."""
    n, total = m.shape[1], m.shape[0]
    for j in range(n):
        oa[j] = 0.0
        ob[j] = 0.0
        oc[j] = 0.0
        od[j] = 0.0
    k = 0
    while k + 4 <= total:
        j0, j1 = spans[k // 4, 0], spans[k // 4, 1]
        m0, m1, m2, m3 = m[k, j0:j1], m[k + 1, j0:j1], m[k + 2, j0:j1], m[k + 3, j0:j1]
        pa, pb, pc, pd = oa[j0:j1], ob[j0:j1], oc[j0:j1], od[j0:j1]
        a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
        b0, b1, b2, b3 = b[k], b[k + 1], b[k + 2], b[k + 3]
        c0, c1, c2, c3 = c[k], c[k + 1], c[k + 2], c[k + 3]
        d0, d1, d2, d3 = d[k], d[k + 1], d[k + 2], d[k + 3]
        for j in range(j1 - j0):
            x0, x1, x2, x3 = m0[j], m1[j], m2[j], m3[j]
            pa[j] = (((pa[j] + a0 * x0) + a1 * x1) + a2 * x2) + a3 * x3
            pb[j] = (((pb[j] + b0 * x0) + b1 * x1) + b2 * x2) + b3 * x3
            pc[j] = (((pc[j] + c0 * x0) + c1 * x1) + c2 * x2) + c3 * x3
            pd[j] = (((pd[j] + d0 * x0) + d1 * x1) + d2 * x2) + d3 * x3
        k += 4
    while k < total:
        j0, j1 = spans[k // 4, 0], spans[k // 4, 1]
        m0 = m[k, j0:j1]
        pa, pb, pc, pd = oa[j0:j1], ob[j0:j1], oc[j0:j1], od[j0:j1]
        a0, b0, c0, d0 = a[k], b[k], c[k], d[k]
        for j in range(j1 - j0):
            pa[j] = pa[j] + a0 * m0[j]
            pb[j] = pb[j] + b0 * m0[j]
            pc[j] = pc[j] + c0 * m0[j]
            pd[j] = pd[j] + d0 * m0[j]
        k += 1


@jit
def matmul_rows(a, m, spans, out, lo, hi):  # pragma: no cover - compiled
    """out[b] = a[b] @ m for rows lo..hi-1 (`one`'s spans)."""
    _matmul_at(a, 0, m, spans, out, 0, lo, hi)


@jit
def _matmul_at(a, a0, m, spans, out, o0, lo, hi):  # pragma: no cover - compiled
    """out[b, o0:o0 + w] = a[b, a0:a0 + k] @ m for rows lo..hi-1 (m: k x w), four rows at a time (`four`),
    the rest one by one (`one`): the same bits either way.

    Row slices of C arrays stay contiguous to numba (a[:, a0:a1] would not: no SIMD, ~4x slower)."""
    k, w = m.shape
    b = lo
    while b + 4 <= hi:
        a_ = (a[b, a0 : a0 + k], a[b + 1, a0 : a0 + k], a[b + 2, a0 : a0 + k], a[b + 3, a0 : a0 + k])
        o_ = (out[b, o0 : o0 + w], out[b + 1, o0 : o0 + w], out[b + 2, o0 : o0 + w], out[b + 3, o0 : o0 + w])
        four(a_[0], a_[1], a_[2], a_[3], m, spans, o_[0], o_[1], o_[2], o_[3])
        b += 4
    while b < hi:
        one(a[b, a0 : a0 + k], m, spans, out[b, o0 : o0 + w])
        b += 1


def _binary(op):  # type: ignore[no-untyped-def]
    """An intrinsic for one elementwise LLVM instruction on two blocks."""

    @intrinsic
    def vop(typingctx, a, b):  # type: ignore[no-untyped-def]
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return getattr(builder, op)(*args)

        return f32x16(a, b), codegen

    return vop


vadd, vsub, vmul = _binary("fadd"), _binary("fsub"), _binary("fmul")


@intrinsic
def vfmav(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a b + c, one rounding per element."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return _fma(builder, *args)

    return f32x16(a, b, c), codegen


@intrinsic
def vsum(typingctx, v):  # type: ignore[no-untyped-def]
    """The 16 lanes summed in one fixed order: halves added lane by lane, four times."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        v, width = args[0], W
        while width > 1:
            width //= 2
            mask = ir.VectorType(ir.IntType(32), width)
            low = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(width))))
            high = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(width, 2 * width))))
            v = builder.fadd(low, high)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return types.float32(v), codegen


@jit
def _drive(c, z, b, j, n, acc):  # pragma: no cover - compiled
    """Row b, columns j..j+15 of a step's drive from its product acc: z = c + acc."""
    o = b * n + j
    vstore(z, o, vadd(vload(c, o), acc))


@jit
def _advance(s, z, q, following, vel, beta, mode, mult, lo, hi):  # pragma: no cover - compiled
    """Rows lo..hi-1 of the next state from their drives z: the plain step's u = z - s / (q + s^2), lengthened
    per level where `mult` (per column; empty: none) is given (u = s + mult (u - s), as Solver.advance), kept
    (mode 0) or moved by the solver in the velocity form of pcmodel.solvers (d = u - s, v = beta v + d; mode 1 heavy
    ball s + v, mode 2 Nesterov u + beta v; Solver.advance computes the same as two-term recurrences), v kept
    in `vel` (rows like s).

    Apart from the product so that the register-blocked kernels carry no branch on the solver (one there
    cost ~40% of the steps at B = 32); the rows are in L1 here.
    """
    n = s.shape[1]
    bv = vload(beta, 0)
    scaled = mult.shape[0] > 0
    for b in range(lo, hi):
        for j in range(0, n, W):
            o = b * n + j
            sv = vload(s, o)
            nxt = vnext(vload(z, o), sv, vload(q, j))
            if scaled:
                nxt = vadd(vmul(vsub(nxt, sv), vload(mult, j)), sv)
            if mode == 0:
                vstore(following, o, nxt)
            else:
                v = vfmav(bv, vload(vel, o), vsub(nxt, sv))
                vstore(vel, o, v)
                vstore(following, o, vadd(sv, v) if mode == 1 else vfmav(bv, v, nxt))


RIDGE, TINY = 1e-3, 1e-30  # pcmodel.solvers.RIDGE and TINY (a compiled kernel reads module constants)


@jit
def _mix(s, u, hist, gram, metric, t, lo, hi):  # pragma: no cover - compiled
    """Anderson (pcmodel.solvers.Solver._anderson) for rows lo..hi-1 at step t: u (the plain step's result)
    replaced by u - sum_j gamma_j du_j over the last k = min(t, m) differences, gamma solving
    (A + lambda I) gamma = b with A_ij = <df_i, df_j>, b_i = <df_i, f> (f = u - s; the inner product
    `metric`: scale^2, r-space's) and lambda = RIDGE tr(A) + TINY.

    hist ((2 + 2 m) batch rows, n): the previous u and f (slots 0, 1), then the differences du (slots 2..m+1)
    and df (m+2..2m+1), difference d (made at step d + 1) in slot d mod m; gram (batch, m, 2 m + 2): each
    row's Gram matrix of the held df by slot (float64, one new row a step) and the scratch of its system
    [A + lambda I | b], solved by Gauss-Jordan elimination without pivoting in float64 (symmetric positive
    definite), oldest difference first, as the ONNX graph does.
    """
    n = s.shape[1]
    batch = s.shape[0]
    m = gram.shape[1]
    for b in range(lo, hi):
        last_u, last_f = b * n, (batch + b) * n
        if t == 0:
            for j in range(0, n, W):
                uv = vload(u, b * n + j)
                vstore(hist, last_u + j, uv)
                vstore(hist, last_f + j, vsub(uv, vload(s, b * n + j)))
            continue  # the plain step
        slot = (t - 1) % m
        du, df = ((2 + slot) * batch + b) * n, ((2 + m + slot) * batch + b) * n
        for j in range(0, n, W):
            uv = vload(u, b * n + j)
            fv = vsub(uv, vload(s, b * n + j))
            vstore(hist, du + j, vsub(uv, vload(hist, last_u + j)))
            vstore(hist, df + j, vsub(fv, vload(hist, last_f + j)))
            vstore(hist, last_u + j, uv)
            vstore(hist, last_f + j, fv)
        k = min(t, m)
        a = gram[b, :, m:]
        for p in range(k):
            held = ((2 + m + (t - k + p) % m) * batch + b) * n
            pair, rhs = vzero(), vzero()
            for j in range(0, n, W):
                weighted = vmul(vload(metric, j), vload(hist, held + j))
                pair = vfmav(weighted, vload(hist, df + j), pair)
                rhs = vfmav(weighted, vload(hist, last_f + j), rhs)
            gram[b, slot, (t - k + p) % m] = gram[b, (t - k + p) % m, slot] = np.float64(vsum(pair))
            a[p, k] = np.float64(vsum(rhs))
        trace = 0.0
        for p in range(k):
            trace += gram[b, (t - k + p) % m, (t - k + p) % m]
        lam = trace * RIDGE + TINY
        for p in range(k):
            for q in range(k):
                a[p, q] = gram[b, (t - k + p) % m, (t - k + q) % m]
            a[p, p] += lam
        for p in range(k):
            pivot = a[p, p]
            for col in range(k + 1):
                a[p, col] /= pivot
            for i in range(k):
                if i != p:
                    factor = a[i, p]
                    for col in range(k + 1):
                        a[i, col] -= factor * a[p, col]
        for j in range(0, n, W):
            acc = vload(u, b * n + j)
            for p in range(k):
                acc = vfma(np.float32(-a[p, k]), vload(hist, ((2 + (t - k + p) % m) * batch + b) * n + j), acc)
            vstore(u, b * n + j, acc)


@jit
def _rows8(s, m, c, z, b, j, runs, first, count):  # pragma: no cover - compiled
    """Rows b..b+7, columns j..j+31 of one step, the 16 blocks of the product held in registers over all k.

    Each element is fma(s[r, k], m[k, j'], acc) for k = 0, 1, ... from acc = 0, exactly as in `_row64` and
    `_row32`: the same bits whichever kernel (and so whatever batch) computes a row. (`_rows8_pair` with no
    second product.)
    """
    _rows8_pair(s, m, runs, first, count, s, m, runs, 0, 0, c, z, b, j)


@jit
def _rows8_pair(s, m, runs, first, count, t, r, rruns, rfirst, rcount, c, z, b, j):  # pragma: no cover
    """Rows b..b+7, columns j..j+31 of z = c + s m + t r, the 16 blocks held in registers over all k of both
    products (each over its runs of rows not all zero, `step_runs`; s m's terms first)."""
    n = m.shape[1]
    a00 = vzero()
    a01 = vzero()
    a10 = vzero()
    a11 = vzero()
    a20 = vzero()
    a21 = vzero()
    a30 = vzero()
    a31 = vzero()
    a40 = vzero()
    a41 = vzero()
    a50 = vzero()
    a51 = vzero()
    a60 = vzero()
    a61 = vzero()
    a70 = vzero()
    a71 = vzero()
    for i in range(first, first + count):
        for k in range(runs[i, 0], runs[i, 1]):
            m0 = vload(m, k * n + j)
            m1 = vload(m, k * n + j + W)
            x = s[b, k]
            a00 = vfma(x, m0, a00)
            a01 = vfma(x, m1, a01)
            x = s[b + 1, k]
            a10 = vfma(x, m0, a10)
            a11 = vfma(x, m1, a11)
            x = s[b + 2, k]
            a20 = vfma(x, m0, a20)
            a21 = vfma(x, m1, a21)
            x = s[b + 3, k]
            a30 = vfma(x, m0, a30)
            a31 = vfma(x, m1, a31)
            x = s[b + 4, k]
            a40 = vfma(x, m0, a40)
            a41 = vfma(x, m1, a41)
            x = s[b + 5, k]
            a50 = vfma(x, m0, a50)
            a51 = vfma(x, m1, a51)
            x = s[b + 6, k]
            a60 = vfma(x, m0, a60)
            a61 = vfma(x, m1, a61)
            x = s[b + 7, k]
            a70 = vfma(x, m0, a70)
            a71 = vfma(x, m1, a71)
    for i in range(rfirst, rfirst + rcount):
        for k in range(rruns[i, 0], rruns[i, 1]):
            m0 = vload(r, k * n + j)
            m1 = vload(r, k * n + j + W)
            x = t[b, k]
            a00 = vfma(x, m0, a00)
            a01 = vfma(x, m1, a01)
            x = t[b + 1, k]
            a10 = vfma(x, m0, a10)
            a11 = vfma(x, m1, a11)
            x = t[b + 2, k]
            a20 = vfma(x, m0, a20)
            a21 = vfma(x, m1, a21)
            x = t[b + 3, k]
            a30 = vfma(x, m0, a30)
            a31 = vfma(x, m1, a31)
            x = t[b + 4, k]
            a40 = vfma(x, m0, a40)
            a41 = vfma(x, m1, a41)
            x = t[b + 5, k]
            a50 = vfma(x, m0, a50)
            a51 = vfma(x, m1, a51)
            x = t[b + 6, k]
            a60 = vfma(x, m0, a60)
            a61 = vfma(x, m1, a61)
            x = t[b + 7, k]
            a70 = vfma(x, m0, a70)
            a71 = vfma(x, m1, a71)
    _drive(c, z, b, j, n, a00)
    _drive(c, z, b, j + W, n, a01)
    _drive(c, z, b + 1, j, n, a10)
    _drive(c, z, b + 1, j + W, n, a11)
    _drive(c, z, b + 2, j, n, a20)
    _drive(c, z, b + 2, j + W, n, a21)
    _drive(c, z, b + 3, j, n, a30)
    _drive(c, z, b + 3, j + W, n, a31)
    _drive(c, z, b + 4, j, n, a40)
    _drive(c, z, b + 4, j + W, n, a41)
    _drive(c, z, b + 5, j, n, a50)
    _drive(c, z, b + 5, j + W, n, a51)
    _drive(c, z, b + 6, j, n, a60)
    _drive(c, z, b + 6, j + W, n, a61)
    _drive(c, z, b + 7, j, n, a70)
    _drive(c, z, b + 7, j + W, n, a71)


@jit
def _row128(s, m, c, z, b, j, runs, first, count):  # pragma: no cover - compiled
    """Row b, columns j..j+127 of one step (each element as in `_rows8`): eight blocks in registers, so each
    pass streams 512 contiguous bytes of M per k (a single row is bound by reading M from L2)."""
    n = m.shape[1]
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    a4 = vzero()
    a5 = vzero()
    a6 = vzero()
    a7 = vzero()
    for r in range(first, first + count):  # the runs of rows of M not all zero here (`step_runs`)
        for k in range(runs[r, 0], runs[r, 1]):
            x = s[b, k]
            o = k * n + j
            a0 = vfma(x, vload(m, o), a0)
            a1 = vfma(x, vload(m, o + W), a1)
            a2 = vfma(x, vload(m, o + 2 * W), a2)
            a3 = vfma(x, vload(m, o + 3 * W), a3)
            a4 = vfma(x, vload(m, o + 4 * W), a4)
            a5 = vfma(x, vload(m, o + 5 * W), a5)
            a6 = vfma(x, vload(m, o + 6 * W), a6)
            a7 = vfma(x, vload(m, o + 7 * W), a7)
    _drive(c, z, b, j, n, a0)
    _drive(c, z, b, j + W, n, a1)
    _drive(c, z, b, j + 2 * W, n, a2)
    _drive(c, z, b, j + 3 * W, n, a3)
    _drive(c, z, b, j + 4 * W, n, a4)
    _drive(c, z, b, j + 5 * W, n, a5)
    _drive(c, z, b, j + 6 * W, n, a6)
    _drive(c, z, b, j + 7 * W, n, a7)


@jit
def _row64(s, m, c, z, b, j, runs, first, count):  # pragma: no cover - compiled
    """Row b, columns j..j+63 of one step (each element as in `_rows8`)."""
    n = m.shape[1]
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    for r in range(first, first + count):  # the runs of rows of M not all zero here (`step_runs`)
        for k in range(runs[r, 0], runs[r, 1]):
            x = s[b, k]
            o = k * n + j
            a0 = vfma(x, vload(m, o), a0)
            a1 = vfma(x, vload(m, o + W), a1)
            a2 = vfma(x, vload(m, o + 2 * W), a2)
            a3 = vfma(x, vload(m, o + 3 * W), a3)
    _drive(c, z, b, j, n, a0)
    _drive(c, z, b, j + W, n, a1)
    _drive(c, z, b, j + 2 * W, n, a2)
    _drive(c, z, b, j + 3 * W, n, a3)


@jit
def _row32(s, m, c, z, b, j, runs, first, count):  # pragma: no cover - compiled
    """Row b, columns j..j+31 of one step (each element as in `_rows8`)."""
    n = m.shape[1]
    a0 = vzero()
    a1 = vzero()
    for r in range(first, first + count):  # the runs of rows of M not all zero here (`step_runs`)
        for k in range(runs[r, 0], runs[r, 1]):
            x = s[b, k]
            o = k * n + j
            a0 = vfma(x, vload(m, o), a0)
            a1 = vfma(x, vload(m, o + W), a1)
    _drive(c, z, b, j, n, a0)
    _drive(c, z, b, j + W, n, a1)


@inlined
def _product_pair(s, m, runs, blocks, t, r, rruns, rblocks, c, z, b, rows):  # pragma: no cover - compiled
    """Rows b..b+7 of z = c + s m + t r, per block of BLOCK columns."""
    for j in range(0, m.shape[1], BLOCK):
        jb = j // BLOCK
        _rows8_pair(s, m, runs, blocks[jb, 0], blocks[jb, 1], t, r, rruns, rblocks[jb, 0], rblocks[jb, 1], c, z, b, j)


@inlined
def _product_nonzero(s, m, c, z, b, rows, runs, blocks):  # pragma: no cover - compiled
    """Rows b..b+7 of z = c + s m in the blocks of BLOCK columns where m has rows not all zero; the others of z
    are left as they are."""
    for j in range(0, m.shape[1], BLOCK):
        first, count = blocks[j // BLOCK, 0], blocks[j // BLOCK, 1]
        if count > 0:
            _rows8(s, m, c, z, b, j, runs, first, count)


@inlined
def _product(s, m, c, z, b, rows, runs, blocks, singles):  # pragma: no cover - compiled
    """Rows b..b+rows-1 (rows 8 or 1) of z = c + s m, m read only in its runs of rows not all zero: the
    eight-row kernel per block of BLOCK columns, or the one-row kernels as `singles` says."""
    n = m.shape[1]
    if rows == 8:
        for j in range(0, n, BLOCK):
            _rows8(s, m, c, z, b, j, runs, blocks[j // BLOCK, 0], blocks[j // BLOCK, 1])
    else:
        for i in range(singles.shape[0]):
            width, j, first, many = singles[i, 0], singles[i, 1], singles[i, 2], singles[i, 3]
            if width == 4:
                _row128(s, m, c, z, b, j, runs, first, many)
            elif width == 2:
                _row64(s, m, c, z, b, j, runs, first, many)
            else:
                _row32(s, m, c, z, b, j, runs, first, many)


@jit
def _scaled_add(out, d, x, y, lo, hi):  # pragma: no cover - compiled
    """out = out + y + d x for rows lo..hi-1 (y may be out's zeros: `zero`), each one rounding per operation."""
    n = out.shape[1]
    for b in range(lo, hi):
        for j in range(0, n, W):
            o = b * n + j
            vstore(out, o, vfmav(vload(d, j), vload(x, o), vadd(vload(out, o), vload(y, o))))


@jit
def steps_rows(
    m, runs, blocks, singles, c, qinv, count, last, states, drives, vel, beta, mode, gram, mult, metric, t0, lo, hi
):  # pragma: no cover
    """`count` steps of the recurrence for rows lo..hi-1 from states[0]: drives[t] = c + states[t] M, then
    states[t + 1] = drives[t] - states[t] / (qinv + states[t]^2); with `last` the final drive is step T's
    and no state follows it; `mode`, `vel`, `beta` (16 copies of beta) and `mult`: the solver (`_advance`;
    mode 3: `_mix` after the plain step, vel its history, gram its systems, metric its inner product; t0 the
    step number of states[0]).
    m (k, n): k the latents, n their count padded to a multiple of BLOCK with zero columns (c, qinv, states
    and drives padded alike: c 0, qinv inf, so the padding stays 0).

    Rows in blocks of eight (`_rows8`, per block of BLOCK columns), the rest one by one (`_row128`,
    `_row64`, `_row32` as `singles` says: rows (columns in blocks, first column, first run, runs)): the same
    bits either way. Each kernel reads only the runs of rows of M that are not all zero in its columns
    (`runs`; `blocks`: (first run, runs) per block of columns): an exact zero skipped leaves the sum as it is.
    """
    for step_index in range(count):
        step = not (last and step_index == count - 1)
        s, z = states[step_index], drives[step_index]
        b = lo
        while b < hi:
            rows = 8 if b + 8 <= hi else 1
            _product(s, m, c, z, b, rows, runs, blocks, singles)
            if step:
                _advance(s, z, qinv, states[step_index + 1], vel, beta, mode if mode < 3 else 0, mult, b, b + rows)
                if mode == 3:
                    _mix(s, states[step_index + 1], vel, gram, metric, t0 + step_index, b, b + rows)
            b += rows


@jit
def factored_steps_rows(
    m,
    runs,
    blocks,
    singles,
    c,
    qinv,
    count,
    last,
    states,
    drives,
    vel,
    beta,
    mode,
    gram,
    mult,
    left,
    lruns,
    lblocks,
    lsingles,
    right,
    rruns,
    rblocks,
    rsingles,
    d_left,
    d_right,
    t,
    zero,
    metric,
    t0,
    lo,
    hi,
):  # pragma: no cover
    """`steps_rows` with M = I + m + (diag(d_left) + left)(diag(d_right) + right) (numba_quadratic.factored_step):
    a step is t = s left + d_left s, z = c + s m + t right, z += s + d_right t (t and zero: work rows like the
    states, t's columns where left has no rows staying 0; zero all zeros), each product reading only its
    matrix's runs of rows not all zero, in blocks of BLOCK columns (single rows too: `_row32`)."""
    for step_index in range(count):
        step = not (last and step_index == count - 1)
        s, z = states[step_index], drives[step_index]
        b = lo
        while b < hi:
            rows = 8 if b + 8 <= hi else 1
            if rows == 8:  # compute-bound: each block of z in one pass over both products
                _product_nonzero(s, left, zero, t, b, rows, lruns, lblocks)  # t's other columns stay 0
                _scaled_add(t, d_left, s, zero, b, b + rows)
                _product_pair(s, m, runs, blocks, t, right, rruns, rblocks, c, z, b, rows)
            else:  # bound by reading the matrices: the wide one-row kernels, one product at a time
                _product(s, left, zero, t, b, rows, lruns, lblocks, lsingles)
                _scaled_add(t, d_left, s, zero, b, b + rows)
                _product(s, m, c, z, b, rows, runs, blocks, singles)
                _product(t, right, z, z, b, rows, rruns, rblocks, rsingles)
            _scaled_add(z, d_right, t, s, b, b + rows)
            if step:
                _advance(s, z, qinv, states[step_index + 1], vel, beta, mode if mode < 3 else 0, mult, b, b + rows)
                if mode == 3:
                    _mix(s, states[step_index + 1], vel, gram, metric, t0 + step_index, b, b + rows)
            b += rows


LN2 = math.log(2.0)


@jit
def _log_product(s, o, scale2, lo, hi):  # pragma: no cover - compiled
    """sum of log(1 + scale2_i s_i^2) over i in lo..hi-1 of the row at flat offset o, in float64, as the log
    of a product: 16 lanes multiply their factors (each >= 1) in order (`vfactors`), the lanes are combined
    as mantissas and exponents in a fixed order (`vlogparts`), the tail (fewer than 16) in one product,
    and one or two logs taken. One log per row and step instead of one log1p per entry (numpy's log1p was
    ~0.5 ms of 4.3 at B = 32); every image's arithmetic is the same whatever the batch. Where a product
    overflows (|s| past ~1e19), the entries' log1p are summed instead. (Float32 lanes were tried: 49
    against 60 ns a row and step, not worth their 1e-6.)
    """
    acc = vones64()
    i = lo
    while i + W <= hi:
        acc = vfactors(acc, vload(s, o + i), vload(scale2, i))
        i += W
    mantissa, exponent, bad = vlogparts(acc)
    tail = 1.0
    while i < hi:
        v = np.float64(s.flat[o + i])
        tail *= 1.0 + np.float64(scale2[i]) * (v * v)
        i += 1
    if bad or not tail < math.inf:  # the plain sum, by the same rule for every row
        total = 0.0
        for k in range(lo, hi):
            v = np.float64(s.flat[o + k])
            total += math.log1p(np.float64(scale2[k]) * (v * v))
        return total
    total = math.log(mantissa) + exponent * LN2
    return total + math.log(tail) if tail != 1.0 else total


@jit
def energy_rows(states, drives, c, weight, scale2, segments, base, out, lo, hi):  # pragma: no cover - compiled
    """out[t, b] = base[b] + sum_i weight_i s_i (s_i - z_i - c_i) + sum_i alpha_i log(1 + scale2_i s_i^2).

    The quadratic part: lane i mod 16 of a block sums its terms over i in order, then `vsum` adds the 16
    lanes in a fixed order. The prior's part: per run of latents sharing one alpha (`segments`: rows of
    start, end, alpha; none without a Cauchy prior), `_log_product`, in float64. The same operations for
    every image. The latents are padded to a multiple of 16 (`steps_rows`); weight is padded with zeros
    (c is not: it has the latents only, read up to n).
    """
    n = states.shape[2]
    for b in range(lo, hi):
        for t in range(states.shape[0]):
            st, zt = states[t], drives[t]
            acc = vzero()
            for i in range(0, n, W):
                o = b * n + i
                sv = vload(st, o)
                acc = vadd(acc, vmul(vload(weight, i), vmul(sv, vsub(vsub(sv, vload(zt, o)), vload(c, o)))))
            total = np.float64(base[b]) + np.float64(vsum(acc))
            for k in range(segments.shape[0]):
                start, end = int(segments[k, 0]), int(segments[k, 1])
                total += segments[k, 2] * _log_product(st, b * n, scale2, start, end)
            out[t, b] = total


@jit
def program_rows(
    omega,
    const,
    m,
    runs,
    blocks,
    singles,
    order,
    qinv,
    weight,
    scale2,
    segments,
    scale,
    meta,
    pblob,
    tblob,
    sblob,
    reconstruct,
    ospans,
    rspans,
    xf,
    inputs,
    ispans,
    s0,
    steps,
    chunk,
    vel,
    beta,
    mode,
    gram,
    mult,
    factored,
    left,
    lruns,
    lblocks,
    lsingles,
    right,
    rruns,
    rblocks,
    rsingles,
    d_left,
    d_right,
    t,
    zero,
    driven,
    c,
    states,
    drives,
    squares,
    base,
    klat,
    energy,
    latent,
    predictions,
    errors,
    recon,
    lo,
    hi,
):  # pragma: no cover - compiled
    """The whole quadratic program for rows lo..hi-1 in one compiled call (numba_quadratic.run): the drive
    c = x inputs (and a feed-forward start), the energy's constant part, the T steps in chunks with each
    chunk's energy, then the outputs from the final state. One call per thread, its arguments arrays and
    numbers only (the dispatcher types a tuple in Python: ~90 us for the levels' maps as tuples).

    meta: per level (offset, the level below's offset, size, width, its predict map's start in pblob, its
    target's start in tblob, the target map's rows or 0 for a gather, the gather's start in sblob, its
    columns' start in predictions and errors, the starts of the predict and target maps' spans in sblob);
    a gather's weights are in tblob. ispans, ospans, rspans: the spans of inputs, omega and reconstruct.
    runs, blocks, singles: M's runs of rows not all zero (`steps_rows`); order: the plan's index of each
    latent of the kernels' order (level by level, a level's causes grouped by position, so that M's zeros
    between positions form blocks). s0: the given start (rows, n, the kernels' order) or an empty array;
    vel, beta, mode, gram, mult: the solver (`steps_rows`); factored .. zero: M's factors (`steps_rows`);
    driven, c, states, drives, squares, base, klat (the latents in the kernels' order, which the maps' rows are
    in: a module's rows then meet only its patch): work buffers;
    energy, latent, predictions, errors, recon: the outputs (predictions and errors of all levels side by
    side).
    """
    n = scale.shape[0]
    _matmul_at(xf, 0, inputs, ispans, driven, 0, lo, hi)  # c (and the feed-forward start's s_0)
    for b in range(lo, hi):
        for j in range(n):
            c[b, j] = driven[b, j]
            states[0, b, j] = driven[b, n + j] if inputs.shape[1] > n else (s0[b, j] if s0.shape[0] > 0 else 0.0)
        for j in range(n, c.shape[1]):  # the padding stays 0
            c[b, j] = 0.0
            states[0, b, j] = 0.0
        for k in range(xf.shape[1]):
            squares[b, k] = xf[b, k] * xf[b, k]
    _matmul_at(squares, 0, omega, ospans, base, 0, lo, hi)
    for b in range(lo, hi):
        base[b, 0] = base[b, 0] + const[0]
    for t0 in range(0, steps + 1, chunk):
        count = min(chunk, steps + 1 - t0)
        last = t0 + count == steps + 1
        solver = (vel, beta, mode, gram, mult)
        if factored:
            fac = (left, lruns, lblocks, lsingles, right, rruns, rblocks, rsingles, d_left, d_right, t, zero)
            factored_steps_rows(
                m, runs, blocks, singles, c, qinv, count, last, states, drives, *solver, *fac, scale2, t0, lo, hi
            )
        else:
            steps_rows(m, runs, blocks, singles, c, qinv, count, last, states, drives, *solver, scale2, t0, lo, hi)
        energy_rows(
            states[:count], drives[:count], c, weight, scale2, segments, base[:, 0], energy[t0 : t0 + count], lo, hi
        )
        if not last:
            for b in range(lo, hi):
                states[0, b, :] = states[count, b, :]
    final = states[steps % chunk]
    for b in range(lo, hi):
        for j in range(n):
            klat[b, j] = final[b, j] * scale[j]
            latent[b, order[j]] = klat[b, j]  # back in the plan's order
    _matmul_at(final, 0, reconstruct, rspans, recon, 0, lo, hi)
    for i in range(meta.shape[0]):
        offset, below, size, width, pstart, tstart, trows, sstart, at, pspans, tspans = meta[i]
        predict = pblob[pstart : pstart + size * width].reshape(size, width)
        spans = sblob[pspans : pspans + 2 * ((size + 3) // 4)].reshape(-1, 2)
        lower, l0 = (xf, 0) if i == 0 else (klat, below)
        _matmul_at(klat, offset, predict, spans, predictions, at, lo, hi)
        if trows == 0:  # the target a gather: one entry per column
            for b in range(lo, hi):
                for j in range(width):
                    errors[b, at + j] = lower[b, l0 + sblob[sstart + j]] * tblob[tstart + j] - predictions[b, at + j]
        else:
            target = tblob[tstart : tstart + trows * width].reshape(trows, width)
            spans = sblob[tspans : tspans + 2 * ((trows + 3) // 4)].reshape(-1, 2)
            _matmul_at(lower, l0, target, spans, errors, at, lo, hi)
            for b in range(lo, hi):
                for j in range(width):
                    errors[b, at + j] = errors[b, at + j] - predictions[b, at + j]
