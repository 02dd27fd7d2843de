"""Checkpoint files: safe reading (weights-only, OmegaConf stand-ins, mmap, clear errors), atomic writing."""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import typing
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from utils import atomic_write, is_main_process


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs pickled globals that are not allowed for safe (weights-only) loading."""

    def __init__(self, path: str, unsafe_globals: list[str], detail: str = "") -> None:
        self.path = path
        self.unsafe_globals = list(unsafe_globals)
        names = ", ".join(self.unsafe_globals) if self.unsafe_globals else "unknown globals"
        message = (
            f"refusing to load checkpoint {path}: it requires the pickled global(s) {names}, which are "
            "not allowed when loading with weights_only=True. If you trust this file, load it with "
            "--trust_checkpoint (load_checkpoint(path, trust=True)), which runs the full unpickler."
        )
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written or did not read back intact."""


def verify_checkpoint_file(path: str) -> None:
    """Check that a zip-format checkpoint is complete: every member present and its CRC correct."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointWriteError(f"checkpoint {path} does not read back intact: {exc}") from None
    if bad is not None:
        raise CheckpointWriteError(f"checkpoint {path} does not read back intact: member {bad} is corrupt")


def save_checkpoint(obj: Any, path: str | os.PathLike[str], verify: bool = True) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically; with ``verify`` the new file is read back first."""
    atomic_write(path, lambda handle: torch.save(obj, handle), verify=verify_checkpoint_file if verify else None,
                 sync_dir=True)


def save_on_master(obj: Any, path: str | os.PathLike[str]) -> None:
    if is_main_process():
        save_checkpoint(obj, path)


# Inert stand-ins for OmegaConf classes in original checkpoints; loaded as plain dicts/lists.


class _OmegaConfStub:
    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)


class _DictConfigStub(_OmegaConfStub):
    pass


class _ListConfigStub(_OmegaConfStub):
    pass


class _ValueNodeStub(_OmegaConfStub):
    pass


class _MetadataStub(_OmegaConfStub):
    pass


def _plain_defaultdict(*_args: Any) -> dict:
    """Stand-in for ``collections.defaultdict`` (OmegaConf's resolver cache, discarded): a plain dict."""
    return {}


_OMEGACONF_GLOBALS: list[tuple[Any, str]] = [
    (_DictConfigStub, "omegaconf.dictconfig.DictConfig"),
    (_ListConfigStub, "omegaconf.listconfig.ListConfig"),
    (_ValueNodeStub, "omegaconf.nodes.AnyNode"),
    (_ValueNodeStub, "omegaconf.nodes.StringNode"),
    (_ValueNodeStub, "omegaconf.nodes.IntegerNode"),
    (_ValueNodeStub, "omegaconf.nodes.FloatNode"),
    (_ValueNodeStub, "omegaconf.nodes.BooleanNode"),
    (_MetadataStub, "omegaconf.base.ContainerMetadata"),
    (_MetadataStub, "omegaconf.base.Metadata"),
    (typing.Any, "typing.Any"),
    (_plain_defaultdict, "collections.defaultdict"),
    (dict, "builtins.dict"),
    (list, "builtins.list"),
    (str, "builtins.str"),
    (int, "builtins.int"),
    (float, "builtins.float"),
    (bool, "builtins.bool"),
]
_OMEGACONF_NAMES = {name: cls for cls, name in _OMEGACONF_GLOBALS}


def omegaconf_safe_globals() -> list[tuple[Any, str]]:
    """The ``(object, "module.name")`` pairs allowed on top of torch's weights-only defaults."""
    return list(_OMEGACONF_GLOBALS)


def _omegaconf_to_plain(node: Any) -> Any:
    if isinstance(node, _ValueNodeStub):
        return _omegaconf_to_plain(node.__dict__.get("_val"))
    if isinstance(node, (_DictConfigStub, _ListConfigStub)):
        content = node.__dict__.get("_content")
        if isinstance(content, Mapping):
            return {key: _omegaconf_to_plain(value) for key, value in content.items()}
        if isinstance(content, (list, tuple)):
            return [_omegaconf_to_plain(value) for value in content]
        return content  # None, or the "???" / "${...}" strings of missing and interpolated values
    if isinstance(node, Mapping):
        return {key: _omegaconf_to_plain(value) for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_omegaconf_to_plain(value) for value in node)
    return node


def _replace_stubs(obj: Any, seen: set[int] | None = None) -> Any:
    """Replace stand-ins inside ``obj``; containers without stand-ins are kept as they are."""
    if isinstance(obj, _OmegaConfStub):
        return _omegaconf_to_plain(obj)
    if isinstance(obj, torch.Tensor) or not isinstance(obj, (dict, list, tuple)):
        return obj
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        for key, value in list(obj.items()):
            new = _replace_stubs(value, seen)
            if new is not value:
                obj[key] = new
        return obj
    if isinstance(obj, list):
        for index, value in enumerate(obj):
            new = _replace_stubs(value, seen)
            if new is not value:
                obj[index] = new
        return obj
    items = [_replace_stubs(value, seen) for value in obj]
    if all(new is old for new, old in zip(items, obj)):
        return obj
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


class _StubUnpickler(pickle.Unpickler):
    """Full unpickler that maps OmegaConf classes to the stand-ins (used with ``trust=True``)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("omegaconf."):
            stub = _OMEGACONF_NAMES.get(f"{module}.{name}")
            if stub is not None:
                return stub
        return super().find_class(module, name)


class _StubPickleModule:
    """A ``pickle_module`` for ``torch.load`` that uses :class:`_StubUnpickler`."""

    __name__ = "simla_stub_pickle"
    Unpickler = _StubUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _StubUnpickler(file, **kwargs).load()


def _is_zip_file(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def check_checkpoint_format(path: str) -> None:
    """Raise ``ValueError`` unless ``path`` starts like a PyTorch checkpoint (zip, legacy pickle or tar)."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return
    found = "the file is empty" if not head else f"it starts with {head[:24]!r}"
    raise ValueError(f"{path} is not a PyTorch checkpoint ({found}; expected the zip archive torch.save writes, "
                     "or a legacy pickle or tar file)")


_GLOBAL_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_ALLOWED_PICKLE_GLOBALS = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                           "torch.FloatStorage", "torch.LongStorage", "torch.DoubleStorage", "torch.HalfStorage",
                           "torch.IntStorage", "torch.BFloat16Storage", "torch.ByteStorage", "torch.BoolStorage",
                           "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2"}


def _scan_pickles(path: str, count: int = 5) -> tuple[list[str], bool]:
    """Globals the pickles refer to (read, not executed) and whether the pickles are complete."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
        else:
            streams = [data]
    except (OSError, zipfile.BadZipFile, EOFError):
        return [], False
    found: list[str] = []
    complete = True
    for stream in streams:
        position = 0
        for index in range(count if len(streams) == 1 else 1):
            if index and position >= len(stream):
                break  # a plain pickle file: one pickle and nothing after it
            strings: list[str] = []
            memo: dict[int, Any] = {}
            stopped = False
            try:
                for opcode, arg, offset in pickletools.genops(stream[position:]):
                    name = opcode.name
                    if name in ("GLOBAL", "INST") and isinstance(arg, str):
                        found.append(arg.replace(" ", "."))
                    elif name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(arg, str):
                        strings.append(arg)
                    elif name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                        strings.append(memo[arg])
                    if name == "STOP":
                        position += offset + 1
                        stopped = True
                        break
            except Exception:  # damaged or foreign bytes
                stopped = False
            if not stopped:
                complete = False
                break
    unsafe = sorted({g for g in found if g not in _ALLOWED_PICKLE_GLOBALS and _GLOBAL_NAME.fullmatch(g)})
    return unsafe, complete


def _unsafe_globals(path: str, message: str) -> list[str]:
    found: list[str] = []
    try:
        with torch.serialization.safe_globals(omegaconf_safe_globals()):
            found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files or unreadable pickles: fall back to the message
        found = []
    if not found:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    if not found and "Unsupported operand" in message:
        found = _scan_pickles(path)[0]
    return found


def _unpickler_reason(message: str) -> str:
    """The line of torch's weights-only error message that says what was rejected."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line or "Can only" in line:
            return line.strip()[:300]
    return ""


def load_checkpoint(path: str | os.PathLike[str], trust: bool = False) -> Any:
    """Load a checkpoint on the CPU, running no pickled code unless ``trust``; damage: ``RuntimeError``."""
    file = os.fspath(path)
    if not os.path.isfile(file):
        raise FileNotFoundError(2, "checkpoint file not found", file)
    use_mmap = _is_zip_file(file)
    try:
        if trust:
            obj = torch.load(
                file,
                map_location="cpu",
                weights_only=False,
                mmap=use_mmap,
                pickle_module=_StubPickleModule,
            )
        else:
            with torch.serialization.safe_globals(omegaconf_safe_globals()):
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = [] if trust else _unsafe_globals(file, message)
        unsafe = [name for name in found if _GLOBAL_NAME.fullmatch(name)]
        if (found and not unsafe) or (not trust and not _scan_pickles(file)[1]):
            # a non-identifier "global" or a pickle without STOP is a damaged file, not a request for code
            raise RuntimeError(f"failed to read checkpoint {file}: the file is truncated or corrupt "
                               f"({_unpickler_reason(message) or message[:200]})") from None
        if not trust and (unsafe or "GLOBAL" in message or "allowlist" in message or "Unsupported" in message):
            reason = "" if unsafe else _unpickler_reason(message)
            raise UnsafeCheckpointError(file, unsafe, reason) from None
        raise RuntimeError(f"failed to read checkpoint {file}: {message}") from exc
    except PermissionError:
        raise
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            ImportError, OSError, struct.error, OverflowError, MemoryError) as exc:
        raise RuntimeError(f"failed to read checkpoint {file}: the file is truncated or corrupt "
                           f"({type(exc).__name__}: {exc})") from exc
    return _replace_stubs(obj)


def read_checkpoint(path: str, trust: bool = False) -> dict[str, Any]:
    """Load a checkpoint file safely and check that it holds a ``model`` state_dict."""
    print(f"load checkpoint from {path}")
    checkpoint = load_checkpoint(path, trust=trust)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: expected a checkpoint dict, found a {type(checkpoint).__name__}")
    if "model" not in checkpoint:
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return {"model": checkpoint}
        raise KeyError(f"{path}: no 'model' entry (keys: {sorted(checkpoint)[:10]})")
    return checkpoint


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{epoch:02d}.pth")
