"""torch's checkpoint format (.bin / .pt), read and written without torch.

Since torch 1.6, ``torch.save`` writes a zip archive with stored (uncompressed) records:

    <archive>/data.pkl          a pickle of the state dict; each tensor is a call
                                torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                                whose storage is a *persistent id*
                                ('storage', torch.HalfStorage, '<key>', 'cpu', numel)
    <archive>/data/<key>        the raw bytes of storage <key>, 64-byte aligned
    <archive>/byteorder         'little' or 'big' (absent in old files: little)
    <archive>/version, ...      bookkeeping we do not need

Reading a pickle normally means running whatever it asks for (``os.system`` included), so we do
not use ``pickle.load``. Instead ``pickletools.genops`` splits data.pkl into opcodes *without
executing anything*, and ``RestrictedUnpickler`` below interprets only the opcodes a state dict
needs. The only globals it accepts are the tensor-rebuild functions, the storage types and
``collections.OrderedDict`` — and it never imports or calls them: it recognises their names and
does the equivalent numpy work itself. Anything else raises UnsafeCheckpointError naming it.

Tensors come back as read-only numpy views (``as_strided``) on a memory map of the file, so
offsets, strides and storages shared between tensors cost nothing.
"""

from __future__ import annotations

import io
import math
import os
import pickletools
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from glm_numpy.checkpoint.errors import CheckpointError, UnsafeCheckpointError
from glm_numpy.checkpoint.safetensors_io import as_announced

# torch storage type -> numpy dtype of one element (little-endian; uint16 holds bfloat16 bits).
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "IntStorage": np.dtype("<i4"),
    "LongStorage": np.dtype("<i8"),
    "BoolStorage": np.dtype("?"),
}
STORAGE_TYPES = {dtype.newbyteorder("="): name for name, dtype in STORAGE_DTYPES.items()}

REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = ("torch._utils", "_rebuild_parameter")
REBUILD_PARAMETER_WITH_STATE = ("torch._utils", "_rebuild_parameter_with_state")
ORDERED_DICT = ("collections", "OrderedDict")
SAFE_GLOBALS = {
    REBUILD_TENSOR,
    REBUILD_PARAMETER,
    REBUILD_PARAMETER_WITH_STATE,
    ORDERED_DICT,
    *(("torch", name) for name in STORAGE_DTYPES),
}

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_HINT = (
    "torch's legacy (pre-1.6, non-zip) format is not supported; re-save it with torch: "
    "torch.save(torch.load(path, weights_only=True), path, "
    "_use_new_zipfile_serialization=True)"
)
RECORD_ALIGNMENT = 64  # torch aligns storage records so they can be memory-mapped


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


def read_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a torch zip checkpoint (a flat state dict) as read-only numpy views."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if magic != ZIP_MAGIC:
        if magic[:1] == b"\x80":  # a bare pickle: torch's legacy format
            raise CheckpointError(f"{path}: {LEGACY_HINT}")
        raise CheckpointError(f"{path}: not a torch zip checkpoint or a safetensors file")
    archive = TorchZipArchive(path)
    state = RestrictedUnpickler(archive.pickle_bytes(), archive.storage, str(path)).load()
    return _state_dict_tensors(path, state)


def _state_dict_tensors(path: Path, state: object) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r} is not a string")
        if not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
    return state


class TorchZipArchive:
    """The records of a torch zip file, located through the zip central directory."""

    def __init__(self, path: Path):
        self.path = path
        self.file_size = path.stat().st_size
        try:
            with zipfile.ZipFile(path) as archive:
                self.records = {info.filename: info for info in archive.infolist()}
        except Exception as err:  # zipfile raises many types on damaged input
            raise CheckpointError(f"{path}: corrupt or truncated zip archive ({err})") from None
        self._mapped: np.ndarray | None = None
        self.prefix = self._archive_prefix()
        self.byteorder = self._byteorder()

    def _archive_prefix(self) -> str:
        pickles = [name for name in self.records if name.endswith("/data.pkl")]
        pickles = [name for name in pickles if name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: not a torch checkpoint (no <archive>/data.pkl)")
        return pickles[0][: -len("data.pkl")]

    def _byteorder(self) -> str:
        name = self.prefix + "byteorder"
        if name not in self.records:
            return "little"
        order = bytes(self.read_record(name)).decode("ascii", "replace")
        if order not in ("little", "big"):
            raise CheckpointError(f"{self.path}: unknown byteorder record {order!r}")
        return order

    def pickle_bytes(self) -> bytes:
        return bytes(self.read_record(self.prefix + "data.pkl"))

    def read_record(self, name: str) -> np.ndarray:
        """The bytes of a stored record as a read-only uint8 view on the file's memory map."""
        info = self.records.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: record {name!r} is missing")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(
                f"{self.path}: record {name!r} is compressed; torch checkpoints store records "
                "uncompressed (was the file re-zipped?)"
            )
        start = self._data_start(info)
        if start + info.file_size > self.file_size:
            raise CheckpointError(f"{self.path}: record {name!r} runs past the end (truncated?)")
        return self._memory_map()[start : start + info.file_size]

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a record's bytes begin: after its *local* header, whose name and extra field
        lengths may differ from the central directory's (torch pads the extra for alignment)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                header = f.read(30)
        except (OSError, ValueError, OverflowError):
            header = b""
        if len(header) < 30 or header[:4] != ZIP_MAGIC:
            raise CheckpointError(f"{self.path}: corrupt local header for {info.filename!r}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length

    def _memory_map(self) -> np.ndarray:
        if self._mapped is None:
            try:
                mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as err:
                raise CheckpointError(f"{self.path}: cannot memory-map ({err})") from None
            self._mapped = np.asarray(mapped)
        return self._mapped

    def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        """Storage ``key`` as a 1-D array of ``numel`` elements of ``dtype`` (native order)."""
        raw = self.read_record(f"{self.prefix}data/{key}")
        nbytes = numel * dtype.itemsize
        if raw.size < nbytes:
            raise CheckpointError(
                f"{self.path}: storage {key!r} holds {raw.size} bytes, "
                f"{numel} x {dtype.itemsize} expected (truncated?)"
            )
        native = np.dtype(dtype.name)  # canonical: prints as float16, not <f2
        stored = dtype.newbyteorder("<" if self.byteorder == "little" else ">")
        if stored.isnative or stored.itemsize == 1:
            return raw[:nbytes].view(native)
        # The one case where we copy: numpy kernels want native byte order.
        array = raw[:nbytes].view(stored).astype(native)
        array.flags.writeable = False
        return array


class Storage:
    """A storage named by the pickle: loaded (memory-mapped) on first use, then shared."""

    def __init__(self, key: str, dtype: np.dtype, numel: int, loader: Callable):
        self.key, self.dtype, self.numel = key, dtype, numel
        self._loader = loader
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = self._loader(self.key, self.dtype, self.numel)
        return self._array


class RestrictedUnpickler:
    """Interprets the opcodes of a state-dict pickle; executes nothing from the file.

    ``storage_loader(key, dtype, numel)`` returns the 1-D array of a storage record.
    """

    def __init__(self, data: bytes, storage_loader: Callable, source: str = "<pickle>"):
        self.data = data
        self.storage_loader = storage_loader
        self.source = source
        self.stack: list = []
        self.marks: list[list] = []  # stacks saved by MARK
        self.memo: dict[int, object] = {}
        self.storages: dict[str, Storage] = {}

    def load(self) -> object:
        try:
            for opcode, arg, position in pickletools.genops(io.BytesIO(self.data)):
                handler = getattr(self, "op_" + opcode.name, None)
                if handler is None:
                    raise UnsafeCheckpointError(
                        f"{self.source}: pickle opcode {opcode.name} at byte {position} "
                        "is not used by torch state dicts; refusing it"
                    )
                result = handler(arg)
                if opcode.name == "STOP":
                    return result
        except CheckpointError:
            raise
        except Exception as err:  # malformed opcodes or arguments: the file is damaged
            message = f"{self.source}: corrupt pickle ({type(err).__name__}: {err})"
            raise CheckpointError(message) from None
        raise CheckpointError(f"{self.source}: corrupt pickle (no STOP opcode)")

    # --- globals: recognised by name, never imported -------------------------------------
    def resolve(self, module: object, name: object) -> tuple[str, str]:
        if (module, name) not in SAFE_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self.source}: the pickle asks for {module}.{name}, which is not needed to "
                "rebuild tensors; refusing to load it (nothing from the file was executed)"
            )
        return (module, name)

    def op_GLOBAL(self, arg):
        module, name = arg.split(" ", 1)
        self.stack.append(Global(*self.resolve(module, name)))

    def op_STACK_GLOBAL(self, arg):
        name, module = self.stack.pop(), self.stack.pop()
        self.stack.append(Global(*self.resolve(module, name)))

    def op_INST(self, arg):
        module, name = arg.split(" ", 1)
        self.resolve(module, name)
        self.refuse(f"creating an instance of {module}.{name} (INST)")

    def op_OBJ(self, arg):
        items = self.pop_mark()
        self.refuse(f"creating an instance of {_describe(items[0] if items else None)} (OBJ)")

    def op_NEWOBJ(self, arg):
        self.refuse(f"creating an instance of {_describe(self.stack[-2])} (NEWOBJ)")

    def op_NEWOBJ_EX(self, arg):
        self.refuse(f"creating an instance of {_describe(self.stack[-3])} (NEWOBJ_EX)")

    def refuse(self, what: str):
        raise UnsafeCheckpointError(f"{self.source}: the pickle asks for {what}; refusing it")

    # --- the calls a state dict makes --------------------------------------------------------
    def op_REDUCE(self, arg):
        args = self.stack.pop()
        function = self.stack.pop()
        if not isinstance(function, Global) or not isinstance(args, tuple):
            self.refuse(f"a call of {_describe(function)} (REDUCE)")
        self.stack.append(self.call(function, args))

    def call(self, function: Global, args: tuple) -> object:
        key = (function.module, function.name)
        if key == ORDERED_DICT:  # OrderedDict() or OrderedDict([(k, v), ...]); dicts keep order
            pairs = args[0] if args else []
            if len(args) > 1 or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
                raise CheckpointError(f"{self.source}: bad OrderedDict arguments")
            return self.pairs_to_dict({}, [item for pair in pairs for item in pair])
        if key == REBUILD_TENSOR:
            return self.rebuild_tensor(*args[:4])
        if key in (REBUILD_PARAMETER, REBUILD_PARAMETER_WITH_STATE):
            if not isinstance(args[0], np.ndarray):
                raise CheckpointError(f"{self.source}: parameter data is not a tensor")
            return args[0]  # a Parameter is its data; requires_grad and hooks do not matter
        self.refuse(f"a call of {function}")

    def op_BUILD(self, arg):
        state = self.stack.pop()
        target = self.stack[-1]
        # torch's state dict is an OrderedDict carrying a `_metadata` attribute (module
        # versions); that is the only BUILD a checkpoint needs and we can ignore it.
        if not (isinstance(target, dict) and isinstance(state, dict)):
            self.refuse(f"setting the state of a {type(target).__name__} (BUILD)")

    def op_BINPERSID(self, arg):
        self.stack.append(self.persistent_load(self.stack.pop()))

    def persistent_load(self, pid: object) -> Storage:
        """('storage', <storage type>, key, location, numel) -> the Storage it names."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, Global) and storage_type.name in STORAGE_DTYPES):
            raise CheckpointError(f"{self.source}: {storage_type!r} is not a storage type")
        if not isinstance(key, str) or not _is_count(numel):
            raise CheckpointError(f"{self.source}: bad storage reference {pid!r}")
        dtype = STORAGE_DTYPES[storage_type.name].newbyteorder("=")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = Storage(key, dtype, numel, self.storage_loader)
        elif storage.dtype != dtype or storage.numel != numel:
            raise CheckpointError(f"{self.source}: storage {key!r} is used with two dtypes")
        return storage

    def rebuild_tensor(self, storage, offset, size, stride) -> np.ndarray:
        """A tensor of shape ``size`` and element strides ``stride`` starting at ``offset``."""
        if not isinstance(storage, Storage):
            raise CheckpointError(f"{self.source}: tensor rebuilt from a non-storage")
        if not (_is_count(offset) and _is_counts(size) and _is_counts(stride)):
            raise CheckpointError(f"{self.source}: bad tensor geometry {offset}, {size}, {stride}")
        if len(size) != len(stride):
            raise CheckpointError(f"{self.source}: size {size} and stride {stride} differ in rank")
        if 0 in size:
            empty = np.empty(size, storage.dtype)
            empty.flags.writeable = False
            return empty
        # The last element the tensor touches must lie inside the storage.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise CheckpointError(
                f"{self.source}: tensor of size {list(size)} at offset {offset} reaches past "
                f"the {storage.numel} elements of storage {storage.key!r}"
            )
        base = storage.array[offset:]
        strides = tuple(s * storage.dtype.itemsize for s in stride)
        return np.lib.stride_tricks.as_strided(base, size, strides, writeable=False)

    # --- plain data ----------------------------------------------------------------------
    def push_arg(self, arg):
        self.stack.append(arg)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = push_arg
    op_LONG = op_LONG1 = op_LONG4 = op_FLOAT = op_BINFLOAT = push_arg
    op_STRING = op_BINSTRING = op_SHORT_BINSTRING = push_arg
    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = push_arg
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = push_arg

    def op_PROTO(self, arg):
        pass

    def op_FRAME(self, arg):
        pass

    def op_STOP(self, arg):
        return self.stack.pop()

    def op_NONE(self, arg):
        self.stack.append(None)

    def op_NEWTRUE(self, arg):
        self.stack.append(True)

    def op_NEWFALSE(self, arg):
        self.stack.append(False)

    def op_MARK(self, arg):
        self.marks.append(self.stack)
        self.stack = []

    def pop_mark(self) -> list:
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def op_POP(self, arg):
        self.stack.pop()

    def op_POP_MARK(self, arg):
        self.pop_mark()

    def op_DUP(self, arg):
        self.stack.append(self.stack[-1])

    def op_EMPTY_TUPLE(self, arg):
        self.stack.append(())

    def op_TUPLE(self, arg):
        items = tuple(self.pop_mark())  # before touching self.stack: pop_mark replaces it
        self.stack.append(items)

    def op_TUPLE1(self, arg):
        self.stack[-1:] = [tuple(self.stack[-1:])]

    def op_TUPLE2(self, arg):
        self.stack[-2:] = [tuple(self.stack[-2:])]

    def op_TUPLE3(self, arg):
        self.stack[-3:] = [tuple(self.stack[-3:])]

    def op_EMPTY_LIST(self, arg):
        self.stack.append([])

    def op_LIST(self, arg):
        items = self.pop_mark()
        self.stack.append(items)

    def op_APPEND(self, arg):
        value = self.stack.pop()
        self.target(list).append(value)

    def op_APPENDS(self, arg):
        values = self.pop_mark()
        self.target(list).extend(values)

    def op_EMPTY_DICT(self, arg):
        self.stack.append({})

    def op_DICT(self, arg):
        items = self.pop_mark()
        self.stack.append(self.pairs_to_dict({}, items))

    def op_SETITEM(self, arg):
        value, key = self.stack.pop(), self.stack.pop()
        self.pairs_to_dict(self.target(dict), [key, value])

    def op_SETITEMS(self, arg):
        items = self.pop_mark()
        self.pairs_to_dict(self.target(dict), items)

    def pairs_to_dict(self, target: dict, items: list) -> dict:
        for key, value in zip(items[::2], items[1::2]):
            # Only plain keys: hashing arbitrary (e.g. deeply nested) objects could blow up.
            if not isinstance(key, (str, int, float, bytes, type(None))):
                raise CheckpointError(f"{self.source}: dict key of type {type(key).__name__}")
            target[key] = value
        return target

    def target(self, kind: type):
        if not isinstance(self.stack[-1], kind):
            raise CheckpointError(f"{self.source}: expected a {kind.__name__} on the stack")
        return self.stack[-1]

    def op_PUT(self, arg):
        self.memo[arg] = self.stack[-1]

    op_BINPUT = op_LONG_BINPUT = op_PUT

    def op_MEMOIZE(self, arg):
        self.memo[len(self.memo)] = self.stack[-1]

    def op_GET(self, arg):
        if arg not in self.memo:
            raise CheckpointError(f"{self.source}: memo key {arg} used before it was set")
        self.stack.append(self.memo[arg])

    op_BINGET = op_LONG_BINGET = op_GET


class Global:
    """A global the pickle named and we accepted: its name only, never the real object."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __repr__(self) -> str:
        return f"{self.module}.{self.name}"


def _describe(value: object) -> str:
    """A short name for an object on the stack (never the repr of something huge)."""
    return repr(value) if isinstance(value, Global) else f"a {type(value).__name__}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_counts(values: object) -> bool:
    return isinstance(values, tuple) and all(_is_count(v) for v in values)


# ------------------------------------------------------------------------------------------
# Writing (so full-size .bin checkpoints can be made without torch)
# ------------------------------------------------------------------------------------------


def write_torch_zip(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a flat state dict the way torch.save does (torch.load(weights_only=True) reads it).

    Each tensor gets its own contiguous storage; uint16 arrays are written as bfloat16. The file
    appears under ``path`` only once complete.
    """
    entries = [(name, np.asarray(array).dtype, np.shape(array)) for name, array in tensors.items()]
    write_torch_zip_stream(path, entries, tensors.values())


def write_torch_zip_stream(
    path: str | Path,
    entries: list[tuple[str, np.dtype, tuple[int, ...]]],
    arrays: Iterable[np.ndarray],
) -> None:
    """Like write_torch_zip, for tensors that arrive one at a time: ``entries`` (name, dtype,
    shape) describe them up front (the pickle comes first), ``arrays`` yields them in order."""
    path = Path(path)
    for name, dtype, _ in entries:
        if np.dtype(dtype).newbyteorder("=") not in STORAGE_TYPES:
            raise CheckpointError(f"tensor {name!r}: cannot store dtype {dtype} in a .bin")
    prefix = path.name.split(".")[0] or "archive"
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as archive:
            _write_record(archive, f, f"{prefix}/data.pkl", state_dict_pickle(entries))
            _write_record(archive, f, f"{prefix}/.format_version", b"1")
            _write_record(archive, f, f"{prefix}/.storage_alignment", b"64")
            _write_record(archive, f, f"{prefix}/byteorder", b"little")
            arrays = iter(arrays)
            for key, (name, dtype, shape) in enumerate(entries):
                array = as_announced(name, dtype, shape, next(arrays, None))
                _write_record(archive, f, f"{prefix}/data/{key}", array)
            _write_record(archive, f, f"{prefix}/version", b"3\n")
            _write_record(archive, f, f"{prefix}/.data/serialization_id", b"0" * 40)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_record(archive: zipfile.ZipFile, f, name: str, data: bytes | np.ndarray) -> None:
    """Append one stored record whose bytes start on a 64-byte boundary (like torch)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    nbytes = len(data)
    zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # the rule zipfile itself applies
    name_bytes = name.encode("utf-8")
    header_size = 30 + len(name_bytes) + 4 + (20 if zip64 else 0)
    padding = -(f.tell() + header_size) % RECORD_ALIGNMENT
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = nbytes
    # An extra field of id 'FB' (as torch writes) whose only job is padding.
    info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding
    with archive.open(info, "w", force_zip64=zip64) as out:
        view = memoryview(data)
        chunk = 1 << 26
        for start in range(0, nbytes, chunk):
            out.write(view[start : start + chunk])


def state_dict_pickle(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The data.pkl of a flat state dict, built opcode by opcode (protocol 2, as torch uses).

    OrderedDict([(name, _rebuild_tensor_v2(<storage i>, 0, shape, stride, False,
    OrderedDict())), ...]) where <storage i> is the persistent id
    ('storage', torch.<Type>Storage, 'i', 'cpu', numel).
    """
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    out.write(_global(*ORDERED_DICT) + b")R")  # OrderedDict()  (EMPTY_TUPLE, REDUCE)
    out.write(b"(")  # MARK: the (name, tensor) items follow
    for key, (name, dtype, shape) in enumerate(entries):
        storage_type = STORAGE_TYPES[np.dtype(dtype).newbyteorder("=")]
        out.write(_unicode(name))
        out.write(_global(*REBUILD_TENSOR))
        out.write(b"(")  # MARK: its arguments
        out.write(b"(" + _unicode("storage") + _global("torch", storage_type))
        out.write(
            _unicode(str(key)) + _unicode("cpu") + _int(math.prod(shape)) + b"tQ"
        )  # BINPERSID
        out.write(_int(0))  # storage offset
        out.write(_int_tuple(shape))
        out.write(_int_tuple(_contiguous_strides(shape)))
        out.write(b"\x89")  # NEWFALSE: requires_grad
        out.write(_global(*ORDERED_DICT) + b")R")  # backward hooks: OrderedDict()
        out.write(b"tR")  # TUPLE the arguments, REDUCE
    out.write(b"u.")  # SETITEMS, STOP
    return out.getvalue()


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode("ascii")


def _unicode(text: str) -> bytes:
    encoded = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def _int(value: int) -> bytes:
    if 0 <= value < 2**31:
        return b"J" + struct.pack("<i", value)  # BININT
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(encoded)]) + encoded  # LONG1


def _int_tuple(values: tuple[int, ...]) -> bytes:
    return b"(" + b"".join(_int(v) for v in values) + b"t"
