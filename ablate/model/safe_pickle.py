"""Read a `torch.save` zip checkpoint without executing anything it names (reference §11.1, §9.14).

The archive holds `<prefix>/data.pkl` and one `<prefix>/data/<key>` file per storage. The pickle
is run by a restricted unpickler that never imports a module and never calls a function the file
names, except a short allow-list of value constructors:

- tensors: `torch._utils._rebuild_tensor_v2` (and the parameter variants), rebuilt by ablate
  from the storage bytes, always on the CPU; storage types and dtypes are plain tokens;
- numpy arrays, scalars and dtypes (numpy's own constructors, with their arguments checked);
- `collections.OrderedDict`, `set`, `frozenset`, `complex`, `slice`, `torch.Size`, `torch.device`
  and latin-1 `_codecs.encode` (how protocol 2 stores bytes).

Any other global becomes an inert `Global` token; an object built from it (NEWOBJ + BUILD, how a
dataclass such as the reference's `HarmonyModelConfig` is pickled) becomes a `Record` of its
fields. A *call* of such a global (REDUCE, INST/OBJ with arguments, e.g. a `__reduce__` to
`os.system`) is refused with an InputError before anything runs.
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ablate.errors import InputError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_RENAMED_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}  # protocol-2 spellings


@dataclass(frozen=True)
class Global:
    """A global the pickle named but that ablate does not import: module and name only."""

    module: str
    name: str

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class Record:
    """An inert stand-in for an object of a class ablate did not import: its fields, nothing else."""

    cls: Global
    args: tuple = ()
    fields: dict[str, Any] = field(default_factory=dict)
    state: Any = None  # a non-dict BUILD state, kept as it was

    def _build(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state, slots = state
        for part in (state, slots):
            if isinstance(part, dict):
                self.fields.update({str(k): v for k, v in part.items()})
            elif part is not None:
                self.state = part


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


@dataclass
class _Storage:
    dtype: torch.dtype
    numel: int
    flat: torch.Tensor | None  # None when only the structure is read (materialise=False)


class Refused(Exception):
    """The pickle asked to call something that is not on the allow-list."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _refuse_call(func: Any) -> None:
    name = func.qualname if isinstance(func, Global) else repr(func)
    raise Refused(name)


# ------------------------------------------------------------------- allow-listed constructors


def _ints(xs: Any, what: str) -> tuple[int, ...]:
    if not isinstance(xs, (tuple, list)) or not all(type(x) is int for x in xs):
        raise pickle.UnpicklingError(f"{what} must be a tuple of ints, got {xs!r}")
    return tuple(xs)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage) or type(offset) is not int:
        raise pickle.UnpicklingError("a tensor's storage is not a storage of this archive")
    size, stride = _ints(size, "tensor size"), _ints(stride, "tensor stride")
    if storage.flat is None:
        return torch.empty_strided(size, stride, dtype=storage.dtype, device="meta")
    return storage.flat.as_strided(size, stride, offset)  # bounds-checked against the storage


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter's data is not a tensor")
    return data


def _rebuild_from_type(func, new_type, args, state=None):
    if func not in (_rebuild_tensor, _rebuild_parameter):
        _refuse_call(func)
    return func(*args)  # a plain tensor; the subclass and its Python state are dropped


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin1")


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("torch.device takes a string and an optional int")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _size(dims=()):
    return torch.Size(_ints(dims, "torch.Size"))


@functools.lru_cache(maxsize=None)
def _numpy_calls() -> dict[str, Any]:
    import numpy as np

    reconstruct = np.array(0).__reduce__()[0]  # numpy's own functions, whatever their module
    scalar = np.float64(0).__reduce__()[0]

    def np_reconstruct(subtype, shape, dtype):
        if subtype is not np.ndarray or not isinstance(dtype, (bytes, str)):
            raise pickle.UnpicklingError("numpy _reconstruct is only allowed for plain ndarrays")
        return reconstruct(np.ndarray, _ints(shape, "array shape"), dtype)

    def np_scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
            raise pickle.UnpicklingError("numpy scalar is only allowed for non-object dtypes")
        return scalar(dtype, data)

    def np_dtype(spec, align=False, copy=False):
        if not isinstance(spec, str):
            raise pickle.UnpicklingError("numpy dtype is only allowed from a type string")
        return np.dtype(spec, bool(align), bool(copy))

    return {"_reconstruct": np_reconstruct, "scalar": np_scalar, "dtype": np_dtype, "ndarray": np.ndarray}


def _reconstructor(cls, base, state=None):
    """copyreg._reconstructor (protocols 0/1): a record of `cls`, never base.__new__/__init__."""
    if not isinstance(cls, Global) or base is not object:
        _refuse_call(cls)
    return Record(cls, () if state is None else (state,))


def _newobj(cls, *args):
    """copyreg.__newobj__: cls.__new__(cls, *args), which for an unimported class is a record."""
    if not isinstance(cls, Global):
        _refuse_call(cls)
    return Record(cls, args)


_CALLS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copyreg", "__newobj__"): _newobj,
}


class _Unpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode is overridable
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, materialise: bool):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.materialise = archive, prefix, materialise
        self.storages: dict[str, _Storage] = {}
        self.safe: dict[int, Any] = {}

    def _allow(self, obj):
        self.safe[id(obj)] = obj
        return obj

    def find_class(self, module: str, name: str):
        module = _RENAMED_MODULES.get(module, module)
        if (module, name) in _CALLS:
            return self._allow(_CALLS[(module, name)])
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # no lazy imports
            return vars(torch)[name]
        if module == "builtins" and name == "object":
            return object
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            calls = _numpy_calls()
            if module == "numpy" and name in ("ndarray", "dtype") or module != "numpy" and name in (
                    "_reconstruct", "scalar"):
                return calls[name] if name == "ndarray" else self._allow(calls[name])
        return Global(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and type(pid[4]) is int):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, kind, key, _location, numel = pid  # the location is ignored: always the CPU
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            nbytes = numel * kind.dtype.itemsize
            try:
                size = self.archive.getinfo(name).file_size
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key!r} is missing from the archive") from None
            if size != nbytes:
                raise pickle.UnpicklingError(f"storage {key!r} has {size} bytes, expected {nbytes}")
            flat = None
            if self.materialise:
                raw = bytearray(self.archive.read(name))
                flat = torch.frombuffer(raw, dtype=kind.dtype) if raw else torch.empty(0, dtype=kind.dtype)
            self.storages[key] = _Storage(kind.dtype, numel, flat)
        return self.storages[key]

    def _call(self, func, args):
        if id(func) in self.safe and self.safe[id(func)] is func:
            return func(*args)
        _refuse_call(func)

    def load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if kwargs:
            _refuse_call(cls)
        self.append(self._new(cls, args))

    def _new(self, cls, args):
        if isinstance(cls, Global):
            return Record(cls, tuple(args))
        if cls is collections.OrderedDict and not args:
            return collections.OrderedDict()
        _refuse_call(cls)

    def _instantiate(self, klass, args):  # INST / OBJ (protocols 0 and 1)
        if isinstance(klass, Global) and not args:
            self.append(Record(klass))
        else:
            self.append(self._call(klass, args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Record):
            inst._build(state)
        elif isinstance(inst, collections.OrderedDict) and not state:
            pass
        elif type(inst).__module__.startswith("numpy") and self._numpy_value(inst):
            inst.__setstate__(state)  # numpy's own array/dtype state: shape, dtype, raw bytes
        else:
            raise pickle.UnpicklingError(f"BUILD on a {type(inst).__name__} is not allowed")

    @staticmethod
    def _numpy_value(inst) -> bool:
        import numpy as np

        return type(inst) is np.ndarray or isinstance(inst, np.dtype)

    def get_extension(self, code):
        raise pickle.UnpicklingError("copyreg extension codes are not allowed")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def is_torch_zip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_torch_zip(path: str | Path, materialise: bool = True) -> Any:
    """The object a `torch.save` zip archive holds, read safely (see the module docstring).

    materialise=False reads only the structure: tensors come back on the meta device (cheap; used
    to check a checkpoint's config before the weights are needed).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkls = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkls) != 1:
                raise InputError(f"Checkpoint {str(path)!r} is a zip archive but not a torch.save "
                                 f"checkpoint (found {len(pkls)} '<name>/data.pkl' entries, expected "
                                 "1). Point the spec at the reference's checkpoint.pt or a "
                                 "safetensors file.")
            prefix = pkls[0].split("/")[0]
            order = f"{prefix}/byteorder"
            if order in archive.namelist() and archive.read(order).strip() != b"little":
                raise InputError(f"Checkpoint {str(path)!r} was written on a big-endian machine; "
                                 "ablate reads little-endian checkpoints only. Re-save it on x86 or ARM.")
            return _Unpickler(archive.read(pkls[0]), archive, prefix, materialise).load()
    except Refused as exc:
        raise InputError(
            f"Checkpoint {str(path)!r} was refused: its pickle asks to call {exc.what}(...) while "
            "loading, which would run code named by the file. Nothing was executed: ablate reads "
            "checkpoints without running them (tensors, numpy arrays and plain values are rebuilt, "
            "other objects become inert records, calls are refused). Use the original checkpoint "
            "written by the reference's training script, or, if you trust this file, load it "
            "yourself and save its model_state_dict with safetensors.torch.save_file, then point "
            "the spec (or `ablate convert-checkpoint`) at that file.") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            RuntimeError, KeyError, IndexError, AttributeError, OSError) as exc:
        raise InputError(f"Checkpoint {str(path)!r} is not a readable torch.save checkpoint "
                         f"({type(exc).__name__}: {exc}); it is corrupt, truncated or of an "
                         "unsupported kind. Re-copy it, or point the spec at an intact "
                         "checkpoint.pt or safetensors file.") from exc
