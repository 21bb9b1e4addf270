"""The module tree a program was traced from, checked at each call of the compiled module.

A captured program is the model as it was when traced: a submodule replaced afterwards (an
activation swapped, an adapter inserted, a layer appended or deleted) or a hook registered or
removed since (a user's, or a library's: ``spectral_norm``'s pre-hook) would change what eager
runs and not what the program runs, and the outputs would be silently stale. Parameters
replaced or changed are the executor's to see (runtime/executor.py: new values are read, another
shape or dtype plans again); this is the rest of the tree. A call that finds it changed plans
again, as torch.compile recompiles, and says what changed.

The settings of a transformers model's config are checked too (``output_hidden_states``, the
attention implementation): a forward reads them as it runs. Other attributes a forward reads
(``self.scale = 2.0`` set after compiling) are not checked: walking every module's attributes
would cost milliseconds per call.

Submodules' training flags and which parameters require grad are not a change of the tree but
part of a call's signature (a frozen batch norm in eval inside a model in training plans its own
program; so does a backbone unfrozen for a training step), so one walk gives them all: a
32-layer LLaMA's 423 modules in about a third of a millisecond per inference call (as long as
``model.modules()`` alone takes), half of one per training step (reading ``requires_grad`` of
its 291 parameters is the rest).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
           "_global_backward_pre_hooks")
_SIMPLE = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class TreeState:
    """What one walk of the model finds: its modules, each once, breadth first; each one's
    training flag; whether each parameter requires grad; the hooks on them (a library's as well
    as a user's: ``torch.nn.utils.spectral_norm`` adds a pre-hook that changes the weight a
    forward reads), as (index of the module, kind, the handles' ids); and the simple settings
    of the configs they hold (a transformers model's ``config``, one object its modules share)."""

    modules: list
    modes: tuple
    trained: tuple
    hooks: tuple
    configs: tuple


def walk(model: torch.nn.Module, trained: bool = False) -> TreeState:
    """The model's ``TreeState`` (``trained``: whether each parameter requires grad, else ());
    once per call, so one pass that makes no module names."""
    order, seen = [model], {id(model)}
    modes, grads, hooks, configs, config_ids = [], [], [], [], set()
    for i, m in enumerate(order):   # the list grows as it is read
        d = m.__dict__
        # (``get``: a module unpickled from an older torch may lack a table)
        modes.append(d.get("training", True))
        if trained and d.get("_parameters"):
            for p in d["_parameters"].values():
                if p is not None:
                    grads.append(p.requires_grad)
        if d.get("_forward_hooks") or d.get("_forward_pre_hooks") or d.get("_backward_hooks") \
                or d.get("_backward_pre_hooks"):
            hooks.extend((i, kind, tuple(d[kind])) for kind in _KINDS if d.get(kind))
        cfg = d.get("config")
        if cfg is not None and id(cfg) not in config_ids and hasattr(cfg, "to_dict"):
            config_ids.add(id(cfg))
            settings = getattr(cfg, "__dict__", None)   # (a config of the user's own may have slots)
            if isinstance(settings, dict):
                configs.append(tuple((k, v) for k, v in settings.items() if type(v) in _SIMPLE))
        for child in d.get("_modules", {}).values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                order.append(child)
    glob = torch.nn.modules.module
    hooks.extend((-1, kind, tuple(getattr(glob, kind))) for kind in _GLOBAL if getattr(glob, kind, None))
    return TreeState(order, tuple(modes), tuple(grads), tuple(hooks), tuple(configs))


@dataclass(frozen=True)
class ModuleTree:
    """The modules (held weakly: a replaced one that was freed reads as gone, never as a new
    module at its old address), hooks and config settings a program was traced with."""

    names: tuple[str, ...]
    types: tuple[str, ...]
    refs: tuple
    hooks: tuple
    configs: tuple

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModuleTree:
        state = walk(model)
        named = {id(m): name for name, m in model.named_modules()}
        return cls(tuple(named[id(m)] for m in state.modules), tuple(type(m).__name__ for m in state.modules),
                   tuple(weakref.ref(m) for m in state.modules), state.hooks, state.configs)

    def changed(self, model: torch.nn.Module, state: TreeState) -> str | None:
        """What changed in ``model``'s tree (``state``: ``walk(model)``) since it was traced;
        None when nothing did."""
        mods = state.modules
        if not (len(mods) == len(self.refs) and all(r() is m for r, m in zip(self.refs, mods))):
            return self._change(model)
        if state.hooks != self.hooks:
            return self._hook_change(state.hooks)
        if state.configs != self.configs:
            return _config_change(self.configs, state.configs)
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

    def _hook_change(self, hooks: tuple) -> str:
        then = {(i, kind): set(ids) for i, kind, ids in self.hooks}
        now = {(i, kind): set(ids) for i, kind, ids in hooks}
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
