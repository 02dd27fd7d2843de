"""Malicious and truncated checkpoint campaign.

Planted checkpoints hold pickled objects that run code when unpickled (``__reduce__`` to ``os.system``,
``exec``, ``eval``, ``subprocess``, ``getattr`` chains, nested ``pickle.loads``, ``functools.partial``,
and hand-written INST / OBJ opcodes), placed at the top level, in the model or optimizer state, in the
config, in the scheduler state or deep inside a nested dict, saved in torch's zip format, its legacy
format or as a plain pickle. The payload only creates a marker file. Every file is loaded through
``engine.checkpoint.load_checkpoint`` and ``engine.checkpoint.read_checkpoint``, and a few through an entry script
with ``--checkpoint``.

Outcomes per load: ``refused, names global and flag`` (the message names one of the payload's globals
and ``--trust_checkpoint``), ``refused, message incomplete`` or ``loaded, nothing ran`` (counted, not
lost), and ``lost`` when the marker file exists afterwards.

Truncated checkpoints (a valid file cut at a random offset, zip and legacy format) must fail with an
error naming the file; loading one silently with different contents is lost.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import io
import os
import pickle
import random
import re
import shlex
import subprocess
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fault_campaign.common import (
    LOST,
    PYTHON,
    REPO,
    CampaignReport,
    CaseResult,
    demo_data,
    script_env,
    short,
)

REFUSED = "refused, names global and flag"
REFUSED_VAGUE = "refused, message incomplete"
LOADED_SAFE = "loaded, nothing ran"
CLEAR_ERROR = "clear error"
READ_INTACT = "read, cut hit no data"
TRUST_FLAG = "--trust_checkpoint"
SCRIPT_TIMEOUT = 300.0


class Payload:
    """Unpickling this object calls ``function(*arguments)``."""

    def __init__(self, function: Any, arguments: tuple[Any, ...]) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.arguments


class CallablePayload(Payload):
    """A payload usable as the callable of another payload (pickle requires a callable there)."""

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError("a payload is only meant to be pickled")


def _write_marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('executed')"


def _touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


# technique -> builds (payload object, globals a refusal may name)
TECHNIQUES: dict[str, Callable[[Path], tuple[Any, list[str]]]] = {
    "os_system": lambda m: (Payload(os.system, (_touch(m),)), [f"{os.system.__module__}.system"]),
    "builtins_exec": lambda m: (Payload(exec, (_write_marker_code(m),)), ["builtins.exec"]),
    "builtins_eval": lambda m: (Payload(eval, (_write_marker_code(m),)), ["builtins.eval"]),
    "subprocess_call": lambda m: (Payload(subprocess.call, (["touch", str(m)],)), ["subprocess.call"]),
    "subprocess_popen": lambda m: (Payload(subprocess.Popen, (["touch", str(m)],)), ["subprocess.Popen"]),
    "getattr_chain": lambda m: (
        Payload(CallablePayload(getattr, (CallablePayload(importlib.import_module, ("os",)), "system")),
                (_touch(m),)),
        ["builtins.getattr", "importlib.import_module"]),
    "nested_pickle_loads": lambda m: (
        Payload(pickle.loads, (pickle.dumps(Payload(os.system, (_touch(m),))),)),
        [f"{pickle.loads.__module__}.loads", "pickle.loads"]),
    "functools_partial": lambda m: (
        Payload(CallablePayload(functools.partial, (os.system, _touch(m))), ()),
        ["functools.partial", f"{os.system.__module__}.system"]),
}
# hand-written pickles (protocol 0/1 opcodes): INST and OBJ build an object by calling a global
OPCODE_TECHNIQUES = ("inst_opcode", "obj_opcode")
PLACEMENTS = ("top", "model", "optimizer", "config", "nested", "scheduler")
FORMATS = ("zip", "legacy", "raw_pickle")


def crafted_pickle(technique: str, marker: Path) -> bytes:
    """A protocol-0/1 pickle whose INST or OBJ opcode calls ``os.system`` to create ``marker``."""
    command = _touch(marker)
    if "'" in command.replace(shlex.quote(str(marker)), "") or "\n" in command:
        raise ValueError(f"marker path {marker} cannot be embedded in a hand-written pickle")
    literal = repr(command).encode()
    if technique == "inst_opcode":
        return b"(S" + literal + b"\nios\nsystem\n."
    if technique == "obj_opcode":
        return b"(cos\nsystem\nS" + literal + b"\no."
    raise ValueError(f"unknown opcode technique {technique!r}")


def legit_checkpoint(seed: int) -> dict[str, Any]:
    """A small valid checkpoint in the product's layout (model, optimizer, scheduler, config, epoch)."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": {"t_initial": 8, "base_values": [1e-3], "warmup_t": 1},
            "config": {"optimizer": {"opt": "adamW", "lr": 1e-3}, "nested": {"inner": [1, 2]}, "epochs": 8},
            "epoch": 3}


def place(payload: Any, placement: str, seed: int) -> Any:
    """The checkpoint object with ``payload`` at ``placement``."""
    if placement == "top":
        return payload
    checkpoint = legit_checkpoint(seed)
    if placement == "model":
        checkpoint["model"][next(iter(checkpoint["model"]))] = payload
    elif placement == "optimizer":
        state = next(iter(checkpoint["optimizer"]["state"].values()))
        state["exp_avg"] = payload
    elif placement == "config":
        checkpoint["config"] = payload
    elif placement == "nested":
        checkpoint["config"]["nested"]["inner"] = [1, {"deeper": (payload,)}]
    elif placement == "scheduler":
        checkpoint["lr_scheduler"]["base_values"] = payload
    else:
        raise ValueError(f"unknown placement {placement!r}")
    return checkpoint


def _zip_with_data_pickle(data_pkl: bytes, path: Path) -> None:
    """A torch zip checkpoint whose ``data.pkl`` record is replaced by ``data_pkl``."""
    import torch

    buffer = io.BytesIO()
    torch.save({"model": {}}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else source.read(info.filename)
            target.writestr(info, data)


def write_planted(path: Path, technique: str, placement: str, fmt: str, marker: Path, seed: int) -> list[str]:
    """Write one malicious checkpoint; return the globals a refusal may name."""
    import torch

    if technique in OPCODE_TECHNIQUES:
        data = crafted_pickle(technique, marker)
        if fmt == "zip":
            _zip_with_data_pickle(data, path)
        else:
            path.write_bytes(data)
        return ["os.system", f"{os.system.__module__}.system"]
    payload, names = TECHNIQUES[technique](marker)
    obj = place(payload, placement, seed)
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "raw_pickle":
        with open(path, "wb") as handle:
            pickle.dump(obj, handle, protocol=random.Random(seed).choice((2, 4, 5)))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return names


@dataclass(frozen=True)
class PlantedCase:
    """One planted file: what it holds, where, in which format."""

    index: int
    technique: str
    placement: str
    fmt: str
    seed: int


def make_planted_cases(count: int, seed: int) -> list[PlantedCase]:
    """``count`` planted files; techniques, placements and formats each cycle through a fresh shuffle."""
    rng = random.Random(f"checkpoints/{seed}")

    def cycle(items: tuple[str, ...]) -> list[str]:
        order: list[str] = []
        while len(order) < count:
            block = list(items)
            rng.shuffle(block)
            order.extend(block)
        return order[:count]

    techniques = cycle((*TECHNIQUES, *OPCODE_TECHNIQUES))
    placements, formats = cycle(PLACEMENTS), cycle(FORMATS)
    cases = []
    for i, (technique, placement, fmt) in enumerate(zip(techniques, placements, formats)):
        if technique in OPCODE_TECHNIQUES:
            placement, fmt = "top", ("zip" if fmt == "zip" else "raw_pickle")
        cases.append(PlantedCase(i, technique, placement, fmt, rng.randrange(2**31)))
    return cases


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the loaders' "load checkpoint from" lines and torch's pickle-protocol warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _loaders() -> dict[str, Callable[[str], Any]]:
    from engine.checkpoint import load_checkpoint, read_checkpoint

    return {"engine.checkpoint.load_checkpoint": load_checkpoint, "engine.checkpoint.read_checkpoint": read_checkpoint}


def _wait_for_marker(marker: Path, seconds: float = 0.3) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if marker.exists():
            return True
        time.sleep(0.05)
    return marker.exists()


_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                   "BINUNICODE8"}


def pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` global that the pickle stream(s) in ``data`` would import.

    Reads GLOBAL and INST opcodes and resolves STACK_GLOBAL from the two strings pushed before it
    (directly or through the memo). Legacy torch files hold several pickles one after the other; they
    are scanned until one cannot be parsed (the raw tensor data that follows them).
    """
    import pickletools

    found: set[str] = set()
    stream = io.BytesIO(data)
    for _ in range(8):
        if stream.tell() >= len(data):
            break
        pushed: list[Any] = []
        memo: dict[int, Any] = {}
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    found.add(f"{module}.{attr}")
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    if len(pushed) >= 2 and isinstance(pushed[-2], str) and isinstance(pushed[-1], str):
                        found.add(f"{pushed[-2]}.{pushed[-1]}")
                    pushed.append(None)
                elif name in _STRING_OPCODES:
                    pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name not in ("FRAME", "PROTO", "MARK", "STOP"):
                    pushed.append(None)
        except Exception:  # noqa: BLE001 - the end of the pickles (raw storage bytes follow)
            break
    return found


def file_globals(path: Path) -> set[str]:
    """The globals recorded in a checkpoint file (its ``data.pkl`` for the zip format)."""
    data = path.read_bytes()
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(names[0]) if names else b""
    return pickle_globals(data)


def _spellings(name: str) -> list[str]:
    """``builtins.exec`` is also reported as ``exec`` (torch drops the builtins module)."""
    module, _, attr = name.rpartition(".")
    return [name, attr] if module in ("builtins", "__builtin__") else [name]


def _refusal_outcome(message: str, names: list[str], recorded: set[str] | None = None) -> tuple[str, str]:
    """Classify a refusal: does its message name the flag and one of the payload's globals ``names`` (or
    any global ``recorded`` in the file, written out in full)?"""
    spellings = [s for name in names for s in _spellings(name)] + sorted(recorded or ())
    named = [s for s in spellings if re.search(rf"(?<![\w.]){re.escape(s)}(?![\w])", message)]
    if named and TRUST_FLAG in message:
        return REFUSED, f"names {named[0]} and {TRUST_FLAG}"
    missing = ("the global" if not named else "") + (" and " if not named and TRUST_FLAG not in message else "") \
        + (TRUST_FLAG if TRUST_FLAG not in message else "")
    lines = message.strip().splitlines() or [""]
    reason = [line.strip() for line in lines[1:] if "Unsupported" in line or "GLOBAL" in line]
    excerpt = short(lines[0], 160) + (f" ... {short(reason[0], 120)}" if reason else "")
    return REFUSED_VAGUE, f"message lacks {missing}: {excerpt}"


def run_planted(case: PlantedCase, folder: Path) -> list[CaseResult]:
    """Load one planted file through each loader; one result per loader."""
    results = []
    path = folder / f"planted_{case.index:03d}_{case.technique}_{case.placement}_{case.fmt}.pth"
    for loader_name, loader in _loaders().items():
        marker = folder / f"marker_{case.index:03d}_{loader_name.split('.')[0]}"
        names = write_planted(path, case.technique, case.placement, case.fmt, marker, case.seed)
        recorded = file_globals(path)
        result = CaseResult(case.index, case.technique, f"{loader_name} ({case.fmt}, {case.placement})", LOST,
                            extra={"file": str(path), "marker": str(marker)})
        try:
            with _quiet():
                loader(str(path))
        except Exception as exc:  # noqa: BLE001 - classified below
            result.outcome, result.detail = _refusal_outcome(f"{type(exc).__name__}: {exc}", names, recorded)
        else:
            result.outcome, result.detail = LOADED_SAFE, "load returned"
        if _wait_for_marker(marker):
            result.outcome, result.detail = LOST, f"the payload ran (marker {marker} exists): {result.detail}"
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------------
# entry scripts
# --------------------------------------------------------------------------------------------------------


def demo_script_command(script: str, demo: dict[str, str], output_dir: Path, *flags: str,
                        overrides: tuple[str, ...] = ()) -> list[str]:
    """The command running ``script`` on the demo data on the CPU, with ``flags`` and ``overrides``."""
    if script == "Pretrain.py":
        config = "configs/Pretrain_demo.yaml"
        base = ["batch_size=4", "queue_size=16", f"train_file=[{demo['pretrain']}]",
                f"image_tokenizer_path={demo['dvae']}"]
    elif script in ("Retrieval.py", "zero_shot_retrieval.py"):
        config = "configs/Retrieval_demo.yaml" if script == "Retrieval.py" else "configs/Retrieval_zero_shot_demo.yaml"
        base = [f"train_file=[{demo['re_train']}]", f"val_file={demo['re_val']}", f"test_file={demo['re_test']}",
                f"image_root={demo['image_root']}", "batch_size_train=8", "batch_size_test=4", "queue_size=64",
                "k_test=2", "schedular.epochs=1", "++itm_eval_batch_size=4"]
    else:
        raise ValueError(f"no demo command for {script}")
    return [PYTHON, script, "--config", config, "--output_dir", str(output_dir), "--text_encoder",
            str(REPO / "configs" / "demo_vocab.txt"), "--device", "cpu", "--num_workers", "0", *flags,
            "--overrides", *base, *overrides]


SCRIPT_RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("zero_shot_retrieval.py", ("--evaluate",)),
    ("Retrieval.py", ("--evaluate",)),
    ("Pretrain.py", ("--resume", "true")),
)


def run_script_case(index: int, script: str, flags: tuple[str, ...], case: PlantedCase, folder: Path,
                    demo: dict[str, str]) -> CaseResult:
    """Start ``script`` with a planted ``--checkpoint``: it must stop with the refusal, and run nothing."""
    path = folder / f"script_{index:02d}_{case.technique}.pth"
    marker = folder / f"marker_script_{index:02d}"
    names = write_planted(path, case.technique, case.placement, "zip", marker, case.seed)
    recorded = file_globals(path)
    output_dir = folder / f"script_{index:02d}_out"
    command = demo_script_command(script, demo, output_dir, *flags, "--checkpoint", str(path))
    result = CaseResult(case.index, case.technique, f"{script} ({case.placement})", LOST,
                        extra={"file": str(path), "marker": str(marker), "command": " ".join(command)})
    try:
        proc = subprocess.run(command, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        result.detail = f"{script} did not finish in {SCRIPT_TIMEOUT:.0f} s"
        return result
    if proc.returncode == 0:
        result.outcome, result.detail = LOADED_SAFE, f"{script} exited 0 with the planted checkpoint"
    else:
        result.outcome, result.detail = _refusal_outcome(proc.stdout[-4000:], names, recorded)
    if _wait_for_marker(marker):
        result.outcome, result.detail = LOST, f"the payload ran (marker {marker} exists)"
    return result


# --------------------------------------------------------------------------------------------------------
# truncated files
# --------------------------------------------------------------------------------------------------------


def _same_tree(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def run_truncated(index: int, rng: random.Random, folder: Path) -> list[CaseResult]:
    """Cut a valid checkpoint at a random offset and load it through each loader."""
    import torch

    fmt = ("zip", "legacy")[index % 2]
    original = legit_checkpoint(index)
    buffer = io.BytesIO()
    torch.save(original, buffer, _use_new_zipfile_serialization=fmt == "zip")
    full = buffer.getvalue()
    cut = rng.randrange(0, len(full))
    path = folder / f"truncated_{index:03d}_{fmt}.pth"
    path.write_bytes(full[:cut])
    results = []
    for loader_name, loader in _loaders().items():
        result = CaseResult(index, f"truncated_{fmt}", loader_name, LOST,
                            extra={"file": str(path), "note": f"cut at byte {cut} of {len(full)}"})
        try:
            with _quiet():
                loaded = loader(str(path))
        except Exception as exc:  # noqa: BLE001 - classified below
            message = f"{type(exc).__name__}: {short(str(exc), 200)}"
            expected_type = isinstance(exc, (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError))
            if type(exc).__name__ == "UnsafeCheckpointError":
                result.detail = f"a truncated valid file is reported as unsafe (advice: {TRUST_FLAG}): {message}"
            elif expected_type and (str(path) in str(exc) or path.name in str(exc)):
                result.outcome, result.detail = CLEAR_ERROR, message
            else:
                result.detail = f"error does not name the file or has an unexpected type: {message}"
        else:
            if _same_tree(loaded, original):
                result.outcome, result.detail = READ_INTACT, "contents equal the original"
            else:
                result.detail = f"truncated file (cut at byte {cut} of {len(full)}) loaded without an error"
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------------
# the campaign
# --------------------------------------------------------------------------------------------------------


def run_checkpoints(count: int, seed: int, work_dir: Path, truncated: int | None = None, script_runs: int = 3,
                    log: Callable[[str], None] = print) -> CampaignReport:
    """Plant ``count`` malicious checkpoints, cut ``truncated`` valid ones, and start ``script_runs`` scripts."""
    report = CampaignReport("malicious and truncated checkpoints")
    start = time.monotonic()
    folder = work_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    cases = make_planted_cases(count, seed)
    for case in cases:
        report.cases.extend(run_planted(case, folder))
    rng = random.Random(f"truncated/{seed}")
    for index in range(count if truncated is None else truncated):
        report.cases.extend(run_truncated(index, rng, folder))
    runs = min(script_runs, count)
    if runs:
        demo = demo_data(work_dir / "demo")
        for index in range(runs):
            script, flags = SCRIPT_RUNS[index % len(SCRIPT_RUNS)]
            case = copy.copy(cases[index])
            if case.technique in OPCODE_TECHNIQUES:
                case = PlantedCase(case.index, "os_system", "config", "zip", case.seed)
            elif case.placement == "top":
                case = PlantedCase(case.index, case.technique, "config", "zip", case.seed)
            log(f"  checkpoints: {script} with a planted checkpoint ({case.technique})")
            report.cases.append(run_script_case(index, script, flags, case, folder, demo))
    time.sleep(1.0)  # anything a payload started in the background has had time to write its marker
    for result in report.cases:
        marker = result.extra.get("marker")
        if marker and Path(marker).exists() and not result.lost:
            result.outcome, result.detail = LOST, f"the payload ran (marker {marker} found later)"
    report.summary["planted files"] = count
    report.summary["loads per planted file"] = ", ".join(_loaders())
    report.summary["script runs"] = ", ".join(SCRIPT_RUNS[i % len(SCRIPT_RUNS)][0] for i in range(runs)) or "none"
    report.seconds = time.monotonic() - start
    return report
