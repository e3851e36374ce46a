"""Malicious pickles: refused with UnsafeCheckpointError, and nothing from them ever runs.

Each payload is written by hand, opcode by opcode, and first shown to work against the real
``pickle.loads`` (in a subprocess) so the "nothing ran" assertions mean something.
"""

import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from glm_numpy.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    read_torch_file,
    write_torch_zip,
)
from glm_numpy.checkpoint.torch_zip import RestrictedUnpickler

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK, TUPLE, TUPLE1, REDUCE, STOP = b"(", b"t", b"\x85", b"R", b"."
EMPTY_DICT, EMPTY_TUPLE, BUILD, SETITEM = b"}", b")", b"b", b"s"


def text(value: str) -> bytes:  # BINUNICODE
    encoded = value.encode()
    return b"X" + struct.pack("<I", len(encoded)) + encoded


def short_text(value: str) -> bytes:  # SHORT_BINUNICODE (protocol 4)
    return b"\x8c" + bytes([len(value)]) + value.encode()


def global_(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + f"{module}\n{name}\n".encode()


def stack_global(module: str, name: str) -> bytes:  # STACK_GLOBAL
    return short_text(module) + short_text(name) + b"\x93"


def touch_command(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def opcodes(*parts: bytes) -> bytes:
    return b"".join(parts)


def call(function: bytes, *args: bytes) -> bytes:
    """function(*args) as MARK args TUPLE REDUCE."""
    return opcodes(function, MARK, *args, TUPLE, REDUCE)


def payloads(marker):
    """name -> pickle bytes; each creates ``marker`` when loaded by the real pickle module."""
    shell = text(f"touch {marker}")
    python = text(touch_command(marker))
    os_system = global_("os", "system")
    import_os = call(global_("builtins", "__import__"), text("os"))
    return {
        "GLOBAL os.system + REDUCE": opcodes(PROTO2, call(os_system, shell), STOP),
        "GLOBAL posix.system + REDUCE": opcodes(
            PROTO2, call(global_("posix", "system"), shell), STOP
        ),
        "builtins.eval": opcodes(PROTO2, call(global_("builtins", "eval"), python), STOP),
        "builtins.exec": opcodes(PROTO2, call(global_("builtins", "exec"), python), STOP),
        "builtins.__import__": opcodes(
            PROTO2,
            call(call(global_("builtins", "getattr"), import_os, text("system")), shell),
            STOP,
        ),
        "STACK_GLOBAL subprocess.call": opcodes(
            PROTO4,
            stack_global("subprocess", "call"),
            b"]",  # EMPTY_LIST, then APPEND the argv
            short_text("touch") + b"a" + short_text(str(marker)) + b"a",
            TUPLE1,
            REDUCE,
            STOP,
        ),
        "INST os.system": opcodes(MARK, b"V", f"touch {marker}".encode(), b"\nios\nsystem\n", STOP),
        "OBJ os.system": opcodes(PROTO2, MARK, os_system, shell, b"o", STOP),
        # BUILD with a __setstate__ smuggled into an object's __dict__, then called by BUILD
        "BUILD __setstate__": opcodes(
            PROTO2,
            call(global_("collections", "OrderedDict")),
            EMPTY_DICT + text("__setstate__") + os_system + SETITEM,
            BUILD,
            shell,
            BUILD,
            STOP,
        ),
    }


def run_real_pickle(data: bytes, tmp_path) -> None:
    """Load with the real pickle module, in a child process (this is the dangerous path)."""
    path = tmp_path / "payload.pkl"
    path.write_bytes(data)
    code = "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())"
    subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=60)


def torch_zip_with_pickle(path, data: bytes):
    """A torch-format archive whose data.pkl is ``data``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("name", list(payloads("m")))
def test_payload_is_refused_and_nothing_runs(tmp_path, name):
    marker = tmp_path / "pwned"
    data = payloads(marker)[name]
    run_real_pickle(data, tmp_path)
    assert marker.exists(), "the payload should work against pickle.loads"
    marker.unlink()

    checkpoint = torch_zip_with_pickle(tmp_path / "evil.bin", data)
    with pytest.raises(UnsafeCheckpointError) as error:
        read_torch_file(checkpoint)
    assert str(checkpoint) in str(error.value)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize(
    "data, named",
    [
        (PROTO2 + global_("os", "system") + STOP, "os.system"),
        (PROTO4 + stack_global("builtins", "eval") + STOP, "builtins.eval"),
        (PROTO2 + global_("builtins", "__import__") + STOP, "builtins.__import__"),
        (MARK + b"isubprocess\ncall\n" + STOP, "subprocess.call"),
        (PROTO2 + global_("torch", "load") + STOP, "torch.load"),
        (PROTO2 + global_("numpy", "frombuffer") + STOP, "numpy.frombuffer"),
        (PROTO2 + global_("subprocess", "Popen") + EMPTY_TUPLE + b"\x81" + STOP, "Popen"),
    ],
)
def test_the_error_names_the_refused_global(data, named):
    with pytest.raises(UnsafeCheckpointError, match=named.replace(".", r"\.")):
        RestrictedUnpickler(data, lambda *args: None).load()


@pytest.mark.parametrize(
    "data",
    [
        # INST / OBJ / NEWOBJ even on an allowed class: torch never builds objects that way
        MARK + b"icollections\nOrderedDict\n" + STOP,
        PROTO2 + MARK + global_("collections", "OrderedDict") + b"o" + STOP,
        PROTO2 + global_("collections", "OrderedDict") + EMPTY_TUPLE + b"\x81" + STOP,
        # REDUCE on something that is not a rebuild function
        PROTO2 + global_("torch", "FloatStorage") + EMPTY_TUPLE + REDUCE + STOP,
        PROTO2 + text("os.system") + EMPTY_TUPLE + REDUCE + STOP,
        # BUILD on anything but the state dict's metadata
        PROTO2
        + global_("collections", "OrderedDict")
        + EMPTY_TUPLE
        + REDUCE
        + text("x")
        + BUILD
        + STOP,
        PROTO2 + b"]" + EMPTY_DICT + BUILD + STOP,
        # the copyreg extension registry resolves to arbitrary globals
        PROTO2 + b"\x82\x01" + STOP,
        # protocol 0 persistent ids
        b"Pstorage\n" + STOP,
    ],
)
def test_object_construction_outside_the_tensor_recipe_is_refused(data):
    with pytest.raises(UnsafeCheckpointError):
        RestrictedUnpickler(data, lambda *args: None).load()


def test_allowed_globals_are_never_imported(tmp_path, monkeypatch):
    """Loading a real checkpoint must not import torch (nor anything the pickle names)."""
    path = tmp_path / "ours.bin"
    write_torch_zip(path, {"w": np.ones((2, 2), np.float16)})
    code = (
        "import sys; from glm_numpy.checkpoint import read_torch_file; "
        f"t = read_torch_file({str(path)!r}); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(t['w'].sum())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4.0"


def test_unsafe_is_a_checkpoint_error():
    assert issubclass(UnsafeCheckpointError, CheckpointError)
