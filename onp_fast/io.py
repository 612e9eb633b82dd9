"""Model files in and out, safely: a checkpoint from a stranger must never run code when loaded.

Formats `load_model` reads (and `save_model` writes back in the same format):
- "onp-fast": our checkpoint, a dict {"format": "onp-fast/v1", "arch", "arch_kwargs", "num_classes",
  "input_shape", "mean", "std", "state_dict", "extra"} of plain types and tensors (weights_only loadable);
- "backdoorbench": BackdoorBench's attack_result.pt / defense_result.pt, a dict with "model_name",
  "num_classes", "model" (state_dict, keys may start with "module.") and numpy arrays; loaded with
  weights_only=True plus an allow-list of numpy's array reconstruction globals;
- "state_dict": a bare state_dict (or {"state_dict"|"model_state_dict"|"model"|"net": state_dict}) with arch;
- "safetensors": a .safetensors file with arch (or our metadata in its header);
- "torchscript": a TorchScript archive (torch.jit.load runs no pickled Python); ours carry an extra file
  onp_fast.json with the input shape, mean and std;
- "pickle": a fully pickled nn.Module, only with trust_pickle=True.
For state_dict / safetensors the build kwargs (width, in_channels, num_classes, ...) are read from the
weights' shapes unless given. A bare state_dict or a pickle cannot record the preprocessing (mean, std, input
size): the caller supplies it. Every problem is a one-line UserError.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from . import models
from .atomic import atomic_path
from .errors import UserError
from .models.infer import infer_arch_kwargs, torchvision_vit_to_timm

FORMAT_TAG = "onp-fast/v1"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


@dataclasses.dataclass
class LoadedModel:
    """A model and what its file said about it.

    model: the nn.Module (eval mode) taking normalised input [B, *input_shape] float32.
    input_shape: (C, H, W). mean, std: per-channel normalisation (tuples) or None when the file does not
    say (use the data set's). format: one of "onp-fast", "backdoorbench", "state_dict", "safetensors",
    "torchscript", "pickle". extra: plain JSON-able metadata. source: what the file held besides the
    weights (e.g. BackdoorBench's dict with its numpy arrays), used by save_model to keep the format.
    input_known: the input size came from the file, the weights (a ViT's position embeddings) or the caller;
    False: input_shape's H, W are an assumption (take the data's). norm_source: where mean/std came from, set
    by whoever decides them (None: from the file, or not decided yet).
    """

    model: nn.Module
    arch: str
    arch_kwargs: dict
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    format: str
    extra: dict = dataclasses.field(default_factory=dict)
    source: Any = dataclasses.field(default=None, repr=False)
    input_known: bool = False
    norm_source: str | None = None


# ---------------------------------------------------------------------------------------------- reading

def numpy_safe_globals() -> list:
    """numpy's array/scalar reconstruction globals, under both spellings (numpy 1.x `numpy.core`, 2.x `numpy._core`)."""
    mod = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: list = [np.ndarray, np.dtype]
    for fn in ("_reconstruct", "scalar"):
        obj = getattr(mod, fn)
        out += [(obj, f"numpy.core.multiarray.{fn}"), (obj, f"numpy._core.multiarray.{fn}")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if path.is_dir():
        raise UserError(f"model path is a folder, not a file: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"model file is empty: {path}")


def _refusal(exc: BaseException, path: Path) -> UserError | None:
    """A one-line refusal when `exc` is weights_only rejecting a global (naming it), else None."""
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global:?\s*([\w.]+)", text)
    if m is None:
        return None
    return UserError(f"refusing to unpickle {m.group(1)} from {path}: pass --trust-pickle only if you trust this file")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_plain_pickle(path: Path) -> bool:
    """A pickle.dump file (protocol 2+), not torch.save's archive (zip, or the legacy format whose first pickle
    is torch's magic number, a LONG1 opcode)."""
    with open(path, "rb") as f:
        head = f.read(3)
    return head[:1] == b"\x80" and head[2:3] != b"\x8a" and not zipfile.is_zipfile(path)


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    plain = _is_plain_pickle(path)
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - weights_only loading is safe; any failure means a bad file
        refusal = _refusal(exc, path) if isinstance(exc, pickle.UnpicklingError) else None
        if not trust_pickle:
            if refusal is not None:
                raise refusal from None
            if plain:
                raise UserError(f"{path} is a plain Python pickle (pickle.dump), which runs code when loaded: pass "
                                f"--trust-pickle only if you trust this file (or save it with torch.save)") from None
            raise _unreadable(path, exc) from None
        if refusal is None and not plain:
            raise _unreadable(path, exc) from None
    try:  # the user vouched for this file
        if plain:
            with open(path, "rb") as f:
                return pickle.load(f)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - arbitrary pickles fail arbitrarily
        raise UserError(f"cannot unpickle {path}: {_first_line(exc)}") from None


def _unreadable(path: Path, exc: BaseException) -> UserError:
    why = _first_line(exc)
    return UserError(f"cannot read {path}: truncated or not a model file"
                     + (f" ({why})" if any(c.isalpha() for c in why) else ""))


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, at most 160 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(". ")[0][:160]


def _strip_module_prefix(sd: dict) -> tuple[dict, bool]:
    """Removes a DataParallel `module.` prefix from every key when all keys have it -> (state_dict, had_it)."""
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}, True
    return sd, False


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def check_finite(sd: dict[str, torch.Tensor], path) -> None:
    """UserError naming the first floating tensor holding NaN or inf."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"weights contain NaN or inf: tensor {k!r} in {path}")


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], arch: str, path) -> None:
    """Loads `sd` into `model` strictly, turning any mismatch into one line (first key, both shapes)."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            if k.endswith("num_batches_tracked"):
                continue
            raise UserError(f"the weights in {path} do not fit {arch}: missing key {k!r} (shape {list(v.shape)})")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise UserError(f"the weights in {path} do not fit {arch}: {k!r} has shape {list(sd[k].shape)} "
                            f"in the file but {list(v.shape)} in the model")
    for k in sd:
        if k not in own:
            raise UserError(f"the weights in {path} do not fit {arch}: unexpected key {k!r} "
                            f"(shape {list(sd[k].shape)})")
    model.load_state_dict({k: v for k, v in sd.items()}, strict=False)


def _build_from_state_dict(sd: dict, arch: str | None, path: Path, given: dict, fmt: str) -> tuple[nn.Module, str, dict]:
    if arch is None:
        raise UserError(f"{path} holds only weights ({fmt}): pass --arch (one of {', '.join(models.names())})")
    arch = models.canonical_name(arch)
    check_finite(sd, path)
    kwargs = infer_arch_kwargs(arch, sd)
    kwargs.update({k: v for k, v in given.items() if v is not None})
    model = models.build(arch, **kwargs)
    _load_weights(model, sd, arch, path)
    return model.eval(), arch, model.onp_arch_kwargs


def _tuple_or_none(v) -> tuple[float, ...] | None:
    if v is None:
        return None
    return tuple(float(x) for x in (v.tolist() if hasattr(v, "tolist") else v))


def _input_shape(kwargs: dict, default_size: int = 32) -> tuple[int, int, int]:
    size = int(kwargs.get("input_size") or default_size)
    return (int(kwargs.get("in_channels", 3)), size, size)


def load_model(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False, *,
               num_classes: int | None = None, in_channels: int | None = None, width: float | None = None,
               input_size: int | None = None) -> LoadedModel:
    """Loads a model file of any supported format (module doc) into a LoadedModel (model in eval mode).

    `arch` names the architecture for weight-only files (overrides a BackdoorBench `model_name`);
    num_classes / in_channels / width / input_size override what is read from the weights.
    """
    path = Path(path)
    _check_file(path)
    given = dict(num_classes=num_classes, in_channels=in_channels, width=width, input_size=input_size)
    lm = _load_any(path, arch, trust_pickle, given)
    if input_size is not None or lm.arch.startswith("vit"):  # the caller, or the position embeddings, tell
        lm.input_known = True
    return lm


def _load_any(path: Path, arch: str | None, trust_pickle: bool, given: dict) -> LoadedModel:
    if path.suffix == ".safetensors":
        return _load_safetensors(path, arch, given)
    if _is_torchscript(path):
        return _load_torchscript(path, arch, given)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_TAG:
        return _from_ours(obj, path)
    if isinstance(obj, dict) and "model_name" in obj and isinstance(obj.get("model"), dict):
        return _from_backdoorbench(obj, path, arch, given)
    if isinstance(obj, nn.Module):
        return _from_module(obj, path, arch, given)
    if _is_state_dict(obj):
        sd, prefixed = _strip_module_prefix(obj)
        sd = torchvision_vit_to_timm(sd)
        model, arch_, kwargs = _build_from_state_dict(sd, arch, path, given, "a state_dict")
        return LoadedModel(model, arch_, kwargs, kwargs["num_classes"], _input_shape(kwargs), None, None,
                           "state_dict", {}, dict(wrapper=None, prefixed=prefixed))
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                sd, prefixed = _strip_module_prefix(obj[key])
                sd = torchvision_vit_to_timm(sd)
                model, arch_, kwargs = _build_from_state_dict(sd, arch, path, given, "a state_dict")
                return LoadedModel(model, arch_, kwargs, kwargs["num_classes"], _input_shape(kwargs), None, None,
                                   "state_dict", {}, dict(wrapper=obj, key=key, prefixed=prefixed))
    raise UserError(f"{path} is not a model file onp-fast understands (found {type(obj).__name__})")


def _from_ours(obj: dict, path: Path) -> LoadedModel:
    try:
        arch, kwargs, sd = obj["arch"], dict(obj["arch_kwargs"]), obj["state_dict"]
    except KeyError as exc:
        raise UserError(f"{path}: onp-fast checkpoint without {exc.args[0]!r}") from None
    check_finite(sd, path)
    model = models.build(arch, **kwargs)
    _load_weights(model, sd, arch, path)
    shape = tuple(int(s) for s in obj.get("input_shape") or _input_shape(kwargs))
    return LoadedModel(model.eval(), model.onp_arch, model.onp_arch_kwargs, int(obj.get("num_classes", kwargs["num_classes"])),
                       shape, _tuple_or_none(obj.get("mean")), _tuple_or_none(obj.get("std")), "onp-fast",
                       dict(obj.get("extra") or {}), input_known=True)


def _from_backdoorbench(obj: dict, path: Path, arch: str | None, given: dict) -> LoadedModel:
    sd, prefixed = _strip_module_prefix(obj["model"])
    if not _is_state_dict(sd):
        raise UserError(f"{path}: BackdoorBench 'model' entry is not a state_dict")
    sd = torchvision_vit_to_timm(sd)
    if given.get("num_classes") is None and obj.get("num_classes") is not None:
        given = dict(given, num_classes=int(obj["num_classes"]))
    img = obj.get("img_size")  # BackdoorBench stores (H, W, C)
    if given.get("input_size") is None and isinstance(img, (tuple, list)) and len(img) >= 2:
        given = dict(given, input_size=int(img[0]))
    arch = models.canonical_name(arch or str(obj["model_name"]))
    if arch == "mobilenet_v2":  # BackdoorBench trains torchvision's (ImageNet strides) at every input size
        given = dict(given, small=False)
    model, arch_, kwargs = _build_from_state_dict(sd, arch, path, given, "BackdoorBench")
    extra = {k: obj[k] for k in ("model_name", "data_path") if isinstance(obj.get(k), str)}
    return LoadedModel(model, arch_, kwargs, kwargs["num_classes"], _input_shape(kwargs), None, None,
                       "backdoorbench", extra, dict(wrapper=obj, key="model", prefixed=prefixed),
                       input_known=given.get("input_size") is not None)


def _from_module(obj: nn.Module, path: Path, arch: str | None, given: dict) -> LoadedModel:
    arch_ = getattr(obj, "onp_arch", None) or (models.canonical_name(arch) if arch else type(obj).__name__)
    kwargs = dict(getattr(obj, "onp_arch_kwargs", {}) or {})
    kwargs.update({k: v for k, v in given.items() if v is not None})
    check_finite(obj.state_dict(), path)
    return LoadedModel(obj.eval(), arch_, kwargs, int(kwargs.get("num_classes") or _out_features(obj) or 0),
                       _input_shape(kwargs), None, None, "pickle", {}, input_known="input_size" in kwargs)


def _out_features(model: nn.Module) -> int | None:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1].out_features if last else None


def _load_safetensors(path: Path, arch: str | None, given: dict) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        sd = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot read {path}: truncated or not a safetensors file ({_first_line(exc)})") from None
    sd, prefixed = _strip_module_prefix(sd)
    sd = torchvision_vit_to_timm(sd)
    info = json.loads(meta["onp_fast"]) if "onp_fast" in meta else {}
    if info and arch is None:
        check_finite(sd, path)
        kwargs = dict(info["arch_kwargs"], **{k: v for k, v in given.items() if v is not None})
        model = models.build(info["arch"], **kwargs)
        _load_weights(model, sd, info["arch"], path)
        model, arch_, kwargs = model.eval(), model.onp_arch, model.onp_arch_kwargs
    else:
        model, arch_, kwargs = _build_from_state_dict(sd, arch, path, given, "safetensors")
    shape = tuple(info.get("input_shape") or _input_shape(kwargs))
    return LoadedModel(model, arch_, kwargs, kwargs["num_classes"], shape, _tuple_or_none(info.get("mean")),
                       _tuple_or_none(info.get("std")), "safetensors", dict(info.get("extra") or {}),
                       dict(prefixed=prefixed), input_known=bool(info.get("input_shape")))


def _load_torchscript(path: Path, arch: str | None, given: dict) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            files = {_SCRIPT_INFO: ""}
            script = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    except Exception as exc:  # noqa: BLE001 - the TorchScript loader raises plain RuntimeErrors
        raise UserError(f"cannot read TorchScript archive {path}: {_first_line(exc)}") from None
    try:
        info = json.loads(files[_SCRIPT_INFO]) if files[_SCRIPT_INFO] else {}
    except ValueError:
        info = {}
    sd = {k: v for k, v in script.state_dict().items()}
    if arch is not None:  # rebuild as our (prunable) module
        model, arch_, kwargs = _build_from_state_dict(sd, arch, path, given, "TorchScript")
    else:
        check_finite(sd, path)
        model, arch_, kwargs = script.eval(), "torchscript", {k: v for k, v in given.items() if v is not None}
        kwargs.setdefault("num_classes", _out_features_sd(sd))
    shape = tuple(int(v) for v in info.get("input_shape") or _input_shape(kwargs))
    return LoadedModel(model, arch_, kwargs, int(kwargs.get("num_classes") or 0), shape,
                       _tuple_or_none(info.get("mean")), _tuple_or_none(info.get("std")), "torchscript",
                       dict(info.get("extra") or {}), input_known=bool(info.get("input_shape")))


_SCRIPT_INFO = "onp_fast.json"  # what a TorchScript archive we write records beside the code: input shape, mean, std


def _out_features_sd(sd: dict) -> int | None:
    mats = [v for v in sd.values() if v.dim() == 2]
    return int(mats[-1].shape[0]) if mats else None


# ---------------------------------------------------------------------------------------------- writing

def _plain(v: Any) -> Any:
    """JSON-able copy of metadata (tensors/arrays -> lists)."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (str, bool, int, float)):
        return v
    raise UserError(f"checkpoint metadata must be plain data, got {type(v).__name__}")


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save_model(loaded_or_model: LoadedModel | nn.Module, path: str | os.PathLike, **meta) -> None:
    """Writes a model atomically (temp file beside `path`, then rename), keeping a LoadedModel's format.

    A bare nn.Module (one from models.build, or with `arch=`/`arch_kwargs=` in meta) is written in our
    format. `meta` may set arch_kwargs, num_classes, input_shape, mean, std and extra (plain data, merged
    into the checkpoint's "extra").
    """
    if isinstance(loaded_or_model, LoadedModel):
        lm = loaded_or_model
    else:
        model = loaded_or_model
        arch = meta.pop("arch", None) or getattr(model, "onp_arch", None)
        kwargs = meta.pop("arch_kwargs", None) or getattr(model, "onp_arch_kwargs", None)
        if arch is None or kwargs is None:
            raise UserError("save_model needs a model from onp_fast.models.build (or arch= and arch_kwargs=)")
        lm = LoadedModel(model, arch, dict(kwargs), int(kwargs.get("num_classes", 0)), _input_shape(kwargs),
                         None, None, "onp-fast", {})
    for key in ("arch_kwargs", "num_classes", "input_shape", "mean", "std"):
        if key in meta:
            lm = dataclasses.replace(lm, **{key: meta.pop(key)})
    extra = dict(lm.extra)
    extra.update(meta.pop("extra", {}) or {})
    extra.update(meta)
    sd = _state_dict(lm.model) if lm.format != "torchscript" or lm.arch != "torchscript" else None
    src = lm.source or {}
    with atomic_path(path) as tmp:
        if lm.format == "onp-fast":
            torch.save(_ours(lm, sd, extra), tmp)
        elif lm.format in ("backdoorbench", "state_dict"):
            out = _prefixed(sd, src.get("prefixed", False))
            wrapper = src.get("wrapper")
            if wrapper is not None:
                out = {**wrapper, src["key"]: out}
            torch.save(out, tmp)
        elif lm.format == "safetensors":
            from safetensors.torch import save_file

            info = _plain(dict(arch=lm.arch, arch_kwargs=lm.arch_kwargs, input_shape=lm.input_shape,
                               mean=lm.mean, std=lm.std, extra=extra))
            save_file(_prefixed(sd, src.get("prefixed", False)), str(tmp),
                      metadata={"onp_fast": json.dumps(info), "format": "pt"})
        elif lm.format == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                script = lm.model if isinstance(lm.model, torch.jit.ScriptModule) else \
                    torch.jit.trace(lm.model.eval(), torch.zeros(1, *lm.input_shape))
                info = _plain(dict(input_shape=lm.input_shape, mean=lm.mean, std=lm.std, extra=extra))
                torch.jit.save(script, str(tmp), _extra_files={_SCRIPT_INFO: json.dumps(info)})
        elif lm.format == "pickle":
            torch.save(lm.model, tmp)
        else:
            raise UserError(f"cannot save format {lm.format!r}")


def _prefixed(sd: dict, prefixed: bool) -> dict:
    return {f"module.{k}": v for k, v in sd.items()} if prefixed else sd


def _ours(lm: LoadedModel, sd: dict, extra: dict) -> dict:
    return {
        "format": FORMAT_TAG,
        "arch": lm.arch,
        "arch_kwargs": _plain(lm.arch_kwargs),
        "num_classes": int(lm.num_classes),
        "input_shape": [int(s) for s in lm.input_shape],
        "mean": _plain(lm.mean),
        "std": _plain(lm.std),
        "state_dict": sd,
        "extra": _plain(extra),
    }


# ---------------------------------------------------------------------------------------------- checks

def check_model_fits(loaded: LoadedModel, data) -> None:
    """One forward pass on a few images of `data` (DataSplits: its train split, so a repair never reads the
    test split; or pixels [N, C, H, W] float32); shape problems (channels, size, too few classes) become a
    one-line UserError."""
    x = data.train_x[:2] if hasattr(data, "train_x") else data[:2]
    num_classes = getattr(data, "num_classes", None)
    name = getattr(data, "name", None) or "the data"
    want_c = loaded.input_shape[0] if loaded.input_shape else None
    if want_c is not None and x.shape[1] != want_c:
        raise UserError(f"model {loaded.arch} takes {want_c}-channel input but {name} has {x.shape[1]} channels")
    pixels_only = isinstance(data, torch.Tensor)  # a tensor's .mean/.std are methods, not statistics
    mean = loaded.mean if loaded.mean is not None else None if pixels_only else getattr(data, "mean", None)
    std = loaded.std if loaded.std is not None else None if pixels_only else getattr(data, "std", None)
    if mean is not None and len(mean) != x.shape[1]:
        raise UserError(f"model {loaded.arch} normalises {len(mean)} channels but {name} has {x.shape[1]} channels")
    from .data import normalize

    inp = normalize(x, mean, std) if mean is not None and std is not None else x
    device = next(loaded.model.parameters(), torch.zeros(())).device
    try:
        with torch.no_grad():
            out = loaded.model.eval()(inp.to(device))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise UserError(f"model {loaded.arch} does not fit {name} (images {list(x.shape[1:])}): "
                        f"{_first_line(exc)}") from None
    if out.dim() != 2:
        raise UserError(f"model {loaded.arch} returns shape {list(out.shape)}, not [batch, classes]")
    if num_classes is not None and out.shape[1] < num_classes:
        raise UserError(f"model {loaded.arch} has {out.shape[1]} outputs but {name} has {num_classes} classes")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["LoadedModel", "load_model", "save_model", "check_model_fits", "check_finite", "parameter_count",
           "FORMAT_TAG", "numpy_safe_globals"]
