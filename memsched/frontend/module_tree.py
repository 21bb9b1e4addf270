"""The module tree a program was traced from, checked at each call of the compiled module.

A captured program is the model as it was when traced: a submodule replaced afterwards (an
activation swapped, an adapter inserted, a layer appended or deleted) or a hook a user
registered or removed since would change what eager runs and not what the program runs, and
the outputs would be silently stale. Parameters replaced or changed are the executor's to see
(runtime/executor.py); this is the rest of the tree. A call that finds it changed plans again,
as torch.compile recompiles, and says what changed.

The settings of a transformers model's config are checked too (``output_hidden_states``, the
attention implementation): a forward reads them as it runs. Other attributes a forward reads
(``self.scale = 2.0`` set after compiling) are not checked: walking every module's attributes
would cost milliseconds per call.

Submodules' training flags are not a change of the tree but part of a call's signature (a
frozen batch norm in eval inside a model in training plans its own program), so one walk gives
both.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .hooks import user_hooks

_FORWARD = ("_forward_hooks", "_forward_pre_hooks")
_BACKWARD = ("_backward_hooks", "_backward_pre_hooks")
_GLOBAL = ("_global_forward_hooks", "_global_forward_pre_hooks")


def modules_of(model: torch.nn.Module) -> list:
    """The model's modules, each once, breadth first: this runs at every call, and walks a
    32-layer LLaMA's 423 modules in a fifth of a millisecond (``model.modules()``, which makes
    every name, takes half a millisecond)."""
    order, seen = [model], {id(model)}
    for m in order:   # the list grows as it is read
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                order.append(child)
    return order


def _names(model: torch.nn.Module, mods: list) -> tuple[str, ...]:
    named = {id(m): name for name, m in model.named_modules()}
    return tuple(named[id(m)] for m in mods)


def _hook_keys(modules: list, kinds: tuple) -> tuple:
    """(index of the module, kind, the handles' ids) for each kind of user hook present."""
    found = []
    for i, m in enumerate(modules):
        d = m.__dict__
        for kind in kinds:
            hooks = d.get(kind)
            if hooks:
                mine = user_hooks(hooks)
                if mine:
                    found.append((i, kind, tuple(mine)))
    glob = torch.nn.modules.module
    for kind in _GLOBAL:
        mine = user_hooks(getattr(glob, kind))
        if mine:
            found.append((-1, kind, tuple(mine)))
    return tuple(found)


_SIMPLE = (bool, int, float, str, type(None))


def _configs(mods: list) -> tuple:
    """The settings of the configs the modules hold (a transformers model's ``config``, one
    object its modules share): the simple values of each, which a forward reads as it runs
    (``output_hidden_states``, the attention implementation) and its trace took as constants."""
    found, seen = [], set()
    for m in mods:
        cfg = m.__dict__.get("config")
        if cfg is not None and id(cfg) not in seen and hasattr(cfg, "to_dict"):
            seen.add(id(cfg))
            found.append(tuple((k, v) for k, v in vars(cfg).items() if type(v) in _SIMPLE))
    return tuple(found)


def modes(modules: list) -> tuple[bool, ...]:
    """Each module's training flag (``modules_of``'s list): part of a call's signature."""
    return tuple(m.training for m in modules)


def trained(modules: list) -> tuple[bool, ...]:
    """Whether each parameter takes a gradient (``modules_of``'s list): part of a training
    call's signature, since a step computes the gradients of those it was traced with (a
    backbone unfrozen after compiling would get none)."""
    return tuple(p.requires_grad for m in modules for p in m._parameters.values() if p is not None)


@dataclass(frozen=True)
class ModuleTree:
    """The modules (held weakly: a replaced one that was freed reads as gone, never as a new
    module at its old address) and the user hooks a program was traced with."""

    names: tuple[str, ...]
    types: tuple[str, ...]
    refs: tuple
    hooks: tuple
    kinds: tuple[str, ...]
    configs: tuple

    @classmethod
    def of(cls, model: torch.nn.Module, train: bool) -> ModuleTree:
        mods = modules_of(model)
        kinds = _FORWARD + (_BACKWARD if train else ())
        return cls(_names(model, mods), tuple(type(m).__name__ for m in mods), tuple(weakref.ref(m) for m in mods),
                   _hook_keys(mods, kinds), kinds, _configs(mods))

    def changed(self, model: torch.nn.Module, mods: list) -> str | None:
        """What changed in ``model``'s tree (``mods``: ``modules_of(model)``) since it was traced;
        None when nothing did."""
        if not (len(mods) == len(self.refs) and all(r() is m for r, m in zip(self.refs, mods))):
            return self._change(model)
        if _hook_keys(mods, self.kinds) != self.hooks:
            return self._hook_change(mods)
        configs = _configs(mods)
        if configs != self.configs:
            return _config_change(self.configs, configs)
        return None

    def _change(self, model: torch.nn.Module) -> str:
        now = dict(model.named_modules())
        for name, kind, ref in zip(self.names, self.types, self.refs):
            m = now.get(name)
            if m is None:
                return f"{_shown(name)} ({kind}) was removed"
            if ref() is not m:
                return f"{_shown(name)} was replaced ({kind} then, {type(m).__name__} now)"
        traced = set(self.names)
        added = next((n for n in now if n not in traced), None)
        if added is not None:
            return f"{_shown(added)} ({type(now[added]).__name__}) was added"
        return "the model's modules were rearranged"

    def _hook_change(self, mods: list) -> str:
        then = {(i, kind): set(ids) for i, kind, ids in self.hooks}
        now = {(i, kind): set(ids) for i, kind, ids in _hook_keys(mods, self.kinds)}
        for i, kind in sorted(then.keys() | now.keys()):
            added, removed = now.get((i, kind), set()) - then.get((i, kind), set()), \
                then.get((i, kind), set()) - now.get((i, kind), set())
            if added or removed:
                where = "every module (a global hook)" if i < 0 else _shown(self.names[i])
                what = kind.strip("_").replace("global_", "").replace("_", " ")[:-1]
                return f"a {what} was {'registered on' if added else 'removed from'} {where}"
        return "the model's hooks changed"


def _shown(name: str) -> str:
    return f"module {name!r}" if name else "the model itself"


def _config_change(then: tuple, now: tuple) -> str:
    for old, new in zip(then, now):
        old, new = dict(old), dict(new)
        for k in old.keys() | new.keys():
            if old.get(k, "<unset>") != new.get(k, "<unset>"):
                return f"the model's config.{k} changed ({old.get(k, '<unset>')!r} then, {new.get(k, '<unset>')!r} now)"
    return "the model's config changed"
