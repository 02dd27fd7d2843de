#!/usr/bin/env python
"""Check this implementation against parity fixtures (``.pt``) and state-dict manifests (``.json``).

Usage: ``python tests/parity.py PATH [PATH ...]``. Prints one line per compared output
(name, max abs error, PASS/FAIL) and a final ``N passed, M failed`` line; exits 1 on any failure.

A fixture is self-contained: it carries the task ``config``, the ``bert_config`` dict, the vocabulary
(``vocab_tokens``), the ``state_dict``, the ``inputs`` and expected ``outputs``. Its ``name`` selects
the check that reproduces the outputs. A manifest lists the full-size state_dict of a task model.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@dataclass
class Result:
    name: str
    error: float | None
    passed: bool | None  # None = skipped
    detail: str = ""

    def line(self) -> str:
        status = "SKIP" if self.passed is None else ("PASS" if self.passed else "FAIL")
        err = "-" if self.error is None else f"{self.error:.3e}"
        text = f"{self.name:<60} {err:>10}  {status}"
        return f"{text}  {self.detail}" if self.detail else text


class NotAvailable(Exception):
    """The check for this fixture kind needs a component that this checkout does not have."""


# --------------------------------------------------------------------------------------------------
# comparison


def _max_abs(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    return float((actual.double() - expected.double()).abs().max())


def compare_value(name: str, actual: Any, expected: Any, tol: dict, exact: bool) -> Iterator[Result]:
    """Yield one result per leaf of ``expected`` (dicts recurse with dotted names)."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            yield Result(name, None, False, f"expected a dict, got {type(actual).__name__}")
            return
        for key, value in expected.items():
            if key not in actual:
                yield Result(f"{name}.{key}", None, False, "not produced")
                continue
            yield from compare_value(f"{name}.{key}", actual[key], value, tol, exact)
        return
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            actual = torch.as_tensor(actual)
        actual = actual.detach().cpu()
        if actual.shape != expected.shape:
            yield Result(name, None, False, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
            return
        if not expected.is_floating_point() or exact:
            same = torch.equal(actual.to(expected.dtype), expected)
            err = _max_abs(actual, expected) if expected.is_floating_point() or not same else 0.0
            yield Result(name, err, same, "" if same else "exact match required")
            return
        err = _max_abs(actual, expected)
        ok = torch.allclose(actual.to(expected.dtype), expected, atol=tol["atol"], rtol=tol["rtol"])
        yield Result(name, err, bool(ok))
        return
    if isinstance(expected, float) and not exact:
        actual_f = float(actual.item() if isinstance(actual, torch.Tensor) else actual)
        err = abs(actual_f - expected)
        ok = math.isclose(actual_f, expected, rel_tol=tol["rtol"], abs_tol=tol["atol"])
        yield Result(name, err, ok)
        return
    if isinstance(expected, (list, tuple)) and any(isinstance(e, (torch.Tensor, dict, float)) for e in expected):
        # element by element, each with the output's tolerance (e.g. maps of different sizes)
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            got = len(actual) if isinstance(actual, (list, tuple)) else type(actual).__name__
            yield Result(name, None, False, f"expected a list of {len(expected)}, got {got}")
            return
        parts = [r for i, (a, e) in enumerate(zip(actual, expected))
                 for r in compare_value(f"{name}[{i}]", a, e, tol, exact)]
        errors = [r.error for r in parts if r.error is not None]
        failed = [r for r in parts if not r.passed]
        yield Result(name, max(errors) if errors else None, not failed,
                     "; ".join(f"{r.name}: {r.detail or 'mismatch'}" for r in failed[:3]))
        return
    if isinstance(actual, torch.Tensor):
        actual = actual.tolist() if actual.dim() else actual.item()
    if isinstance(expected, (list, tuple)):
        actual = list(actual) if isinstance(actual, (list, tuple)) else actual
        expected = list(expected)
    ok = actual == expected
    yield Result(name, 0.0 if ok else None, ok, "" if ok else f"got {actual!r}, expected {expected!r}")


def compare_fixture(fx: dict, actual: dict, prefix: str) -> list[Result]:
    tol_default = fx.get("tolerance") or DEFAULT_TOLERANCE
    tol_by_output = fx.get("tolerance_by_output") or {}
    exact_names = set(fx.get("exact_outputs") or [])
    results: list[Result] = []
    for name, expected in fx["outputs"].items():
        tol = tol_by_output.get(name, tol_default)
        if name not in actual:
            results.append(Result(f"{prefix}.{name}", None, False, "not produced"))
            continue
        if isinstance(expected, dict):
            for key, value in expected.items():
                dotted = f"{name}.{key}"
                sub_tol = tol_by_output.get(dotted, tol)
                if key not in actual[name]:
                    results.append(Result(f"{prefix}.{dotted}", None, False, "not produced"))
                    continue
                results.extend(compare_value(f"{prefix}.{dotted}", actual[name][key], value, sub_tol,
                                             dotted in exact_names or name in exact_names))
        else:
            results.extend(compare_value(f"{prefix}.{name}", actual[name], expected, tol, name in exact_names))
    return results


# --------------------------------------------------------------------------------------------------
# fixture checks live in tests/parity_checks/<module>.py; each module exposes CHECKS = {fixture name: fn}
# where fn(fixture) returns the actual outputs under the fixture's output names.

CHECK_MODULES = ("core", "pretrain", "retrieval", "vqa", "nlvr", "ve", "grounding")


def fixture_checks() -> dict[str, Callable[[dict], dict]]:
    import importlib

    checks: dict[str, Callable[[dict], dict]] = {}
    for name in CHECK_MODULES:
        try:
            module = importlib.import_module(f"tests.parity_checks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"tests.parity_checks.{name}":
                raise
            continue
        checks.update(module.CHECKS)
    return checks


def run_fixture(path: str, device: str | torch.device = "cpu") -> list[Result]:
    """Reproduce a fixture's outputs with its inputs, weights and new tensors on ``device``."""
    fx = torch.load(path, map_location=device, weights_only=True)
    name = fx.get("name") or os.path.splitext(os.path.basename(path))[0]
    check = fixture_checks().get(name)
    if check is None:
        return [Result(name, None, None, f"no check for fixture kind {name!r} in this checkout")]
    try:
        with torch.device(device):
            actual = check(fx)
    except NotAvailable as exc:
        return [Result(name, None, None, str(exc))]
    return compare_fixture(fx, actual, name)


# --------------------------------------------------------------------------------------------------
# manifests


def _shape_table(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, list]:
    return {prefix + k: [*v.shape, str(v.dtype).replace("torch.", "")] for k, v in state_dict.items()}


def compare_state_dict_table(name: str, actual: dict[str, list], expected: dict[str, list]) -> Result:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    wrong = [k for k in expected if k in actual and actual[k] != expected[k]]
    ok = not (missing or extra or wrong)
    detail = ""
    if not ok:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} wrong shape (e.g. {wrong[0]}: {actual[wrong[0]]} != {expected[wrong[0]]})")
        detail = "; ".join(parts)
    return Result(name, float(len(missing) + len(extra) + len(wrong)), ok, detail)


def manifest_config(manifest: dict) -> dict:
    from configs import load_config

    path = os.path.join(REPO_ROOT, manifest["config_file"])
    config = load_config(path)
    config.update(manifest.get("config_overrides_for_building") or {})
    config["bert_config"] = os.path.join(REPO_ROOT, manifest["bert_config_file"])
    return config


def manifest_parts(task: str, config: dict) -> dict[str, torch.nn.Module]:
    """The image and text modules of a task model, built alone (used while the task model is absent)."""
    from models.bert import BertForMaskedLM, BertLMHeadModel, BertModel, load_bert_config
    from models.vit import vit_from_config

    parts: dict[str, torch.nn.Module] = {}
    parts["visual_encoder"] = vit_from_config(config, mask_token=True if task == "pretrain" else None)
    if task == "pretrain":
        parts["text_encoder"] = BertForMaskedLM(load_bert_config(config["bert_config"]))
    elif task in ("nlvr", "pretrain_nlvr"):
        cfg = load_bert_config(config["bert_config"], num_hidden_layers=18, fusion_layer=0)
        parts["text_encoder"] = BertModel(cfg, layout="xbert")
    else:
        parts["text_encoder"] = BertModel(load_bert_config(config["bert_config"]))
    if task == "vqa":
        parts["text_decoder"] = BertLMHeadModel(load_bert_config(config["bert_config"], num_hidden_layers=6))
    return parts


def build_task_model(task: str, config: dict, vocab_size: int) -> torch.nn.Module | None:
    """The full task model, or None when this checkout does not implement it yet."""
    import importlib

    module_name = {"retrieval_coco": "retrieval", "retrieval_flickr": "retrieval", "grounding": "retrieval"}.get(
        task, task)
    try:
        module = importlib.import_module(f"models.simla.{module_name}")
    except ModuleNotFoundError:
        return None
    builder = getattr(module, "build_for_manifest", None)
    if builder is None:
        return None
    return builder(config, vocab_size)


def manifest_weight_decay_groups(path: str) -> tuple[int, int]:
    """Sizes of the original's optimizer groups ``(no weight decay, weight decay)`` for a manifest's
    full-size model, from its parameter names and shapes alone: trainable parameters, each tied group
    once; no weight decay for biases and 1-D tensors (LayerNorm weights among them), decay for the rest."""
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    not_parameters = set(manifest["buffers"]) | set(manifest["parameters_without_grad_requirement"])
    repeats = {name for group in manifest["tied_state_dict_entries"] for name in group[1:]}
    no_decay = decay = 0
    for name, entry in manifest["state_dict"].items():
        if name in not_parameters or name in repeats:
            continue
        shape = entry[:-1]  # the last item is the dtype
        if len(shape) == 1 or name.endswith(".bias"):
            no_decay += 1
        else:
            decay += 1
    return no_decay, decay


def run_manifest(path: str) -> list[Result]:
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if "state_dict" not in manifest:
        return [Result(os.path.basename(path), None, None, "not a state-dict manifest")]
    task = manifest["task"]
    config = manifest_config(manifest)
    expected = manifest["state_dict"]
    results: list[Result] = []
    with torch.device("meta"):
        model = build_task_model(task, config, manifest.get("tokenizer_vocab_size", 30522))
        if model is None:
            for prefix, module in manifest_parts(task, config).items():
                want = {k: v for k, v in expected.items() if k.startswith(prefix + ".")}
                results.append(compare_state_dict_table(f"manifest.{task}.{prefix}",
                                                        _shape_table(module.state_dict(), prefix + "."), want))
            results.append(Result(f"manifest.{task}.full_model", None, None,
                                  f"models.simla task model for {task!r} not in this checkout"))
            return results
        state = model.state_dict()
    results.append(compare_state_dict_table(f"manifest.{task}.state_dict", _shape_table(state), expected))
    unique = {id(p): p.numel() for p in model.parameters()}
    num_params = sum(unique.values())
    ok = num_params == manifest["num_params"]
    results.append(Result(f"manifest.{task}.num_params", float(abs(num_params - manifest["num_params"])), ok,
                          "" if ok else f"{num_params} != {manifest['num_params']}"))
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    ok = trainable == manifest["num_trainable_params"]
    results.append(Result(f"manifest.{task}.num_trainable_params", float(abs(trainable - manifest["num_trainable_params"])),
                          ok, "" if ok else f"{trainable} != {manifest['num_trainable_params']}"))
    live = model.state_dict(keep_vars=True)
    untied = [pair for pair in manifest.get("tied_state_dict_entries", [])
              if len({id(live[k]) if k in live else k for k in pair}) != 1]
    results.append(Result(f"manifest.{task}.tied_entries", float(len(untied)), not untied,
                          "" if not untied else f"not shared: {untied[:2]}"))
    buffers = sorted(name for name, _ in model.named_buffers())
    ok = buffers == sorted(manifest.get("buffers", []))
    results.append(Result(f"manifest.{task}.buffers", 0.0 if ok else 1.0, ok,
                          "" if ok else f"{buffers} != {sorted(manifest.get('buffers', []))}"))
    return results


# --------------------------------------------------------------------------------------------------


def run_path(path: str) -> list[Result]:
    if path.endswith(".pt"):
        return run_fixture(path)
    if path.endswith(".json"):
        return run_manifest(path)
    return [Result(path, None, False, "expected a .pt fixture or a .json manifest")]


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    passed = failed = skipped = 0
    for path in paths:
        print(f"== {path}")
        for result in run_path(path):
            print(result.line())
            if result.passed is None:
                skipped += 1
            elif result.passed:
                passed += 1
            else:
                failed += 1
    summary = f"{passed} passed, {failed} failed"
    print(summary + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
