"""The ops the rewriting passes insert into a scheduled graph.

They are fx call targets, so a scheduled program prints as Python that names them; the
executor gives them their meaning (``runtime/executor.py``). Calling one directly is a bug.
"""
from __future__ import annotations


def _not_callable(name):
    def op(*args, **kwargs):
        raise RuntimeError(f"memsched.{name} only runs inside a scheduled program")

    op.__name__ = op.__qualname__ = name
    return op


# prefetch(src) -> pending: start copying a host/disk tensor into a fresh device buffer
prefetch = _not_callable("prefetch")
# wait(pending) -> tensor: block until that copy landed; the device tensor it returns
wait = _not_callable("wait")
# offload(x, tier) -> handle: start copying device tensor x to "host" or "disk"
offload = _not_callable("offload")
# free(*xs): drop device references (after any offload reading them has finished) or handles
free = _not_callable("free")

# boundary(*outputs) -> tangents: a training step's forward ends here; the program hands the
# forward outputs to autograd and resumes with the gradients of those outputs (backward)
boundary = _not_callable("boundary")

INSERTED_OPS = (prefetch, wait, offload, free, boundary)
