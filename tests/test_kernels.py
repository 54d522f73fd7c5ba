"""Triton reduction kernels against a float64 reference, on CPU under ``TRITON_INTERPRET=1``.

triton decides interpreted-or-compiled when ``@triton.jit`` decorates — its own standard library
when triton is imported, our kernels when their module is — so the variable is set before either
import and must stay set: restoring it breaks triton's lazy imports at the first launch
(``gluon._import_from_triton`` asserts interpreter mode for interpreted functions). It therefore
holds for the rest of the pytest process. That is harmless to other modules by design:
``dispatch``'s ``impl="auto"`` sends only CUDA tensors to Triton, never CPU tensors to the
interpreter. (A ``conftest.py`` setting it session-wide would make the order of imports moot.)

triton missing is a *failure* of every test here, not a skip: CI installs it, and a silently
skipped kernel suite is how kernels rot. The GPU test runs the compiled kernels in a subprocess
(this process's kernels are interpreted and cannot follow CUDA addresses) and skips without CUDA;
``test_fixed_cases_cpu`` runs the same checks here.
"""
import os
import pathlib
import subprocess
import sys

_COMPILED = os.environ.get("GRADES_KERNELS_COMPILED") == "1"  # set by the GPU subprocess only
if not _COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401
    from grades_optim.kernels import fused_adamw as F
    from grades_optim.kernels import tensor_sums as K
    _IMPORT_ERROR = None
except ImportError as exc:
    K = F = None
    _IMPORT_ERROR = exc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grades_optim import kernels
from grades_optim.kernels import dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Inputs are upcast exactly (bf16/fp16 → fp32 is lossless) and never rounded back down, so the
# interpreter's fp32→bf16 truncation does not arise; the only error is fp32 accumulation over
# ≤ a few thousand terms against a float64 reference.
RTOL, ATOL = 1e-5, 1e-5
CASE_SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _require_triton():
    if _IMPORT_ERROR is not None:
        pytest.fail(f"triton is required for the kernel tests (CI installs it): {_IMPORT_ERROR}")
    if not _COMPILED and not K.INTERPRETED:
        pytest.fail("grades_optim.kernels.tensor_sums was imported before this module set TRITON_INTERPRET=1")


@pytest.fixture
def several_tiles(monkeypatch):
    """16-element tiles: a 64-element chunk is four tiles of one program (CI's chunks are <= 256,
    which the default 4096-element tile would cover in one), so the tile loop's offsets are tested."""
    for kernel, (_, warps) in list(K.LAUNCH.items()):
        monkeypatch.setitem(K.LAUNCH, kernel, (16, warps))
    assert K.launch_config("fused_adamw", 64) == (16, K.LAUNCH["fused_adamw"][1])


def _ref_sums(tensors, ord):
    out = [t.double().abs().sum() if ord == 1 else t.double().square().sum() for t in tensors]
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def _ref_delta_sums(a, b, ord):
    return _ref_sums([x.double().reshape(-1) - y.double().reshape(-1) for x, y in zip(a, b)], ord)


def _close(got, want):
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=RTOL, atol=ATOL)


def _make(numel, dtype, layout, scale, gen, device="cpu"):
    """A tensor of ``numel`` elements laid out as drawn: contiguous, transposed, strided or misaligned."""
    if layout == "transposed" and numel > 1:
        rows = next(r for r in (7, 5, 3, 2, 1) if numel % r == 0)
        base = torch.randn(numel // rows, rows, generator=gen) * scale
        t = base.to(dtype).t()
    elif layout == "strided":
        t = (torch.randn(2 * numel, generator=gen) * scale).to(dtype)[::2]
    elif layout == "offset":  # contiguous but its address is one element past 16-byte alignment
        t = (torch.randn(numel + 1, generator=gen) * scale).to(dtype)[1:]
    else:
        t = (torch.randn(numel, generator=gen) * scale).to(dtype)
    return t.to(device)


tensor_spec = st.tuples(
    st.one_of(st.integers(0, 2), st.integers(0, 700)),  # numel: often empty / 1 element
    st.sampled_from(DTYPES),
    st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "offset"]),
    st.sampled_from([1e-3, 1.0, 30.0]),
)


@CASE_SETTINGS
@given(specs=st.lists(tensor_spec, max_size=6), ord=st.sampled_from([1, 2]),
       chunk=st.sampled_from([16, 64, 256]), seed=st.integers(0, 2**31 - 1))
def test_tensor_sums_match_float64(specs, ord, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [_make(n, dt, lay, sc, gen) for n, dt, lay, sc in specs]
    got = K.tensor_sums(tensors, ord, chunk_size=chunk)
    _close(got, _ref_sums(tensors, ord))
    _close(dispatch.torch_tensor_sums(tensors, ord), _ref_sums(tensors, ord))  # the twin agrees too


@CASE_SETTINGS
@given(specs=st.lists(st.tuples(tensor_spec, st.sampled_from(DTYPES)), max_size=5), ord=st.sampled_from([1, 2]),
       chunk=st.sampled_from([16, 128]), seed=st.integers(0, 2**31 - 1))
def test_tensor_delta_sums_match_float64(specs, ord, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    a = [_make(n, dt, lay, sc, gen) for (n, dt, lay, sc), _ in specs]
    # b: same numel, its own dtype (bf16 gradients against an fp32 copy), a near-copy of a so the
    # difference is small next to |a|, which is where a bf16 subtraction would lose it.
    b = [(x.double() + 1e-2 * torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(dt_b)
         for x, (_, dt_b) in zip(a, specs)]
    got = K.tensor_delta_sums(a, b, ord, chunk_size=chunk)
    _close(got, _ref_delta_sums(a, b, ord))
    _close(dispatch.torch_tensor_delta_sums(a, b, ord), _ref_delta_sums(a, b, ord))


@pytest.mark.usefixtures("several_tiles")
def test_many_tensors_and_multi_chunk_tensors():
    gen = torch.Generator().manual_seed(0)
    tensors = [_make(n, DTYPES[n % 3], "contiguous", 1.0, gen) for n in range(0, 300, 3)]  # 100 tensors
    tensors.append(_make(5000, torch.bfloat16, "contiguous", 1.0, gen))  # 79 chunks of 64
    for ord in (1, 2):
        _close(K.tensor_sums(tensors, ord, chunk_size=64), _ref_sums(tensors, ord))


def test_empty_inputs():
    assert K.tensor_sums([], 1).shape == (0,)
    assert K.tensor_delta_sums([], [], 1).shape == (0,)
    got = K.tensor_sums([torch.empty(0), torch.empty(0, 3, dtype=torch.bfloat16)], 2)
    assert torch.equal(got, torch.zeros(2))


def test_deterministic_and_table_cached():
    gen = torch.Generator().manual_seed(1)
    tensors = [_make(n, torch.bfloat16, "contiguous", 1.0, gen) for n in (1000, 37, 513)]
    K._plans.clear()
    first = K.tensor_sums(tensors, 1, chunk_size=64)
    plan = next(iter(K._plans.values()))
    second = K.tensor_sums(tensors, 1, chunk_size=64)
    assert torch.equal(first, second)  # bitwise: no atomics, fixed summation order
    assert len(K._plans) == 1 and next(iter(K._plans.values())) is plan
    K.tensor_sums([t.t() if t.dim() > 1 else t[::2] for t in tensors], 1, chunk_size=64)
    assert len(K._plans) == 1, "copies of non-contiguous inputs die with the call: their tables are not cached"


def test_invalid_arguments_raise():
    x = torch.ones(4)
    with pytest.raises(ValueError, match="ord"):
        K.tensor_sums([x], 3)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        K.tensor_sums([x, 1.0], 1)
    with pytest.raises(TypeError, match="tensors must be a sequence"):
        K.tensor_sums(x, 1)
    with pytest.raises(TypeError, match="float64"):
        K.tensor_sums([x.double()], 1)
    with pytest.raises(TypeError, match="layout"):
        K.tensor_sums([x.to_sparse()], 1)
    with pytest.raises(ValueError, match="chunk_size"):
        K.tensor_sums([x], 1, chunk_size=100)
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta"):
        K.tensor_sums([x, torch.ones(4, device="meta")], 1)
    with pytest.raises(ValueError, match=r"b\[0\] has 3 elements"):
        K.tensor_delta_sums([x], [torch.ones(3)], 1)
    with pytest.raises(ValueError, match="b has 0"):
        K.tensor_delta_sums([x], [], 1)
    with pytest.raises(ValueError, match="impl"):
        dispatch.tensor_sums([x], 1, impl="cuda")


def test_available_and_dispatch_on_cpu():
    assert kernels.available() is None
    assert kernels.available("cpu") is None  # the interpreter runs CPU tensors
    assert "interpret" in kernels.available("cuda").lower() or "CUDA" in kernels.available("cuda")
    assert isinstance(kernels.available("meta"), str)
    xs = [torch.randn(50), torch.randn(9, dtype=torch.bfloat16)]
    # auto never sends CPU tensors to the interpreter; triton forces it; both agree.
    assert dispatch.resolve_impl("auto", xs) == "torch"
    assert dispatch.resolve_impl("triton", xs) == "triton"
    assert dispatch.resolve_impl("torch", []) == "torch"
    for ord in (1, 2):
        want = _ref_sums(xs, ord)
        for impl in ("auto", "torch", "triton"):
            _close(dispatch.tensor_sums(xs, ord, impl=impl), want)
    ys = [x + 1 for x in xs]
    for impl in ("auto", "triton"):
        _close(dispatch.tensor_delta_sums(xs, ys, 1, impl=impl), _ref_delta_sums(xs, ys, 1))


def _fixed_case_check(device):
    """Shared by the CPU test (interpreted) and the GPU test (compiled, in a subprocess)."""
    gen = torch.Generator().manual_seed(2)
    specs = [(0, torch.float32), (1, torch.bfloat16), (4096 * 3, torch.bfloat16), (4096 * 8 + 17, torch.float16),
             (1000, torch.float32), (2 * 32768 + 5, torch.bfloat16)]
    if device == "cpu":  # the interpreter is slow: same shapes of cases, a smaller chunk
        chunk, specs = 256, [(n if n < 2 else n // 64 + 3, dt) for n, dt in specs]
    else:
        chunk = K.DEFAULT_CHUNK_SIZE
    tensors = [_make(n, dt, "contiguous", 1.0, gen, device) for n, dt in specs]
    prev = [t + 0.5 for t in tensors]
    for ord in (1, 2):
        _close(K.tensor_sums(tensors, ord, chunk_size=chunk), _ref_sums(tensors, ord))
    _close(K.tensor_delta_sums(tensors, prev, 1, chunk_size=chunk), _ref_delta_sums(tensors, prev, 1))
    if device == "cuda":
        # Steady state, table cached: no host sync at all (DESIGN §5).
        K.tensor_sums(tensors, 1, chunk_size=chunk)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = K.tensor_sums(tensors, 1, chunk_size=chunk)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        _close(out, _ref_sums(tensors, 1))


def test_fixed_cases_cpu():
    _fixed_case_check("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; test_fixed_cases_cpu is the CPU twin")
def test_fixed_cases_cuda_compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GRADES_KERNELS_COMPILED"] = "1"
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('tk', {str(pathlib.Path(__file__))!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert not m.K.INTERPRETED; m._fixed_case_check('cuda')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


_SM90_SCRIPT = """
import re
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from grades_optim.kernels import tensor_sums as K
assert not K.INTERPRETED
target = GPUTarget("cuda", 90, 32)
sig = dict.fromkeys(["a_addr_ptr", "b_addr_ptr", "numel_ptr", "block_tensor_ptr", "block_chunk_ptr"], "*i64")
sig.update(partials_ptr="*fp32", block_base="i64")
sig.update(dict.fromkeys(["A_DTYPE", "B_DTYPE", "HAS_B", "ORD", "CHUNK", "BLOCK", "ALIGNED"], "constexpr"))
attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
for a_dt, b_dt, has_b, ord in [(tl.bfloat16, tl.bfloat16, False, 1), (tl.float32, tl.bfloat16, True, 2),
                               (tl.float16, tl.float16, False, 2)]:
    for aligned in (True, False):
        block, warps = K.launch_config("tensor_sums", K.DEFAULT_CHUNK_SIZE)
        const = dict(A_DTYPE=a_dt, B_DTYPE=b_dt, HAS_B=has_b, ORD=ord, CHUNK=K.DEFAULT_CHUNK_SIZE,
                     BLOCK=block, ALIGNED=aligned)
        ptx = compile(ASTSource(K._tensor_sums_kernel, sig, const, attrs=attrs), target=target,
                      options={"num_warps": warps}).asm["ptx"]
        # 16-byte loads on the unmasked tiles are what lets one launch reach copy bandwidth.
        assert ("ld.global.v4.b32" in ptx) == aligned, (a_dt, b_dt, aligned, set(re.findall(r"ld\\.global\\S*", ptx)))
sig = {"partials_ptr": "*fp32", "block_start_ptr": "*i64", "block_count_ptr": "*i64", "out_ptr": "*fp32",
       "RBLOCK": "constexpr"}
compile(ASTSource(K._tensor_sums_finish_kernel, sig, {"RBLOCK": K._FINISH_BLOCK}), target=target)
from grades_optim.kernels import fused_adamw as F
sig = dict.fromkeys(["p_addr_ptr", "g_addr_ptr", "m_addr_ptr", "v_addr_ptr", "numel_ptr", "block_tensor_ptr",
                     "block_chunk_ptr", "active_ptr"], "*i64")
sig.update(step_size_ptr="*fp32", bc2_sqrt_ptr="*fp32", partials_ptr="*fp32", block_base="i64")
sig.update(dict.fromkeys(["decay", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight_decay"], "fp32"))
sig.update(dict.fromkeys(["P_DTYPE", "S_DTYPE", "DECOUPLED", "MAXIMIZE", "ORD", "CHUNK", "BLOCK", "ALIGNED"],
                         "constexpr"))
attrs = {(i,): [["tt.divisibility", 16]] for i in range(11)}
for p_dt, s_dt, ord in ((tl.float32, tl.float32, 1), (tl.bfloat16, tl.float32, 1), (tl.bfloat16, tl.bfloat16, 1),
                        (tl.float32, tl.float32, 3), (tl.bfloat16, tl.bfloat16, 3), (tl.float32, tl.float32, 4),
                        (tl.bfloat16, tl.bfloat16, 4)):
    for aligned in (True, False):
        block, warps = K.launch_config("fused_adamw", K.DEFAULT_CHUNK_SIZE)
        const = dict(P_DTYPE=p_dt, S_DTYPE=s_dt, DECOUPLED=True, MAXIMIZE=False, ORD=ord, CHUNK=K.DEFAULT_CHUNK_SIZE, BLOCK=block,
                     ALIGNED=aligned)
        ptx = compile(ASTSource(F._fused_adamw_kernel, sig, const, attrs=attrs), target=target,
                      options={"num_warps": warps}).asm["ptx"]
        assert ("st.global.v4.b32" in ptx) == aligned, (p_dt, aligned)
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx  # IEEE, like torch; not sqrt.approx
from grades_optim.kernels import fused_sgd as S
sig = dict.fromkeys(["p_addr_ptr", "g_addr_ptr", "b_addr_ptr", "numel_ptr", "block_tensor_ptr", "block_chunk_ptr",
                     "active_ptr", "init_ptr"], "*i64")
sig.update(partials_ptr="*fp32", block_base="i64")
sig.update(dict.fromkeys(["lr", "momentum", "one_minus_dampening", "weight_decay"], "fp32"))
sig.update(dict.fromkeys(["P_DTYPE", "MOMENTUM", "NESTEROV", "MAXIMIZE", "ORD", "CHUNK", "BLOCK", "ALIGNED"], "constexpr"))
attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
for aligned, ord in ((True, 2), (False, 2), (True, 3)):
    block, warps = K.launch_config("fused_sgd", K.DEFAULT_CHUNK_SIZE)
    const = dict(P_DTYPE=tl.float32, MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, ORD=ord, CHUNK=K.DEFAULT_CHUNK_SIZE,
                 BLOCK=block, ALIGNED=aligned)
    ptx = compile(ASTSource(S._fused_sgd_kernel, sig, const, attrs=attrs), target=target,
                  options={"num_warps": warps}).asm["ptx"]
    assert ("st.global.v4.b32" in ptx) == aligned, aligned
from grades_optim.kernels import decide as D
sig = {"sums_ptr": "*fp32", "start_ptr": "*i64", "count_ptr": "*i64", "numel_ptr": "*fp64", "frozen_at_ptr": "*i64",
       "below_ptr": "*i64", "smoothed_ptr": "*fp64", "ref_sum_ptr": "*fp64", "ref_count_ptr": "*i64",
       "ref_first_ptr": "*fp64", "active_ptr": "*i32", "tensor_active_ptr": "*i32", "metric_ptr": "*fp64",
       "fscal_ptr": "*fp64", "iscal_ptr": "*i64", "n_comp": "i32", "max_count": "i32"}
sig.update(dict.fromkeys(["ORD", "MEAN", "EMA", "RELATIVE", "PER_TENSOR", "BLOCK_C"], "constexpr"))
const = dict(ORD=2, MEAN=True, EMA=True, RELATIVE=True, PER_TENSOR=True, BLOCK_C=D._BLOCK_C)
compile(ASTSource(D._decide_kernel, sig, const), target=target)
"""


def test_compiles_for_sm90_with_vector_loads():
    """The GPU builds of both kernels, checked without a GPU: triton's offline compiler targets sm_90 from the CPU.

    Runs in a subprocess because this process's triton is in interpreter mode.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silences triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _adam_setup(shapes, dtype, gen):
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    state = ([torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes], [torch.tensor(0.0) for _ in shapes])
    return params, state


def _freeze_schedule(gen, shapes, ref, steps=20):
    """The 20-step schedule both torch-equivalence tests share: tensor 1 freezes after 8 steps,
    tensor 5 is frozen from the start. Yields ``(grads, active, newly frozen indices)`` after
    giving the torch reference its gradients (``None`` when frozen: torch skips such params)."""
    frozen_at, seen = {1: 8, 5: 0}, set()
    for k in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        active = [k < frozen_at.get(i, 99) for i in range(len(shapes))]
        newly = [i for i, a in enumerate(active) if not a and i not in seen]
        seen.update(newly)
        for r, g, a in zip(ref, grads, active):
            r.grad = g.clone() if a else None
        yield grads, active, newly


@pytest.mark.parametrize("opt_cls, decoupled, maximize", [
    (torch.optim.AdamW, True, False), (torch.optim.AdamW, True, True), (torch.optim.Adam, False, False)])
@pytest.mark.usefixtures("several_tiles")
def test_fused_adamw_matches_torch_optim_20_steps(opt_cls, decoupled, maximize):
    gen = torch.Generator().manual_seed(3)
    shapes = [(37,), (16, 9), (1,), (0,), (300,), (5, 5)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    params, (m, v, steps) = _adam_setup(shapes, torch.float32, gen)
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ref, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                  weight_decay=hp["weight_decay"], maximize=maximize, foreach=False)
    snapshot = {}
    for grads, active, newly in _freeze_schedule(gen, shapes, ref):
        for i in newly:
            snapshot[i] = (params[i].clone(), m[i].clone(), v[i].clone(), steps[i].clone())
        opt.step()
        l1 = F.fused_adamw_step(params, grads, m, v, steps, active, decoupled=decoupled, maximize=maximize,
                                chunk_size=64, **hp)
        _close(l1, _ref_sums([g if a else torch.zeros(0) for g, a in zip(grads, active)], 1))
    for i, r in enumerate(ref):
        st_ref = opt.state.get(r, {})
        if not st_ref:  # never stepped by torch
            assert float(steps[i]) == 0
        else:
            # fp32: identical formulas, a few ulp of drift (FMA, operation order) over 20 steps.
            torch.testing.assert_close(params[i], r.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m[i], st_ref["exp_avg"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v[i], st_ref["exp_avg_sq"], rtol=1e-5, atol=1e-7)
            assert float(steps[i]) == float(st_ref["step"])
    for i, (p0, m0, v0, s0) in snapshot.items():  # frozen: bit-untouched
        assert torch.equal(params[i], p0) and torch.equal(m[i], m0) and torch.equal(v[i], v0)
        assert torch.equal(steps[i], s0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("states_in_param_dtype", [False, True])
def test_fused_adamw_low_precision_params_round_like_torch(dtype, states_in_param_dtype):
    """bf16/fp16 params with fp32 states, or with states in the param dtype (torch's own layout for
    such params), step by step against the torch twin from the same state.

    The twin rounds with ``copy_`` (nearest even); the kernel rounds bf16 by hand because the
    interpreter's ``.to(tl.bfloat16)`` truncates — truncation would miss on about half the values.
    """
    gen = torch.Generator().manual_seed(4)
    shapes = [(300,), (17, 13), (1,)]
    hp = dict(lr=3e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
              states_in_param_dtype=states_in_param_dtype)
    params, (m, v, steps) = _adam_setup(shapes, dtype, gen)
    if states_in_param_dtype:
        m, v = [x.to(dtype) for x in m], [x.to(dtype) for x in v]

    def ulps(a, b):
        a, b = (torch.cat([x.reshape(-1) for x in t]) for t in (a, b))
        return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()

    for k in range(5):
        grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        twin = ([p.clone() for p in params], [x.clone() for x in m], [x.clone() for x in v], [s.clone() for s in steps])
        F.torch_fused_adamw_step(twin[0], grads, twin[1], twin[2], twin[3], [True] * 3, **hp)
        F.fused_adamw_step(params, grads, m, v, steps, [True] * 3, chunk_size=64, **hp)
        off = ulps(params, twin[0])
        assert off.max() <= 1 and (off == 0).float().mean() >= 0.98, (k, off.float().mean())
        for mine, theirs in ((m, twin[1]), (v, twin[2])):
            assert mine[0].dtype == (dtype if states_in_param_dtype else torch.float32)
            if states_in_param_dtype:  # stored rounded to nearest even, from the same fp32 values
                off = ulps(mine, theirs)
                assert off.max() <= 1 and (off == 0).float().mean() >= 0.98, (k, off.float().mean())
            else:
                torch.testing.assert_close(torch.cat([x.reshape(-1) for x in mine]),
                                           torch.cat([x.reshape(-1) for x in theirs]), rtol=1e-5, atol=1e-7)


def test_fused_adamw_bf16_states_follow_torch_fused_adamw():
    """Against torch.optim.AdamW(fused=True) on bf16 params (moments in bf16, fp32 math): 10 steps."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(300,), (17, 13), (1,)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    params = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], fused=True)
    m = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    v = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    steps = [torch.tensor(0.0) for _ in shapes]
    for _ in range(10):
        grads = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        F.fused_adamw_step(params, grads, m, v, steps, [True] * 3, chunk_size=64, states_in_param_dtype=True,
                           device_steps=True, **hp)
    for p, r in zip(params, ref):
        st = opt.state[r]
        assert st["exp_avg"].dtype == torch.bfloat16 and float(st["step"]) == 10.0
        # bf16 has 8 bits of mantissa: allow a couple of ulps of drift in the order of operations
        torch.testing.assert_close(p.float(), r.detach().float(), rtol=2e-2, atol=1e-3)


def test_fused_adamw_invalid_arguments_raise():
    p = [torch.zeros(4)]
    ok = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    state = ([torch.zeros(4)], [torch.zeros(4)], [torch.tensor(0.0)])
    with pytest.raises(ValueError, match="active has 2"):
        F.fused_adamw_step(p, [torch.zeros(4)], *state, [True, False], **ok)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\]"):
        F.fused_adamw_step(p, [torch.zeros(4)], [torch.zeros(4, dtype=torch.bfloat16)], state[1], state[2], [True], **ok)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        F.fused_adamw_step(p, [torch.zeros(5)], *state, [True], **ok)
    with pytest.raises(ValueError, match="not contiguous"):
        F.fused_adamw_step([torch.zeros(2, 2).t()], [torch.zeros(2, 2)], [torch.zeros(2, 2)], [torch.zeros(2, 2)],
                           [torch.tensor(0.0)], [True], **ok)


def test_fused_adamw_dispatch_paths_agree():
    shapes = [(40,), (3, 7)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    runs = {}
    for impl in ("auto", "triton"):  # auto on CPU tensors: the torch twin
        gen = torch.Generator().manual_seed(6)
        params, (m, v, steps) = _adam_setup(shapes, torch.float32, gen)
        for _ in range(3):
            grads = [torch.randn(s, generator=gen) for s in shapes]
            l1 = dispatch.fused_adamw_step(params, grads, m, v, steps, [True, True], impl=impl, **hp)
        runs[impl] = (params, l1)
    for a, b in zip(runs["auto"][0], runs["triton"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    _close(runs["triton"][1], runs["auto"][1].double())


def test_torch_paths_never_import_triton():
    code = ("import sys, torch; from grades_optim import kernels; from grades_optim.kernels import dispatch; "
            "x = [torch.randn(5), torch.randn(3)]; dispatch.tensor_sums(x, 1); dispatch.tensor_delta_sums(x, x); "
            "s = [torch.tensor(0.0)] * 2; dispatch.fused_adamw_step(x, x, [torch.zeros(5), torch.zeros(3)], "
            "[torch.zeros(5), torch.zeros(3)], s, [True, True], lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, "
            "weight_decay=0.0); assert 'triton' not in sys.modules, 'the torch path imported triton'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("momentum, dampening, nesterov, weight_decay, maximize", [
    (0.9, 0.0, False, 0.01, False), (0.9, 0.0, True, 0.0, True), (0.8, 0.3, False, 0.1, False), (0.0, 0.0, False, 0.1, False)])
@pytest.mark.usefixtures("several_tiles")
def test_fused_sgd_matches_torch_optim_20_steps(momentum, dampening, nesterov, weight_decay, maximize):
    from grades_optim.kernels import fused_sgd as S

    gen = torch.Generator().manual_seed(7)
    shapes = [(37,), (16, 9), (1,), (0,), (300,), (5, 5)]
    hp = dict(lr=5e-2, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
              maximize=maximize)
    params = [torch.randn(s, generator=gen) for s in shapes]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(ref, foreach=False, **hp)
    bufs = [None] * len(shapes)
    snapshot = {}
    for grads, active, newly in _freeze_schedule(gen, shapes, ref):
        for i in newly:
            snapshot[i] = (params[i].clone(), None if bufs[i] is None else bufs[i].clone())
        opt.step()
        sq = S.fused_sgd_step(params, grads, bufs, active, ord=2, chunk_size=64, **hp)
        _close(sq, _ref_sums([g if a else torch.zeros(0) for g, a in zip(grads, active)], 2))
    for i, r in enumerate(ref):
        torch.testing.assert_close(params[i], r.detach(), rtol=1e-5, atol=1e-6)
        want = opt.state.get(r, {}).get("momentum_buffer")
        assert (bufs[i] is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(bufs[i], want, rtol=1e-5, atol=1e-6)
    for i, (p0, b0) in snapshot.items():  # frozen: bit-untouched, and no buffer created for a never-live one
        assert torch.equal(params[i], p0) and (b0 is None or torch.equal(bufs[i], b0))
    assert bufs[5] is None


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("several_tiles")
def test_fused_steps_weight_delta_metric_matches_float64(kind, dtype):
    """``ord=3``: Σ|p_new − p_old| of the values as stored (weight_delta_l1 without a weight copy),
    against float64 on snapshots, for the kernel and its twin; frozen tensors read 0 and stay put."""
    from grades_optim.kernels import fused_sgd as S

    gen = torch.Generator().manual_seed(11)
    shapes = [(37,), (16, 9), (1,), (0,), (300,)]
    active = [True, False, True, True, True]
    for impl in ("kernel", "twin"):
        params = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
        grads = [torch.randn(sh, generator=gen).to(dtype) for sh in shapes]
        m, v = [torch.zeros(sh) for sh in shapes], [torch.zeros(sh) for sh in shapes]
        steps, bufs = [torch.tensor(0.0) for _ in shapes], [None] * len(shapes)
        for _ in range(2):  # the second step has state (moments, momentum buffers)
            before = [p.clone() for p in params]
            if kind == "adamw":
                fn = F.fused_adamw_step if impl == "kernel" else F.torch_fused_adamw_step
                got = fn(params, grads, m, v, steps, active, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                         weight_decay=0.1, ord=3, **({"chunk_size": 64} if impl == "kernel" else {}))
            else:
                fn = S.fused_sgd_step if impl == "kernel" else S.torch_fused_sgd_step
                got = fn(params, grads, bufs, active, lr=5e-2, momentum=0.9, weight_decay=0.01, ord=3,
                         **({"chunk_size": 64} if impl == "kernel" else {}))
            want = _ref_delta_sums([p if a else torch.zeros(0) for p, a in zip(params, active)],
                                   [b if a else torch.zeros(0) for b, a in zip(before, active)], 1)
            _close(got, want)
            assert got[2] > 0 and torch.equal(params[1], before[1]) and got[1] == 0


def test_fused_steps_with_device_flags_and_cached_tables():
    """Flags given as a device tensor are read by the kernels as is; a steady call rebuilds no table."""
    from grades_optim.kernels import fused_sgd as S
    from grades_optim.kernels import step_plan

    gen = torch.Generator().manual_seed(8)
    shapes = [(100,), (7, 3), (65,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    twin = [p.clone() for p in params]
    bufs, twin_bufs = [None] * 3, [None] * 3
    flags = torch.tensor([1, 0, 1], dtype=torch.int32)
    for k in range(3):
        builds = step_plan.stats["builds"]
        l1 = S.fused_sgd_step(params, grads, bufs, flags, lr=0.1, momentum=0.9, chunk_size=32)
        want = S.torch_fused_sgd_step(twin, grads, twin_bufs, flags, lr=0.1, momentum=0.9)
        _close(l1, want.double())
        if k == 2:  # step 1 builds, step 2 rebuilds (init flags cleared), step 3 is a cache hit
            assert step_plan.stats["builds"] == builds
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    m, v, st = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes], [torch.tensor(0.0) for _ in shapes]
    before = params[1].clone()
    sq = F.fused_adamw_step(params, grads, m, v, st, flags, ord=2, chunk_size=32, **hp)
    assert torch.equal(params[1], before) and sq[1] == 0 and torch.equal(m[1], torch.zeros(7, 3))
    _close(sq, _ref_sums([grads[0], torch.zeros(0), grads[2]], 2))
    assert F.fused_adamw_step(params, grads, m, v, st, flags, metric=False, chunk_size=32, **hp) is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(counts=st.lists(st.integers(0, 3), min_size=1, max_size=6), tau=st.sampled_from([0.3, 0.6]),
       grace=st.integers(0, 3), patience=st.integers(1, 3), ema=st.sampled_from([0.0, 0.5]),
       tau_mode=st.sampled_from(["absolute", "relative"]), ord=st.sampled_from([1, 2]),
       reduction=st.sampled_from(["sum", "mean"]), seed=st.integers(0, 2**31 - 1))
def test_decide_kernel_and_twin_follow_the_rule(counts, tau, grace, patience, ema, tau_mode, ord, reduction, seed):
    """The pure rule (grades_optim.rule) is the specification; the host path's metric formula feeds it."""
    import math

    from grades_optim.kernels import decide as D
    from grades_optim.rule import ComponentState, RuleConfig, decide_all

    gen = torch.Generator().manual_seed(seed)
    cfg = RuleConfig(tau=tau, grace_steps=grace, patience=patience, ema=ema, tau_mode=tau_mode)
    starts = torch.tensor([sum(counts[:i]) for i in range(len(counts))])
    count_t = torch.tensor(counts)
    numel = torch.tensor([float(3 * k) for k in counts], dtype=torch.float64)
    states = [ComponentState() for _ in counts]
    dev_k, dev_t = D.DecideState.from_rule(states), D.DecideState.from_rule(states)
    for step in range(1, 9):
        sums = torch.rand(sum(counts), generator=gen) * 0.7 ** step
        if sums.numel() and step == 4:
            sums[0] = float("inf")  # a non-finite reading breaks the streak, never freezes
        metrics = []
        for c, k in enumerate(counts):  # what magnitudes.component_magnitudes computes
            acc = torch.zeros((), dtype=torch.float32)
            for j in range(k):
                acc = acc + sums[int(starts[c]) + j]
            v = float(acc) / (numel[c].item() if reduction == "mean" else 1.0) if k else None
            metrics.append(None if v is None else (math.sqrt(v) if ord == 2 and v >= 0 else v))
        states = [s for s, _, _ in decide_all(states, metrics, step, cfg)]
        rule = dict(step=step, tau=tau, grace_steps=grace, patience=patience, ema=ema, tau_mode=tau_mode, ord=ord,
                    reduction=reduction)
        flags_k = torch.full((sums.numel(),), 7, dtype=torch.int32)
        flags_t = flags_k.clone()
        got = D.decide(sums, starts, count_t, numel, dev_k, tensor_active=flags_k, max_count=max(counts), **rule)
        want = D.torch_decide(sums, starts, count_t, numel, dev_t, tensor_active=flags_t, **rule)
        assert dev_k.to_rule() == states and dev_t.to_rule() == states, step
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(flags_k, flags_t)
        assert dev_k.active.tolist() == [int(s.frozen_at is None) for s in states]


@settings(max_examples=60, deadline=None)
@given(owners=st.lists(st.integers(0, 4), max_size=12), n_extra=st.integers(0, 2), seed=st.integers(0, 2**31 - 1))
def test_sum_by_owner_is_tensor_order_fp32_without_atomics(owners, n_extra, seed):
    """Per-component sums: fp32 in tensor order (the bits of a sequential add, as the decide kernel
    and CPU index_add_ give), zero for a component without tensors, and no index_add_ (float
    atomics on CUDA: run-to-run differences)."""
    from grades_optim import magnitudes

    n = (max(owners) + 1 if owners else 0) + n_extra
    part = torch.rand(len(owners), generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 1e3
    want = []
    for c in range(n):
        acc = torch.zeros((), dtype=torch.float32)
        for j, o in enumerate(owners):
            if o == c:
                acc = acc + part[j]
        want.append(acc)
    real = torch.Tensor.index_add_

    def tripwire(*args, **kwargs):
        raise AssertionError("index_add_ used for per-component sums")

    torch.Tensor.index_add_ = tripwire
    try:
        got = magnitudes.sum_by_owner(part, owners, n)
    finally:
        torch.Tensor.index_add_ = real
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(got, torch.stack(want) if want else torch.zeros(0))
    reference = torch.zeros(n, dtype=torch.float32).index_add_(0, torch.tensor(owners, dtype=torch.long), part)
    assert torch.equal(got, reference)


class _HostReadTripwire:
    """Host reads of tensors (``.item()``, ``.tolist()``, ``float()``, ``int()``, ``bool()``, ``.cpu()``,
    ``.numpy()``) raise inside the block: on a GPU each would be a device-to-host sync."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def trip(name):
            def raiser(*args, **kwargs):
                raise AssertionError(f"host read of a tensor: Tensor.{name}")
            return raiser

        for n in self.NAMES:
            setattr(torch.Tensor, n, trip(n))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return False


@pytest.mark.usefixtures("several_tiles")
def test_fused_adamw_device_steps_equal_cpu_steps_without_host_reads():
    """device_steps=True (torch's fused/capturable layout): the counters advance in place and the step
    is bit-identical to the one from CPU counters, with no host read of any tensor once the launch
    table exists (a table build uploads once, as on the CPU-counter path)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(37,), (16, 9), (1,), (300,)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    active = [True, False, True, True]
    runs = []
    for device_steps in (False, True):
        params = [p.clone() for p in start]
        m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
        steps = [torch.tensor(0.0) for _ in shapes]
        sums, g = [], [torch.empty(s) for s in shapes]  # stable addresses, as the caching allocator gives
        for k, values in enumerate(grads):
            for buf, x in zip(g, values):
                buf.copy_(x)
            call = dict(chunk_size=64, device_steps=device_steps, checked=k > 0, **hp)
            if device_steps and k > 0:
                with _HostReadTripwire():
                    sums.append(F.fused_adamw_step(params, g, m, v, steps, active, **call))
            else:
                sums.append(F.fused_adamw_step(params, g, m, v, steps, active, **call))
        runs.append((params, m, v, steps, sums))
    for host, dev in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(host, dev))
    steps = runs[1][3]
    assert [float(s) for s in steps] == [6.0, 0.0, 6.0, 6.0] and all(s.dtype == torch.float32 for s in steps)
    with pytest.raises(ValueError, match="device_steps"):  # CPU counters are refused with a CUDA-less hint
        F.fused_adamw_step(runs[0][0], grads[0], runs[0][1], runs[0][2], [torch.zeros(2) for _ in shapes], active,
                           chunk_size=64, device_steps=True, **hp)


@pytest.mark.usefixtures("several_tiles")
@pytest.mark.parametrize("device_steps, dtype, ord", [(False, torch.float32, 1), (False, torch.float32, 4),
                                                      (True, torch.float32, 2), (True, torch.bfloat16, 4),
                                                      (False, torch.bfloat16, 1)])
def test_prepared_adamw_equals_fused_adamw_step(device_steps, dtype, ord):
    """PreparedAdamW (checked once, counters in one tensor, O(1) host work a call) gives fused_adamw_step's
    params, moments, counters and sums bit for bit: uniform counters, then counters that differ (one
    tensor joined later), metric on and off; bf16 with moments in the param dtype."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(37,), (16, 9), (1,), (300,)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    start = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(5)]
    sdt = dtype  # bf16: torch's layout, moments in the param dtype
    runs = []
    for prepared in (False, True):
        params = [p.clone() for p in start]
        m, v = [torch.zeros(s, dtype=sdt) for s in shapes], [torch.zeros(s, dtype=sdt) for s in shapes]
        counters = torch.tensor([3.0, 3.0, 0.0, 3.0])  # tensor 2 joins late: its counter lags behind
        steps = [counters[i] for i in range(len(shapes))]
        g = [torch.empty(s, dtype=dtype) for s in shapes]
        run = None
        sums = []
        for k, values in enumerate(grads):
            for buf, x in zip(g, values):
                buf.copy_(x)
            call = dict(ord=ord, metric=k % 2 == 0, **hp)
            if prepared:
                if run is None:
                    run = F.PreparedAdamW(params, g, m, v, counters, device_steps=device_steps,
                                          states_in_param_dtype=dtype != torch.float32, chunk_size=64)
                sums.append(run.step(**call))
            else:
                sums.append(F.fused_adamw_step(params, g, m, v, steps, [True] * 4, chunk_size=64,
                                               device_steps=device_steps,
                                               states_in_param_dtype=dtype != torch.float32, **call))
        runs.append((params, m, v, [counters], sums))
    for host, prep in zip(*runs):
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(host, prep))
    assert runs[1][3][0].tolist() == [8.0, 8.0, 5.0, 8.0]
    with pytest.raises(ValueError, match="counters must be a 1-D float tensor of 4"):
        F.PreparedAdamW(runs[1][0], g, runs[1][1], runs[1][2], torch.zeros(3))
    with pytest.raises(ValueError, match="grads"):
        F.PreparedAdamW(runs[1][0], g[:3], runs[1][1], runs[1][2], torch.zeros(4))


@pytest.mark.usefixtures("several_tiles")
def test_prepared_adamw_uniform_counters_take_one_coefficient_set(monkeypatch):
    """Uniform CPU counters: the bias corrections are formed once per call, not once per tensor."""
    seen = []
    real = F._host_coefficient
    monkeypatch.setattr(F, "_host_coefficient", lambda *a: seen.append(a[0]) or real(*a))
    params = [torch.randn(10) for _ in range(6)]
    run = F.PreparedAdamW(params, [torch.randn(10) for _ in params], [torch.zeros(10) for _ in params],
                          [torch.zeros(10) for _ in params], torch.zeros(6), chunk_size=64)
    for _ in range(3):
        run.step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    assert seen == [1.0, 2.0, 3.0]


@pytest.mark.usefixtures("several_tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adamw_update_snr_matches_the_reference_reading(dtype):
    """ord=4: Σ|m̂/(√v̂+ε)| from the pass's own fp32 moments, against the twin and against the
    reference path's reading of the stored state (magnitudes.update_snr_sums, in float64 here)."""
    from grades_optim import magnitudes

    gen = torch.Generator().manual_seed(21)
    shapes = [(37,), (16, 9), (1,), (0,), (300,)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, states_in_param_dtype=True)
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    m, v = [torch.zeros(s, dtype=dtype) for s in shapes], [torch.zeros(s, dtype=dtype) for s in shapes]
    steps = [torch.tensor(0.0) for _ in shapes]
    active = [True, True, True, True, False]
    for k in range(6):
        grads = [(torch.randn(s, generator=gen) + 0.3).to(dtype) for s in shapes]
        twin = ([p.clone() for p in params], [x.clone() for x in m], [x.clone() for x in v], [x.clone() for x in steps])
        want = F.torch_fused_adamw_step(twin[0], grads, twin[1], twin[2], twin[3], active, ord=4, **hp)
        got = F.fused_adamw_step(params, grads, m, v, steps, active, ord=4, chunk_size=64, **hp)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        live = [i for i, a in enumerate(active) if a and params[i].numel()]
        states = [{"exp_avg": m[i].double(), "exp_avg_sq": v[i].double(), "step": steps[i]} for i in live]
        ref = magnitudes.update_snr_sums([params[i] for i in live], states, [(0.9, 0.99)] * len(live),
                                         [1e-8] * len(live))
        # bf16: the reference reads the stored (rounded) moments, the kernel the fp32 ones
        torch.testing.assert_close(got[live], ref.float(), rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5)
        assert got[4] == 0
