"""Checks a model makes on its values only to raise, taken as asserts while it is traced.

``if labels.max() >= self.config.vocab_size: raise ValueError(...)`` (every CTC head in
transformers), ``assert (x >= 0).all()``, torch.distributions' ``if not valid: raise`` on its
parameters: each reads a tensor's value in Python, a branch on data that torch.export refuses,
so the whole model could not be captured. Yet such a branch has one way on and one way to an
error, and eager takes the way on for every input it runs. While a model is traced, a tensor
(or a symbolic bool) whose truth the trace cannot know is therefore answered with the value
that goes on, when the bytecode of the frame asking shows that the other value leads straight to
a ``raise`` (no other branch, loop or ``try`` on the way). The answer is recorded as
the assert torch writes for traced code (``torch._check``), which capture drops like the model's
own asserts on values (``capture.drop_asserts``): the compiled program does not raise where
eager would have on invalid data made inside the model. ``if mask.any(): x[mask] = v`` is
answered true as well: the write it skips writes nothing (``_guards_a_masked_write``). A branch
on a value the call's inputs alone make, a check included, is decided by that value
(input_values.py: a guard keying the program, not an assert): a call whose labels a CTC head
refuses is captured anew and raises the model's own error, as eager does. Any other branch on
data is still refused by name.
"""
from __future__ import annotations

import contextlib
import dis
import functools
import sys
import threading
import types

import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

# jumps that pop the value whose truth they test: (jumps when the value is this)
_TESTS = {name: "TRUE" in name for name in dis.opmap
          if name.startswith("POP_JUMP") and (name.endswith("IF_TRUE") or name.endswith("IF_FALSE"))}
_ALWAYS = {"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_ABSOLUTE", "JUMP", "JUMP_NO_INTERRUPT",
           "JUMP_BACKWARD_NO_INTERRUPT"}
_BRANCHES = set(dis.hasjrel) | set(dis.hasjabs)
_LOCK = threading.RLock()


@contextlib.contextmanager
def value_checks_as_asserts(decide=None):
    """On this thread, answer a raise-only branch on data as described above; any other with
    ``decide(value)`` (True, False, or None where it cannot say: input_values.py reads a value the
    call's inputs alone make)."""
    me = threading.get_ident()
    with _LOCK:
        saved = [(cls, cls.__dict__.get("__bool__")) for cls in (torch.Tensor, torch.SymBool)]
        for cls, own in saved:
            cls.__bool__ = _answering(me, own or getattr(cls, "__bool__"), decide)
        try:
            yield
        finally:
            for cls, own in saved:
                if own is None:
                    del cls.__bool__
                else:
                    cls.__bool__ = own


def _answering(thread: int, truth, decide):
    def __bool__(value):
        if threading.get_ident() != thread:
            return truth(value)
        try:
            return truth(value)
        except GuardOnDataDependentSymNode as exc:
            asking = sys._getframe(1)
            if _guards_a_masked_write(asking):
                return True   # either way is eager's: nothing to record
            # a value the inputs alone make is the call's own: a guard of the program, not an
            # assert, so a call whose data a check refuses raises the model's error, as in eager
            decided = decide(value) if decide is not None else None
            if decided is not None:
                return decided
            answer = _way_on(asking)
            if answer is None:
                exc.asked_at = (asking.f_code.co_filename, asking.f_lineno)   # for the error's message
                raise
        if isinstance(value, torch.Tensor):
            held = value.bool()
            torch._check_tensor_all(held if answer else held.logical_not())
        else:
            torch._check(value if answer else torch.sym_not(value))
        return answer
    return __bool__


def _way_on(frame: types.FrameType) -> bool | None:
    """The truth value with which ``frame``'s pending jump avoids a ``raise`` it would otherwise
    run straight into; None when neither or both ways raise."""
    code = frame.f_code
    instructions, at = _instructions(code)
    i = at.get(frame.f_lasti)
    if i is not None and instructions[i].opname == "TO_BOOL":   # Python 3.13: the test follows
        i += 1
    if i is None or i + 1 >= len(instructions) or instructions[i].opname not in _TESTS:
        return None
    jump = instructions[i]
    jumps_on = _TESTS[jump.opname]
    raises = {jumps_on: _raises(code, jump.argval), not jumps_on: _raises(code, instructions[i + 1].offset)}
    if raises[True] == raises[False]:
        return None
    return not raises[True]


def _guards_a_masked_write(frame: types.FrameType) -> bool:
    """``if mask.any(): x[mask] = v``: the branch only skips a write through ``mask`` that writes
    nothing when no element of ``mask`` is set, so taking it is what eager does either way. Read
    from the bytecode: the value tested is ``<local>.any()`` of a boolean tensor, and the way in
    runs straight (no jump, return, raise or other store) to one ``<...>[<that local>] = ...``
    that ends just where the other way lands."""
    code = frame.f_code
    instructions, at = _instructions(code)
    i = at.get(frame.f_lasti)
    if i is not None and instructions[i].opname == "TO_BOOL":
        i += 1
    if i is None or i < 3 or instructions[i].opname not in _TESTS or _TESTS[instructions[i].opname]:
        return False   # not a jump over the way in taken when the value is false
    before = [ins for ins in instructions[:i] if ins.opname not in ("PRECALL", "TO_BOOL")][-3:]
    if [ins.opname for ins in before] != ["LOAD_FAST", before[1].opname, "CALL"] \
            or before[1].opname not in ("LOAD_METHOD", "LOAD_ATTR") or before[1].argval != "any" or before[2].arg != 0:
        return False
    mask = frame.f_locals.get(before[0].argval)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return False
    end = at.get(instructions[i].argval)
    body = instructions[i + 1:end] if end is not None else []
    if len(body) < 3 or body[-1].opname != "STORE_SUBSCR" or body[-2].opname != "LOAD_FAST" \
            or body[-2].argval != before[0].argval:
        return False
    return not any(ins.opcode in _BRANCHES or ins.opname.startswith(("RETURN", "RAISE", "STORE", "DELETE", "IMPORT"))
                   for ins in body[:-1])


def _raises(code: types.CodeType, offset: int) -> bool:
    """Does the code from ``offset`` run straight (following unconditional jumps) into a raise
    that no ``try`` in this frame catches?"""
    instructions, at = _instructions(code)
    i = at.get(offset)
    for _ in range(256):
        if i is None or i >= len(instructions):
            return False
        ins = instructions[i]
        if ins.opname == "RAISE_VARARGS":
            return not any(e.start <= ins.offset < e.end for e in _handlers(code))
        if ins.opname in _ALWAYS:
            i = at.get(ins.argval)
        elif ins.opcode in _BRANCHES or ins.opname.startswith("RETURN"):
            return False
        else:
            i += 1
    return False


@functools.lru_cache(maxsize=512)
def _instructions(code: types.CodeType):
    instructions = list(dis.get_instructions(code))
    return instructions, {ins.offset: i for i, ins in enumerate(instructions)}


@functools.lru_cache(maxsize=512)
def _handlers(code: types.CodeType) -> tuple:
    return tuple(getattr(dis.Bytecode(code), "exception_entries", ()))
