"""The numba kernels of pcmodel.engines.numba_quadratic, compiled on first use and cached on disk.

Imported only where numba is installed and the backend runs (importing numba takes ~0.5 s).
"""

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic, models, register_model
from numba.np.arrayobj import make_array

jit = njit(cache=True, fastmath={"contract"}, nogil=True, boundscheck=False)  # contract: a*b + c may be one FMA

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
def vstep(typingctx, c, acc, s, q):  # type: ignore[no-untyped-def]
    """(z, z - s / fma(s, s, q)) with z = c + acc: the step's elementwise part, each operation rounded once."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        c, acc, s, q = args
        z = builder.fadd(c, acc)
        following = builder.fsub(z, builder.fdiv(s, _fma(builder, s, s, q)))
        return context.make_tuple(builder, sig.return_type, [z, following])

    return types.UniTuple(f32x16, 2)(c, acc, s, q), codegen


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
def _finish(s, c, q, z, following, b, j, n, acc, step, vel, beta, mode):  # pragma: no cover - compiled
    """Row b, columns j..j+15 of a step from its product acc: z = c + acc, and with `step` the next state:
    the plain step's u (mode 0), or u moved by the solver (pcmodel.solvers.Solver.update: d = u - s,
    v = beta v + d; mode 1 heavy ball s + v, mode 2 Nesterov u + beta v), v kept in `vel` (rows like s)."""
    o = b * n + j
    drive, nxt = vstep(vload(c, o), acc, vload(s, o), vload(q, j))
    vstore(z, o, drive)
    if step:
        if mode == 0:
            vstore(following, o, nxt)
        else:
            sv = vload(s, o)
            bv = vload(beta, 0)
            v = vfmav(bv, vload(vel, o), vsub(nxt, sv))
            vstore(vel, o, v)
            vstore(following, o, vadd(sv, v) if mode == 1 else vfmav(bv, v, nxt))


@jit
def _rows8(s, m, c, q, z, following, b, j, step, vel, beta, mode):  # pragma: no cover - compiled
    """Rows b..b+7, columns j..j+31 of one step, the 16 blocks of the product held in registers over all k.

    Each element is fma(s[r, k], m[k, j'], acc) for k = 0, 1, ... from acc = 0, exactly as in `_row64` and
    `_row32`: the same bits whichever kernel (and so whatever batch) computes a row.
    """
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
    for k in range(m.shape[0]):
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
    _finish(s, c, q, z, following, b, j, n, a00, step, vel, beta, mode)
    _finish(s, c, q, z, following, b, j + W, n, a01, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 1, j, n, a10, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 1, j + W, n, a11, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 2, j, n, a20, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 2, j + W, n, a21, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 3, j, n, a30, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 3, j + W, n, a31, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 4, j, n, a40, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 4, j + W, n, a41, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 5, j, n, a50, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 5, j + W, n, a51, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 6, j, n, a60, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 6, j + W, n, a61, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 7, j, n, a70, step, vel, beta, mode)
    _finish(s, c, q, z, following, b + 7, j + W, n, a71, step, vel, beta, mode)


@jit
def _row64(s, m, c, q, z, following, b, j, step, vel, beta, mode):  # pragma: no cover - compiled
    """Row b, columns j..j+63 of one step (each element as in `_rows8`)."""
    n = m.shape[1]
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    for k in range(m.shape[0]):
        x = s[b, k]
        o = k * n + j
        a0 = vfma(x, vload(m, o), a0)
        a1 = vfma(x, vload(m, o + W), a1)
        a2 = vfma(x, vload(m, o + 2 * W), a2)
        a3 = vfma(x, vload(m, o + 3 * W), a3)
    _finish(s, c, q, z, following, b, j, n, a0, step, vel, beta, mode)
    _finish(s, c, q, z, following, b, j + W, n, a1, step, vel, beta, mode)
    _finish(s, c, q, z, following, b, j + 2 * W, n, a2, step, vel, beta, mode)
    _finish(s, c, q, z, following, b, j + 3 * W, n, a3, step, vel, beta, mode)


@jit
def _row32(s, m, c, q, z, following, b, j, step, vel, beta, mode):  # pragma: no cover - compiled
    """Row b, columns j..j+31 of one step (each element as in `_rows8`)."""
    n = m.shape[1]
    a0 = vzero()
    a1 = vzero()
    for k in range(m.shape[0]):
        x = s[b, k]
        o = k * n + j
        a0 = vfma(x, vload(m, o), a0)
        a1 = vfma(x, vload(m, o + W), a1)
    _finish(s, c, q, z, following, b, j, n, a0, step, vel, beta, mode)
    _finish(s, c, q, z, following, b, j + W, n, a1, step, vel, beta, mode)


@jit
def steps_rows(m, c, qinv, count, last, states, drives, vel, beta, mode, lo, hi):  # pragma: no cover - compiled
    """`count` steps of the recurrence for rows lo..hi-1 from states[0]: drives[t] = c + states[t] M, then
    states[t + 1] = drives[t] - states[t] / (qinv + states[t]^2); with `last` the final drive is step T's
    and no state follows it; `mode`, `vel` and `beta` (16 copies of beta): the solver (`_finish`).
    m (k, n): k the latents, n their count padded to a multiple of BLOCK with zero columns (c, qinv, states
    and drives padded alike: c 0, qinv inf, so the padding stays 0).

    Rows in blocks of eight (`_rows8`), the rest one by one (`_row64`, `_row32`): the same bits either way.
    """
    n = m.shape[1]
    for t in range(count):
        step = not (last and t == count - 1)
        s, z = states[t], drives[t]
        following = states[t + 1] if step else s
        b = lo
        while b + 8 <= hi:
            for j in range(0, n, BLOCK):
                _rows8(s, m, c, qinv, z, following, b, j, step, vel, beta, mode)
            b += 8
        while b < hi:
            j = 0
            while j + 2 * BLOCK <= n:
                _row64(s, m, c, qinv, z, following, b, j, step, vel, beta, mode)
                j += 2 * BLOCK
            if j < n:
                _row32(s, m, c, qinv, z, following, b, j, step, vel, beta, mode)
            b += 1


@jit
def energy_rows(states, drives, c, weight, logs, alpha, base, has_cauchy, out, lo, hi):  # pragma: no cover
    """out[t, b] = base[b] + sum_i weight_i s_i (s_i - z_i - c_i) [+ sum_i alpha_i logs_i], in a fixed order.

    Lane i mod 16 of a block sums its terms over i in order, then `vsum` adds the 16 lanes in a fixed
    order: the same operations for every image. The latents are padded to a multiple of 16 (`steps_rows`);
    weight and alpha are padded with zeros (c is not: it has the latents only, read up to n).
    """
    n = states.shape[2]
    for b in range(lo, hi):
        for t in range(states.shape[0]):
            st, zt, lt = states[t], drives[t], logs[t]
            acc = vzero()
            for i in range(0, n, W):
                o = b * n + i
                sv = vload(st, o)
                term = vmul(vload(weight, i), vmul(sv, vsub(vsub(sv, vload(zt, o)), vload(c, o))))
                if has_cauchy:
                    term = vfmav(vload(alpha, i), vload(lt, o), term)
                acc = vadd(acc, term)
            out[t, b] = base[b] + vsum(acc)


@jit
def gather_rows(a, source, weight, out, lo, hi):  # pragma: no cover - compiled
    """out[b, j] = a[b, source[j]] * weight[j] for rows lo..hi-1 (a target map with one entry per column)."""
    for b in range(lo, hi):
        row, o = a[b], out[b]
        for j in range(source.shape[0]):
            o[j] = row[source[j]] * weight[j]
