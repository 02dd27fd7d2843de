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
# fixture checks: each returns the actual outputs (same names as the fixture's ``outputs``)

FIXTURE_CHECKS: dict[str, Callable[[dict], dict]] = {}


def fixture_check(name: str) -> Callable:
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        FIXTURE_CHECKS[name] = fn
        return fn
    return register


def fixture_tokenizer(fx: dict):
    from models.tokenization import tokenizer_from_tokens

    return tokenizer_from_tokens(fx["vocab_tokens"])


@fixture_check("vit")
def check_vit(fx: dict) -> dict:
    from models.vit import interpolate_pos_embed, vit_from_config

    config = fx["config"]
    inputs = fx["inputs"]
    vit = vit_from_config(config)
    vit.load_state_dict(fx["state_dict"], strict=True)
    vit.eval()
    with torch.no_grad():
        out = {
            "embeds": vit(inputs["image"]),
            "embeds_masked": vit(inputs["image"], inputs["masked_patch_positions"]),
            "embeds_register_blk_8": vit(inputs["image"], register_blk=inputs["register_blk"]),
        }
        bigger = vit_from_config(dict(config, image_res=inputs["interp_image_res"]))
        out["interpolated_pos_embed"] = interpolate_pos_embed(fx["state_dict"]["pos_embed"], bigger)
    if vit.blocks[inputs["register_blk"]].attn.get_attention_map() is None:
        raise AssertionError("register_blk did not record the attention map")
    return out


@fixture_check("bert_modes")
def check_bert_modes(fx: dict) -> dict:
    from models.bert import BertForMaskedLM, load_bert_config

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    encoded = tokenizer(list(inputs["captions"]), padding="longest", truncation=True, max_length=25,
                        return_tensors="pt")
    if not (torch.equal(encoded.input_ids, inputs["text_input_ids"])
            and torch.equal(encoded.attention_mask, inputs["text_attention_mask"])):
        raise AssertionError("tokenizer ids differ from the fixture's text_input_ids")
    model = BertForMaskedLM(load_bert_config(fx["bert_config"]))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
    image_embeds, image_atts = inputs["image_embeds"], inputs["image_atts"]
    with torch.no_grad():
        text = model.bert(ids, mask, mode="text", output_attentions=True)
        multi = model.bert(ids, mask, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts,
                           mode="multimodal", output_attentions=True)
        text_embeds = model.bert.embeddings(ids)
        as_input = model.bert(inputs_embeds=inputs["patch_embeds"], attention_mask=image_atts,
                              encoder_hidden_states=text_embeds, encoder_attention_mask=mask)
        mlm_args = dict(encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts, mode="multimodal")
        logits = model(inputs["mlm_input_ids"], mask, return_logits=True, **mlm_args)
        hard = model(inputs["mlm_input_ids"], mask, labels=inputs["mlm_labels"], **mlm_args).loss
        distill = model(inputs["mlm_input_ids"], mask, labels=inputs["mlm_labels"],
                        soft_labels=inputs["soft_labels"], alpha=inputs["alpha"], **mlm_args).loss
    return {
        "last_hidden_state_text": text.last_hidden_state,
        "last_hidden_state_multimodal": multi.last_hidden_state,
        "text_embedding_output": text_embeds,
        "last_hidden_state_image_as_input": as_input.last_hidden_state,
        "attentions_multimodal": torch.stack(multi.attentions),
        "cross_attentions_multimodal": torch.stack(multi.cross_attentions),
        "attentions_text": torch.stack(text.attentions),
        "mlm_logits": logits,
        "mlm_loss_hard": hard.item(),
        "mlm_loss_distill": distill.item(),
    }


def grad_outputs(model: torch.nn.Module, full_grad_names) -> dict:
    """Per-parameter gradient norms (float64), the total norm, selected full gradients and the
    trainable parameters that received no gradient."""
    norms, missing = {}, []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            missing.append(name)
            continue
        norms[name] = float(param.grad.double().norm())
    params = dict(model.named_parameters())
    return {
        "grad_norms": norms,
        "total_grad_norm": math.sqrt(sum(v * v for v in norms.values())),
        "full_grads": {name: params[name].grad for name in full_grad_names if params[name].grad is not None},
        "params_without_grad": missing,
    }


def fixture_config(fx: dict) -> dict:
    """The fixture's task config with its BERT config given inline (no file needed)."""
    return dict(fx["config"], bert_config=dict(fx["bert_config"]))


@fixture_check("pretrain")
def check_pretrain(fx: dict) -> dict:
    from models.simla.pretrain import SIMLA

    inputs = fx["inputs"]
    tokenizer = fixture_tokenizer(fx)
    encoded = tokenizer(list(inputs["captions"]), padding="longest", truncation=True, max_length=25,
                        return_tensors="pt")
    if not torch.equal(encoded.input_ids, inputs["text_input_ids"]):
        raise AssertionError("tokenizer ids differ from the fixture's text_input_ids")
    model = SIMLA(tokenizer=tokenizer, config=dict(fixture_config(fx), from_scratch=True))
    model.load_state_dict(fx["state_dict"], strict=True)
    model.eval()
    # the masking draw of the recorded run is injected
    model.mask = lambda ids: (inputs["mlm_input_ids"].clone(), inputs["mlm_labels"].clone())
    text = encoded
    losses = model(inputs["image"], text, visual_token_ids=inputs["visual_token_ids"],
                   masked_visual_token_pos=inputs["masked_visual_token_pos"],
                   masked_visual_tok_labels=inputs["masked_visual_tok_labels"], alpha=inputs["alpha"],
                   return_intermediates=True)
    loss_mlm, loss_ita, loss_itm, loss_mim, loss_pseudo, inter = losses
    total = loss_mlm + loss_itm + loss_ita + loss_mim + loss_pseudo
    state = model.state_dict()
    out = {
        "loss_mlm": loss_mlm.item(), "loss_ita": loss_ita.item(), "loss_itm": loss_itm.item(),
        "loss_mim": loss_mim.item(), "loss_pseudo": loss_pseudo.item(), "total_loss": total.item(),
        "image_queue_after": state["image_queue"].clone(), "text_queue_after": state["text_queue"].clone(),
        "queue_ptr_after": state["queue_ptr"].clone(),
        "momentum_params_after": {k: state[k].clone() for k in fx["outputs"]["momentum_params_after"]},
        "intermediates": {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inter.items()},
    }
    total.backward()
    out.update(grad_outputs(model, fx["outputs"]["full_grads"]))
    return out


def run_fixture(path: str) -> list[Result]:
    fx = torch.load(path, map_location="cpu", weights_only=True)
    name = fx.get("name") or os.path.splitext(os.path.basename(path))[0]
    check = FIXTURE_CHECKS.get(name)
    if check is None:
        return [Result(name, None, None, f"no check for fixture kind {name!r} in this checkout")]
    try:
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
