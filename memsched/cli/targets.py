"""Resolve a CLI target spec into ``(model, args, kwargs, display_name)``.

Forms accepted by :func:`load_target`:

* ``path/to/file.py:factory`` -- the file is imported by path and ``factory()`` called;
* ``package.module:factory``   -- the module is imported and ``factory()`` called;
* ``hf:<model_type>``          -- a Hugging Face architecture with its default config
  (``hf:gpt2``, ``hf:llama``, ``hf:bert``, ``hf:t5``, ...);
* ``path/to/config.json`` or a directory holding one -- a Hugging Face config file.

A factory returns ``(model, args)`` (``args`` a tuple, or a single tensor), ``(model, args,
kwargs)``, or ``(model, kwargs)`` with ``kwargs`` a dict. If it declares parameters named
``batch`` and/or ``seq_len`` they are passed through from the CLI.

Hugging Face models are built on the meta device (no weights are allocated, nothing is
downloaded) in eval mode with ``use_cache=False``; the example input is a meta tensor of
shape ``(batch, seq_len)`` (token ids), or ``(batch, channels, size, size)`` for vision models.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import TargetError

__all__ = ["load_target", "TARGET_FORMS"]

TARGET_FORMS = ("path/to/file.py:factory, package.module:factory, hf:<model_type> (e.g. hf:gpt2), "
                "or a path to a Hugging Face config.json (or a directory containing one)")
_EXAMPLE_TYPES = ("gpt2", "llama", "mistral", "qwen2", "opt", "bert", "t5", "bart", "vit")


def load_target(spec: str, *, batch: int = 1, seq_len: int = 128) -> tuple[nn.Module, tuple, dict, str]:
    """Build the model a CLI target names, with example inputs; ValueError for a bad spec,
    TargetError (a ValueError) when the target's own code fails to import or its factory raises."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty target: use {TARGET_FORMS}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"--batch and --seq-len must be positive (got {batch} and {seq_len})")
    spec = spec.strip()
    if spec.startswith("hf:"):
        model_type = spec[3:].strip()
        if not model_type:
            raise ValueError(f"target {spec!r} names no model type: use hf:<model_type>, e.g. hf:gpt2")
        return _hf_from_model_type(model_type, batch, seq_len)

    path = Path(spec).expanduser()
    if path.is_dir() or spec.endswith(".json"):
        return _hf_from_config_path(path, batch, seq_len)

    source, sep, factory = spec.rpartition(":")
    if not sep:
        if spec.endswith(".py"):
            raise ValueError(f"target {spec!r} names a file but no factory: use {spec}:factory")
        if path.exists():
            raise ValueError(f"target {spec!r} is neither a config.json, a directory holding one, "
                             f"nor file.py:factory: use {TARGET_FORMS}")
        raise ValueError(f"target {spec!r} not understood (no such file or directory, and no "
                         f":factory): use {TARGET_FORMS}")
    if not source or not factory:
        raise ValueError(f"target {spec!r} is malformed: use {TARGET_FORMS}")
    if not factory.isidentifier():
        raise ValueError(f"target {spec!r}: factory name {factory!r} is not a Python identifier")

    if source.endswith(".py") or os.sep in source or "/" in source:
        path = Path(source).expanduser()
        _check_file(path)
        module = _user_code(spec, f"importing {source}", _import_file, path)
        where = source
    else:
        if not all(part.isidentifier() for part in source.split(".")):
            raise ValueError(f"target {spec!r}: {source!r} is neither a .py file nor a module name")
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as e:
            if e.name and (source == e.name or source.startswith(e.name + ".")):
                raise ValueError(f"target {spec!r}: no module named {e.name!r}") from None
            raise TargetError(f"target {spec!r}: importing {source} failed: {_one_line(e)}") from e
        except Exception as e:  # the module exists but its own code (or one of its imports) failed
            raise TargetError(f"target {spec!r}: importing {source} failed: {_one_line(e)}") from e
        where = source

    fn = getattr(module, factory, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)
        shown = ", ".join(public[:8]) + (f", ... ({len(public)} in all)" if len(public) > 8 else "")
        hint = f"; callables defined there: {shown}" if public else ""
        raise ValueError(f"target {spec!r}: {where} has no factory {factory!r}{hint}")
    if not callable(fn):
        raise ValueError(f"target {spec!r}: {factory!r} in {where} is not callable")
    result = _user_code(spec, f"the factory {factory}()", _call_factory, fn, batch, seq_len)
    model, args, kwargs = _normalize(result, spec)
    return model, args, kwargs, f"{type(model).__name__} ({spec})"


# ----------------------------------------------------------------------------- factories


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _joined(e: BaseException, limit: int = 400) -> str:
    """The exception's type and its message's lines on one line (a validation error of
    transformers' configs says what failed on its second line)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _user_code(spec: str, what: str, fn, *args):
    """``fn(*args)``, running the user's code: any exception it raises becomes a TargetError
    naming the target and what failed (the original is its ``__cause__``, shown by --debug)."""
    try:
        return fn(*args)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"target {spec!r}: {what} failed{_user_frame(e)}: {_one_line(e)}") from e


def _user_frame(e: BaseException) -> str:
    """`` (file.py, line 12)``: the innermost place in the user's own code (not in Python's
    library, installed packages or memsched) the exception came through, or ""."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({Path(e.filename).name}, line {e.lineno})"
    import sysconfig

    skip = tuple(str(Path(p).resolve()) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib")})
    skip += (str(Path(__file__).resolve().parents[1]), "<frozen")
    where, tb = "", e.__traceback__
    while tb is not None:
        file = tb.tb_frame.f_code.co_filename
        if not file.startswith(skip) and not str(Path(file).resolve()).startswith(skip):
            where = f" ({Path(file).name}, line {tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ValueError(f"target file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"target {str(path)!r} is not a file")


def _import_file(path: Path):
    _check_file(path)
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_memsched_target_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses, pickling and typing need the module registered
    sys.path.insert(0, str(path.parent))  # so the file can import its neighbours
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))
    return module


def _call_factory(fn, batch: int, seq_len: int):
    passed = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    for key, value in (("batch", batch), ("seq_len", seq_len)):
        if key in params and params[key].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                  inspect.Parameter.KEYWORD_ONLY):
            passed[key] = value
    return fn(**passed)


def _normalize(result, spec: str) -> tuple[nn.Module, tuple, dict]:
    forms = "(model, args), (model, args, kwargs) or (model, kwargs_dict)"
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ValueError(f"target {spec!r}: the factory returned {type(result).__name__}; it must "
                         f"return {forms}")
    model = result[0]
    if not isinstance(model, nn.Module):
        raise ValueError(f"target {spec!r}: the factory's first item is a {type(model).__name__}, "
                         f"not a torch.nn.Module")
    if len(result) == 3:
        args, kwargs = result[1], result[2]
    elif isinstance(result[1], dict):
        args, kwargs = (), result[1]
    else:
        args, kwargs = result[1], {}
    if isinstance(args, torch.Tensor):
        args = (args,)
    if args is None:
        args = ()
    if kwargs is None:
        kwargs = {}
    if not isinstance(args, (tuple, list)):
        raise ValueError(f"target {spec!r}: example args must be a tuple, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"target {spec!r}: example kwargs must be a dict, got {type(kwargs).__name__}")
    if not args and not kwargs:
        raise ValueError(f"target {spec!r}: the factory returned no example inputs")
    return model, tuple(args), dict(kwargs)


# ----------------------------------------------------------------------------- Hugging Face


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("hf: and config.json targets need the `transformers` package "
                         "(pip install transformers)") from None
    return transformers


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' advice-level warnings while building a model from a config."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            prev = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
        except Exception:  # pragma: no cover - very old transformers
            hf_logging = None
        try:
            yield
        finally:
            if hf_logging is not None:
                hf_logging.set_verbosity(prev)


def _known_model_types() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return list(CONFIG_MAPPING_NAMES)


def _hf_from_model_type(model_type: str, batch: int, seq_len: int):
    transformers = _transformers()
    known = _known_model_types()
    if model_type not in known:
        close = difflib.get_close_matches(model_type, known, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown Hugging Face model_type {model_type!r}: {hint}known types include "
                         f"{', '.join(t for t in _EXAMPLE_TYPES if t in known)} "
                         f"({len(known)} in all, as in transformers.AutoConfig.for_model)")
    with quiet_transformers():
        config = transformers.AutoConfig.for_model(model_type)
    return _hf_build(config, f"hf:{model_type}", batch, seq_len)


def _hf_from_config_path(path: Path, batch: int, seq_len: int):
    transformers = _transformers()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"directory {str(path)!r} has no config.json" if path.is_dir() else \
            f"config file {str(path)!r} does not exist"
        raise ValueError(f"target: {where}")
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"config file {str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"config file {str(file)!r} has no \"model_type\": is it a Hugging Face "
                         f"config.json?")
    if raw["model_type"] not in _known_model_types():
        raise ValueError(f"config file {str(file)!r}: model_type {raw['model_type']!r} is unknown "
                         f"to transformers {transformers.__version__}")
    try:
        with quiet_transformers():
            # local_files_only: a path never turns into a Hub download
            config = transformers.AutoConfig.from_pretrained(str(file), local_files_only=True)
    except Exception as e:   # the file's values, refused by transformers' checks (a hidden size
        # not divisible by the heads, a float where an int goes) or failing them (zero heads)
        raise ValueError(f"cannot read Hugging Face config {str(file)!r}: {_joined(e)}") from None
    return _hf_build(config, str(file), batch, seq_len)


def _hf_build(config, label: str, batch: int, seq_len: int):
    transformers = _transformers()
    for obj in (config, *(getattr(config, k, None) for k in getattr(config, "sub_configs", {}))):
        if obj is not None and hasattr(obj, "use_cache"):
            obj.use_cache = False
    if getattr(config, "use_cache", None) is None:
        config.use_cache = False

    classes = [transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel]
    if getattr(config, "is_encoder_decoder", False):
        classes = [transformers.AutoModelForSeq2SeqLM, transformers.AutoModel]
    model, errors = None, []
    with quiet_transformers(), torch.device("meta"):
        for cls in classes:
            try:
                model = cls.from_config(config)
                break
            except (ValueError, AssertionError) as e:  # this auto class does not cover the config
                # (Reformer's LM head asserts is_decoder: its base model is built instead)
                errors.append(f"{cls.__name__}: {(str(e).splitlines() or [type(e).__name__])[0]}")
            except Exception as e:   # the config's values fail the model's constructor
                raise ValueError(f"{label}: transformers could not build {type(config).__name__}: "
                                 f"{_joined(e)}") from None
    if model is None:
        # an auto class that knows the config but whose constructor refused its values (a padding
        # id past the vocabulary) says what is wrong with the config, not that no class fits
        refused = [e for e in errors if "Unrecognized configuration class" not in e]
        if refused:
            raise ValueError(f"{label}: transformers could not build {type(config).__name__}: {refused[-1]}")
        raise ValueError(f"{label}: no AutoModel class builds {type(config).__name__} ("
                         + "; ".join(errors) + ")")
    # legacy constructors (XLNet's torch.FloatTensor(...) parameters) ignore the meta device:
    # a weight on the host beside meta ones would fail the capture with a device mismatch
    model.to("meta")
    model.eval()
    model.requires_grad_(False)

    args, kwargs = (), _hf_inputs(model, config, label, batch, seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    name = f"{type(model).__name__} ({label}, {_count(n_params)} params, batch {batch}"
    if "input_ids" in kwargs:
        name += f", seq {seq_len})"
    elif "pixel_values" in kwargs:
        name += f", image {'x'.join(map(str, kwargs['pixel_values'].shape[-2:]))})"
    elif "input_features" in kwargs or "input_values" in kwargs:
        audio = kwargs.get("input_features", kwargs.get("input_values"))
        name += f", audio {'x'.join(map(str, audio.shape[1:]))})"
    else:
        name += ")"
    return model, args, kwargs, name


# the image side a vision config that names none is planned at (ImageNet's)
DEFAULT_IMAGE_SIZE = 224


def _hf_inputs(model, config, label: str, batch: int, seq_len: int) -> dict:
    main = getattr(model, "main_input_name", "input_ids")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if main == "input_ids":
        limit = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(text, k, None), int)), None)
        limit = limit if limit is None or limit > 0 else None   # XLNet's -1: no limit
        # relative-position models (t5) carry a nominal n_positions that is no real limit
        if limit is not None and seq_len > limit and getattr(config, "model_type", "") != "t5":
            raise ValueError(f"{label}: --seq-len {seq_len} exceeds the model's maximum of {limit} "
                             f"positions")
        ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        kwargs = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            kwargs["decoder_input_ids"] = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
        return _dual_encoder_pixels(model, config, label, batch, kwargs)
    if main == "pixel_values":
        return {"pixel_values": _pixels(model, config, label, batch)}
    if main in ("input_features", "input_values"):
        return _audio_inputs(model, config, label, main, batch, seq_len)
    raise ValueError(f"{label}: {type(model).__name__} takes {main!r}, which the CLI cannot "
                     f"synthesize yet; write a factory (file.py:factory) instead")


def _pixels(model, config, label: str, batch: int) -> torch.Tensor:
    size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if isinstance(size, (list, tuple)):
        h, w = size[-2], size[-1]
    elif isinstance(size, int):
        h = w = size
    elif size is None:   # convolutional configs (resnet, regnet, mobilenet) take any size
        h = w = DEFAULT_IMAGE_SIZE
    else:
        raise ValueError(f"{label}: image_size {size!r} is not a size")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return torch.zeros(batch, channels, h, w, dtype=dtype, device="meta")


def _dual_encoder_pixels(model, config, label: str, batch: int, kwargs: dict) -> dict:
    """A model with a text and a vision tower side by side (CLIP, SigLIP) reads both inputs
    (its main one is the text's): the images are synthesized too, as its vision config sizes them."""
    vision = getattr(config, "vision_config", None)
    if vision is None or "pixel_values" in kwargs \
            or "pixel_values" not in inspect.signature(model.forward).parameters:
        return kwargs
    return {**kwargs, "pixel_values": _pixels(model, vision, label, batch)}


def _audio_inputs(model, config, label: str, main: str, batch: int, seq_len: int) -> dict:
    """Audio models: ``--seq-len`` counts the encoder's frames. Whisper's log-mel features have the
    fixed length its positions cover (two frames each); a raw waveform (wav2vec2, HuBERT) is as
    many samples as its convolutional feature encoder turns into ``--seq-len`` frames. An
    encoder-decoder's decoder reads ``--seq-len`` tokens too."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if main == "input_features" and isinstance(getattr(config, "num_mel_bins", None), int) \
            and isinstance(getattr(config, "max_source_positions", None), int):
        kwargs = {"input_features": torch.zeros(batch, config.num_mel_bins, 2 * config.max_source_positions,
                                                dtype=dtype, device="meta")}
    elif main == "input_values" and getattr(config, "conv_stride", None) and getattr(config, "conv_kernel", None):
        samples = 1   # the receptive field of one frame, then each further frame's stride
        for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
            samples = (samples - 1) * stride + kernel
        total = math.prod(config.conv_stride)
        kwargs = {"input_values": torch.zeros(batch, samples + (seq_len - 1) * total, dtype=dtype, device="meta")}
    else:
        raise ValueError(f"{label}: {type(model).__name__} takes {main!r} in a layout the CLI does not "
                         f"know; write a factory (file.py:factory) instead")
    if getattr(config, "is_encoder_decoder", False):
        limit = getattr(config, "max_target_positions", None)
        if isinstance(limit, int) and seq_len > limit:
            raise ValueError(f"{label}: --seq-len {seq_len} exceeds the decoder's maximum of {limit} positions")
        kwargs["decoder_input_ids"] = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    return kwargs


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)
