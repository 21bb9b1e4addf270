"""memsched's own fused kernels: Triton, each with a PyTorch fallback.

Every public function picks its implementation by ``backend(*tensors)``: Triton when it imports
and the tensors are on CUDA, or when ``TRITON_INTERPRET=1`` (Triton's interpreter, on CPU);
otherwise the PyTorch fallback. ``impl="torch"`` / ``impl="triton"`` forces one.

``PATTERNS`` says, for each kernel, the ATen ops it replaces, for a fusion pass matching the
captured graph. ``export`` lists the pre-dispatch ops ``torch.export`` gives (the inference
capture); ``joint`` the decomposed ops of the joint forward+backward trace (make_fx). The
patterns are data only here: frontend/kernel_patterns.py finds the RMSNorm and rotary ones in a
captured graph and calls the operators of ``ops`` (``torch.ops.memsched.*``) instead;
frontend/loss_head.py finds the LM head's.

``ctc`` is an operator of another kind: ATen's CTC loss kernel named so that its output sizes
are known from its inputs' shapes (``torch.ops.memsched.ctc_loss``, chosen by
frontend/ctc_targets.py), no Triton version; so is ``counted``: a mask's nonzero positions at a
count capture read off the call's inputs (``torch.ops.memsched.nonzero_counted``, chosen by
frontend/counted_selections.py); and ``attention``: PyTorch's attention saving only its inputs, its
backward recomputing it (``torch.ops.memsched.scaled_dot_product_attention``, which a training step
traced on the CPU for a GPU runs: frontend/joint.py).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from . import attention, counted, ctc, ops  # noqa: F401  (register the torch.ops.memsched operators and backwards)
from ._select import Backend, backend, interpreter_ready, triton_import_error
from .cross_entropy import fused_linear_cross_entropy
from .norms import layer_norm, rms_norm
from .rotary import rotary_embedding

__all__ = ["Backend", "KernelPattern", "PATTERNS", "backend", "fused_linear_cross_entropy",
           "layer_norm", "rms_norm", "rotary_embedding", "runs_triton"]


def runs_triton(device_type: str) -> bool:
    """Whether the kernels run Triton on tensors of ``device_type`` here: on CUDA when Triton
    imports, anywhere under Triton's interpreter (``TRITON_INTERPRET=1`` set before import)."""
    if interpreter_ready():
        return True
    return device_type == "cuda" and triton_import_error() is None


class KernelPattern(NamedTuple):
    kernel: Callable
    export: tuple[str, ...]  # the chain of ops in torch.export's graph, in order
    joint: tuple[str, ...]  # the same in a decomposed (make_fx) trace
    notes: str


PATTERNS: dict[str, KernelPattern] = {
    "rms_norm": KernelPattern(
        rms_norm,
        ("aten.to.dtype(float32)", "aten.pow.Tensor_Scalar(2)", "aten.mean.dim(-1, keepdim)",
         "aten.add.Tensor(eps)", "aten.rsqrt", "aten.mul.Tensor(x)", "aten.to.dtype(x.dtype)",
         "aten.mul.Tensor(weight)"),
        ("aten._to_copy?", "aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor",
         "aten.rsqrt", "aten.mul.Tensor", "aten._to_copy?", "aten.mul.Tensor"),
        "x -> rms_norm(x, weight, eps); the casts (?) are absent when x is float32; eps is the "
        "add's scalar; the reduction must be over the last dim only. In a captured graph: "
        "torch.ops.memsched.rms_norm (ops.py), chosen by frontend/kernel_patterns.py"),
    "layer_norm": KernelPattern(
        layer_norm,
        ("aten.layer_norm(x, [N], weight, bias, eps)",),
        ("aten.native_layer_norm(x, [N], weight, bias, eps) -> getitem 0",),
        "normalized_shape must be the last dim only (one dim); weight/bias may be None"),
    "rotary_embedding": KernelPattern(
        rotary_embedding,
        ("aten.unsqueeze(cos, 1)", "aten.unsqueeze(sin, 1)", "aten.mul.Tensor(q, cos)",
         "aten.slice(q, -1, D/2, end)", "aten.neg", "aten.slice(q, -1, 0, D/2)",
         "aten.cat([-x2, x1], -1)", "aten.mul.Tensor(_, sin)", "aten.add.Tensor",
         "(the same five ops from mul for k)"),
        ("aten.unsqueeze", "aten.mul.Tensor", "aten.slice.Tensor", "aten.neg", "aten.slice.Tensor",
         "aten.cat", "aten.mul.Tensor", "aten.add.Tensor"),
        "q and k share cos/sin; one of them alone is rotary_embedding with the other output "
        "unused; cos/sin must not require grad for the Triton path. In a captured graph: "
        "torch.ops.memsched.rope per tensor (ops.py), chosen by frontend/kernel_patterns.py"),
    "fused_linear_cross_entropy": KernelPattern(
        fused_linear_cross_entropy,
        ("aten.linear(hidden, weight, bias)", "aten.view(-1, V)", "aten.view(target, -1)",
         "aten.cross_entropy_loss(logits, target, weight=None, reduction, ignore_index, "
         "label_smoothing=0)"),
        ("aten.t(weight)", "aten.view(hidden, [-1, H])", "aten.mm | aten.addmm",
         "aten._unsafe_view", "aten.view(-1, V)", "aten._log_softmax",
         "aten.nll_loss_forward(logp, target, None, reduction, ignore_index) -> getitem 0"),
        "the logits must have no other user (else they are materialised anyway); no class "
        "weights, no label smoothing; reduction codes 0/1/2 = none/mean/sum"),
}
