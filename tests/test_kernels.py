"""memsched.kernels: the Triton kernels (run by Triton's interpreter on CPU, TRITON_INTERPRET=1)
against their PyTorch fallbacks and against plain PyTorch autograd, outputs and gradients.

Tolerances. float32: rtol = atol = 1e-5. The kernels compute the same sums as the references in
another order (chunked rows, the online logsumexp over vocabulary blocks, dweight summed per row
block then over blocks), so they agree to a few float32 ulps, not bit for bit.
bfloat16: the reference is autograd in float32 on the same (bf16-rounded) inputs; the kernels
keep float32 statistics but their inputs to and outputs from the matmuls and the kernels are
rounded to bf16 (8 significant bits, relative step 2**-8 = 0.4%), and a sum of rounded terms
can lose a few of those steps: rtol = atol = 3e-2. Worst seen: Triton 30% of it; PyTorch's own
bf16 F.layer_norm backward (the fallback) 80%, in dweight.
Triton against the fallback in bf16, the same 3e-2: the fallbacks (the PyTorch composites)
round intermediate results to bf16 (RMSNorm's weight * x_hat.to(bf16), rotary's three bf16
ops, each autograd step of their backward) where Triton rounds once from float32.

Triton's interpreter needs TRITON_INTERPRET=1 before triton is first imported (``triton.jit``
decorates tl.sum/tl.max then, for the compiler or the interpreter), and a test session has
usually imported triton already (torch.export does). So the Triton cases are skipped in this
process unless it was started with TRITON_INTERPRET=1, and
``test_triton_kernels_under_the_interpreter`` runs this file again in a subprocess that is.
"""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import memsched.kernels as K
from memsched.kernels import _select
from memsched.kernels.norms import rms_norm_torch
from memsched.kernels.rotary import rotary_embedding_torch
from helpers import FIXED_CPU

IN_INTERPRETER = _select.interpreter_ready()
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not IN_INTERPRETER, reason="needs TRITON_INTERPRET=1 before triton is imported: "
                               "test_triton_kernels_under_the_interpreter runs it"))]
DTYPES = [torch.float32, torch.bfloat16]  # the interpreter supports bf16 (numpy via float32)
REF_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
PAIR_TOL = REF_TOL  # Triton vs fallback: see the docstring
LAUNCHERS = ("ce_forward", "ce_backward_", "norm_forward", "norm_backward", "rope")


@pytest.fixture
def launches(monkeypatch):
    """Under the interpreter: small blocks (so shapes span several blocks with ragged tails),
    and a count of the launches of each kernel, proving which path ran."""
    counts = dict.fromkeys(LAUNCHERS, 0)
    if not IN_INTERPRETER:
        return counts
    kernels = _select.triton_kernels()
    assert kernels.INTERPRET
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", 32)
    monkeypatch.setattr(kernels, "MAX_BLOCK_ELEMS", 256)
    monkeypatch.setattr(kernels, "MAX_PARTIALS", 2)   # a norm's backward programs loop over row blocks
    for name in LAUNCHERS:
        def counted(*args, _f=getattr(kernels, name), _n=name, **kw):
            counts[_n] += 1
            return _f(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    return counts


def _leaves(tensors, dtype):
    """Fresh leaves requiring grad: floating tensors cast to ``dtype``, others as they are."""
    return [t.detach().to(dtype).requires_grad_() if t is not None and t.is_floating_point()
            else t for t in tensors]


def _run(fn, tensors, dtype, seed=1):
    """fn's outputs and the gradients of its floating inputs, as float32, for a fixed random
    output gradient."""
    args = _leaves(tensors, dtype)
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    grad_outs = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(outs, wrt, grad_outs)
    return [t.float() for t in (*outs, *grads)]


def _close(got, want, tol, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{what}, tensor {i}: {m}")


def _check(fn, ref, tensors, dtype, impl, launches, kernels):
    """``impl`` vs autograd (in float32 for bf16 inputs); Triton also vs the fallback."""
    tensors = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]
    got = _run(lambda *a: fn(*a, impl=impl), tensors, dtype)
    assert all((launches[k] > 0) == (impl == "triton") for k in kernels), launches
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    _close(got, _run(ref, tensors, ref_dtype), REF_TOL[dtype], f"{impl} vs autograd")
    if impl == "triton":
        return got, _run(lambda *a: fn(*a, impl="torch"), tensors, dtype)
    return None, None


# ---------------------------------------------------------------- fused linear cross-entropy
def _ce_inputs(rows_shape, hidden, vocab, bias, ignore_index, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*rows_shape, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) / hidden ** 0.5
    b = torch.randn(vocab, generator=gen) if bias else None
    t = torch.randint(0, vocab, rows_shape, generator=gen)
    t.view(-1)[::3] = ignore_index  # every third row ignored
    return h, w, b, t


def _ce_reference(ignore_index, reduction):
    def ref(h, w, b, t):
        logits = F.linear(h, w, b)
        loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction)
        return loss.reshape(t.shape) if reduction == "none" else loss
    return ref


# (rows, hidden, vocab, chunk): ragged chunks and vocab blocks (block 32); exact multiples; 3-D
CE_SHAPES = [((20,), 8, 100, 7), ((16,), 16, 64, 16), ((2, 5), 8, 33, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CE_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_cross_entropy(launches, impl, dtype, shape, reduction):
    rows, hidden, vocab, chunk = shape
    ignore_index = -100 if reduction != "sum" else 5  # an ignored class inside the vocabulary
    tensors = _ce_inputs(rows, hidden, vocab, bias=reduction != "mean", ignore_index=ignore_index)

    def fn(h, w, b, t, impl):
        return K.fused_linear_cross_entropy(h, w, t, b, chunk_size=chunk, ignore_index=ignore_index,
                                            reduction=reduction, impl=impl)
    ref = _ce_reference(ignore_index, reduction)
    tri, fallback = _check(fn, ref, tensors, dtype, impl, launches, ("ce_forward", "ce_backward_"))
    if tri is not None:
        _close(tri, fallback, PAIR_TOL[dtype], "triton vs fallback")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op returns; bytes, because the interpreter
    copies tensors to and from the host as byte storages."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_never_materialises_the_logits(launches, impl):
    # hidden < chunk, so [vocab, hidden] (the weight gradient) is smaller than a logits chunk
    n, hidden, vocab, chunk = 64, 8, 100, 16
    h, w, b, t = _leaves(_ce_inputs((n,), hidden, vocab, True, -100), torch.float32)
    with _LargestTensor() as mode:
        loss = K.fused_linear_cross_entropy(h, w, t, b, chunk_size=chunk, impl=impl)
        torch.autograd.grad(loss, (h, w, b))
    assert mode.largest <= chunk * vocab * 4 < n * vocab * 4, mode.largest  # float32 logits
    with _LargestTensor() as reference:  # the measure sees the unfused logits
        F.cross_entropy(F.linear(h, w, b), t).backward()
    assert reference.largest >= n * vocab * 4


@pytest.mark.parametrize("shift", [False, True], ids=["whole", "shifted"])
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_reading_the_callers_logits(impl, shift):
    """Given the logits the caller holds (a model returning them), the kernel reads them in
    blocks of rows -- a shifted batch, no single [N, V] view, in blocks per sequence -- with the
    same loss and gradients as autograd through the linear, and leaves them as they were."""
    h, w, b, t = _ce_inputs((3, 7), 8, 40, True, -100)
    h, w, b = (x.clone().requires_grad_(True) for x in (h, w, b))
    logits = F.linear(h, w, b)
    kept = logits.detach().clone()
    rows = (slice(None), slice(None, -1)) if shift else (slice(None),)
    got = K.fused_linear_cross_entropy(h[rows], w, t[rows], b, chunk_size=4, impl=impl, logits=logits[rows])
    got_grads = torch.autograd.grad(got, (h, w, b))
    want = F.cross_entropy(logits[rows].reshape(-1, 40), t[rows].reshape(-1))
    want_grads = torch.autograd.grad(want, (h, w, b))
    torch.testing.assert_close(got, want, **REF_TOL[torch.float32])
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r, **REF_TOL[torch.float32])
    assert torch.equal(logits.detach(), kept)
    with pytest.raises(ValueError, match="are not hidden"):
        K.fused_linear_cross_entropy(h, w, t, b, logits=logits[:, :-1])


def test_cross_entropy_reading_shifted_logits_traces():
    """Traced as a training step is (a fused step's loss reading the logits a model returns,
    shifted): the blocks per sequence are taken without trying the [N, V] view first (a FakeTensor
    refused it with a ValueError where eager raises a RuntimeError, and the joint trace failed on
    BLIP's captioning loss; a failed view also left its node in the graph)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memsched.frontend.fake import eager_meta

    h, w, b, t = _ce_inputs((3, 7), 8, 40, True, -100)

    def step(h, w, b, t):
        logits = F.linear(h, w, b)
        return K.fused_linear_cross_entropy(h[:, :-1], w, t[:, :-1], b, chunk_size=4, impl="torch",
                                            logits=logits[:, :-1])

    with eager_meta():   # as frontend/joint.py traces
        graph = make_fx(step, tracing_mode="fake")(h, w, b, t)
    torch.testing.assert_close(graph(h, w, b, t), step(h, w, b, t), rtol=0, atol=0)


def test_cross_entropy_all_rows_ignored_gives_nan_like_torch():
    h, w, b, t = _ce_inputs((6,), 4, 10, False, -100)
    t.fill_(-100)
    got = K.fused_linear_cross_entropy(h, w, t, impl="torch")
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(F.linear(h, w), t))


# ---------------------------------------------------------------- RMSNorm / LayerNorm
# rows x features: 14 rows in blocks of 4 with N=48 padded to 64; N a power of two; 1 row
NORM_SHAPES = [(2, 7, 48), (3, 64), (1, 33)]


def _norm_inputs(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    return (torch.randn(shape, generator=gen) * 3 + 1, 1 + torch.randn(n, generator=gen) / 4,
            torch.randn(n, generator=gen))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_rms_norm(launches, impl, dtype, shape, affine):
    x, w, _ = _norm_inputs(shape)
    w = w if affine else None
    fn = lambda x, w, impl: K.rms_norm(x, w, 1e-6, impl=impl)  # noqa: E731
    ref = lambda x, w: rms_norm_torch(x, w, 1e-6)  # noqa: E731
    tri, fallback = _check(fn, ref, (x, w), dtype, impl, launches, ("norm_forward", "norm_backward"))
    if tri is not None:
        _close(tri, fallback, PAIR_TOL[dtype], "triton vs fallback")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_norm(launches, impl, dtype, shape, bias):
    x, w, b = _norm_inputs(shape)
    b = b if bias else None
    fn = lambda x, w, b, impl: K.layer_norm(x, w, b, 1e-5, impl=impl)  # noqa: E731
    ref = lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-5)  # noqa: E731
    tri, fallback = _check(fn, ref, (x, w, b), dtype, impl, launches, ("norm_forward", "norm_backward"))
    if tri is not None:
        _close(tri, fallback, PAIR_TOL[dtype], "triton vs fallback")


# ---------------------------------------------------------------- rotary embedding
# (q shape, k heads, cos/sin shape, unsqueeze_dim): D=24 (half 12, padded to 16); GQA k;
# tables broadcast over the batch; the [B, S, H, D] layout
ROPE_CASES = [((2, 3, 5, 24), 1, (2, 5, 24), 1), ((2, 4, 7, 8), 4, (1, 7, 8), 1),
              ((2, 5, 3, 24), 2, (2, 5, 24), 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ROPE_CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_rotary_embedding(launches, impl, dtype, case):
    q_shape, k_heads, table, dim = case
    gen = torch.Generator().manual_seed(0)
    k_shape = list(q_shape)
    k_shape[dim] = k_heads
    q, k = torch.randn(q_shape, generator=gen), torch.randn(k_shape, generator=gen)
    angles = torch.randn(table, generator=gen)  # tables differ in both halves: the general case
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    fn = lambda q, k, impl: K.rotary_embedding(q, k, cos, sin, dim, impl=impl)  # noqa: E731
    ref = lambda q, k: rotary_embedding_torch(q, k, cos.float(), sin.float(), dim)  # noqa: E731
    tri, fallback = _check(fn, ref, (q, k), dtype, impl, launches, ("rope",))
    if tri is not None:
        _close(tri, fallback, PAIR_TOL[dtype], "triton vs fallback")


@pytest.mark.skipif(not IN_INTERPRETER, reason="needs TRITON_INTERPRET=1 before triton is imported")
def test_rotary_with_tables_requiring_grad_uses_the_fallback(launches):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cos = torch.randn(1, 3, 8, requires_grad=True)
    qe, _ = K.rotary_embedding(q, k, cos, torch.randn(1, 3, 8))
    assert launches["rope"] == 0 and qe.requires_grad


# ---------------------------------------------------------------- choosing the implementation
def test_backend_without_cuda_or_interpreter_is_the_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    chosen = K.backend(torch.zeros(1))
    assert chosen.name == "torch" and "cpu" in chosen.reason and "TRITON_INTERPRET" in chosen.reason
    with pytest.raises(RuntimeError, match="cannot run here"):
        K.rms_norm(torch.ones(2, 4), torch.ones(4), impl="triton")
    with pytest.raises(ValueError, match="impl must be"):
        K.rms_norm(torch.ones(2, 4), torch.ones(4), impl="cuda")


@pytest.mark.skipif(not IN_INTERPRETER, reason="needs TRITON_INTERPRET=1 before triton is imported")
def test_backend_with_the_interpreter_is_triton(launches):
    chosen = K.backend(torch.zeros(1))
    assert chosen.name == "triton" and "TRITON_INTERPRET" in chosen.reason
    K.rms_norm(torch.ones(2, 4), torch.ones(4))  # no impl: the backend decides
    assert launches["norm_forward"] == 1


def test_fallback_runs_when_triton_is_not_chosen(monkeypatch, launches):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 8)
    torch.testing.assert_close(K.rms_norm(x, None), rms_norm_torch(x, None, 1e-6), rtol=0, atol=0)
    assert launches["norm_forward"] == 0


def test_every_kernel_names_the_pattern_it_replaces():
    assert set(K.PATTERNS) == {"rms_norm", "layer_norm", "rotary_embedding",
                               "fused_linear_cross_entropy"}
    for name, pattern in K.PATTERNS.items():
        assert pattern.kernel is getattr(K, name) and pattern.export and pattern.joint


def test_interpret_set_after_triton_was_imported_falls_back(monkeypatch):
    pytest.importorskip("triton")
    if IN_INTERPRETER:
        pytest.skip("triton was imported under the interpreter in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    chosen = K.backend(torch.zeros(1))
    assert chosen.name == "torch" and "after triton was imported" in chosen.reason


@pytest.mark.skipif(IN_INTERPRETER, reason="this process is the interpreter run")
def test_triton_kernels_under_the_interpreter():
    """This file again, in a process started with TRITON_INTERPRET=1: every case runs."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-x"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    passed = int(re.search(r"(\d+) passed", tail).group(1))
    skipped = re.search(r"(\d+) skipped", tail)
    assert passed > 100 and (skipped is None or int(skipped.group(1)) <= 2), tail


# ---------------------------------------------------------------- the graph's ops (kernels/ops.py)
# Which side the ops run is this process's: Triton under the interpreter, else the fallback,
# which is the composite op for op (bit for bit, layouts included).
OPS_ON = "triton" if IN_INTERPRETER else "torch"
OPS_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _op_run(fn, x, *others, residual=False, grad_seed=1):
    """fn(x, *others) (+ x with ``residual``: a second reader of x), its output and the
    gradients of x and of the 1-D others (weights)."""
    x = x.detach().clone().requires_grad_()
    others = [o.detach().clone().requires_grad_() if o is not None and o.is_floating_point() and o.dim() == 1
              else o for o in others]
    y = fn(x, *others)
    out = y + x if residual else y
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    wrt = [x] + [o for o in others if isinstance(o, torch.Tensor) and o.requires_grad]
    return [y, *torch.autograd.grad(out, wrt, g)]


def _op_compare(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        if OPS_ON == "torch":
            assert a.stride() == b.stride(), (i, a.stride(), b.stride())
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"tensor {i}: {m}")
        else:
            assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["rows", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)   # bf16: the model's upcast inside the op
def test_rms_norm_op_is_the_composite(launches, cast, affine, layout, dtype):
    x, w, _ = _norm_inputs((2, 7, 48))
    x = (x if layout == "rows" else x.transpose(0, 1).contiguous().transpose(0, 1)).to(dtype)
    w = w if affine else None

    def composite(x, w):
        x = x.to(torch.float32)
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        y = y.to(cast) if cast is not None else y
        return w * y if w is not None else y

    # x read by a residual too: the op's two parts of dx are added to its gradient as autograd adds the composite's
    got = _op_run(lambda x, w: torch.ops.memsched.rms_norm(x, x, w, 1e-6, cast)[0], x, w, residual=True)
    _op_compare(got, _op_run(composite, x, w, residual=True), OPS_TOL[torch.bfloat16 if torch.bfloat16 in (cast, dtype)
                                                                       else torch.float32])
    assert (launches["norm_forward"] > 0 and launches["norm_backward"] > 0) == (OPS_ON == "triton")


@pytest.mark.parametrize("case", ["heads_first", "heads_second", "partial"])
def test_rope_op_is_the_composite(launches, case):
    gen = torch.Generator().manual_seed(0)
    b, h, s, d = 2, 3, 5, 8
    tables = torch.randn(2, b, s, d, generator=gen)
    if case == "heads_second":   # [B, S, H, D], tables unsqueezed at 2
        x, cos, sin = torch.randn(b, s, h, d, generator=gen), tables[0][:, :, None], tables[1][:, :, None]
    else:   # q as attention makes it: a transposed view of [B, S, H, D]
        x = torch.randn(b, s, h, 2 * d if case == "partial" else d, generator=gen).transpose(1, 2)
        x = x[..., :d] if case == "partial" else x
        cos, sin = tables[0][:, None], tables[1][:, None]

    def composite(x, cos, sin):
        return x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1) * sin

    def op(x, cos, sin):
        return torch.ops.memsched.rope(x, cos, sin, False)

    _op_compare(_op_run(op, x, cos, sin), _op_run(composite, x, cos, sin), OPS_TOL[torch.float32])
    assert (launches["rope"] >= 2) == (OPS_ON == "triton")


def test_a_compiled_decoder_runs_the_kernel_ops(launches):
    """A training step of a LLaMA with the ops chosen by ``kernels="auto"`` where they run
    Triton (the interpreter here), forced elsewhere: loss and gradients against eager."""
    import transformers as T

    import memsched

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    model = T.LlamaForCausalLM(config).train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    ref_loss = ref(ids, labels=ids).loss
    ref_loss.backward()
    kernels = "auto" if IN_INTERPRETER else True
    compiled = memsched.compile(model, "1GB", train=True, device="cpu", hardware=FIXED_CPU, kernels=kernels)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert "kernels: 5 rms_norm, 8 rope" in compiled.plan.passes[0].note
    assert (launches["norm_backward"] > 0 and launches["rope"] > 0) == (OPS_ON == "triton")
    tol = OPS_TOL[torch.float32] if OPS_ON == "triton" else dict(rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, **tol)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, **tol, msg=name)
