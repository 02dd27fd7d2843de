"""Bad-input campaign: broken and unusual image files and malformed annotation files fed to the real datasets.

Each case writes one annotation file of three entries copied from the demo data, one of which is made bad
(its image replaced by a generated file, or its text or structure broken), builds the task's datasets with
``dataset.create_dataset`` from the task's demo config, reads every entry and collates the samples.

Outcomes of the bad entry:

* ``read correctly``: a sample came back and matches the sample built from a clean reference image
  (same random seeds), or the empty caption came back as the empty string;
* ``read partially``: a truncated file loaded with its missing part filled in (PIL's
  ``LOAD_TRUNCATED_IMAGES``, kept on purpose by the datasets as in the original);
* ``skipped and counted``: the dataset returned ``None`` and the collate counted it;
* ``clear error``: an OSError / ValueError / RuntimeError / KeyError / TypeError whose message names the
  image or annotation file;
* ``lost``: anything else: a valid image refused or decoded wrongly, an invalid one accepted, an
  unexpected exception type, a message that names no file, a good entry harmed, a collate failure, a
  crash or a hang (each case runs in a worker process with a time limit).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fault_campaign.bad_images import BadImage, image_pixel_limit, make_bad_image
from tests.fault_campaign.common import LOST, REPO, CampaignReport, CaseResult, demo_data, short

READ = "read correctly"
READ_PARTIAL = "read partially"
SKIPPED = "skipped and counted"
CLEAR_ERROR = "clear error"
CAMPAIGN_ERROR = "campaign error"

# what a case of each kind must give: "read" (valid image: must be read and match the reference),
# "refuse" (must be skipped or refused with a clear error), "truncated", "exif", "empty_text"
IMAGE_KINDS: dict[str, str] = {
    "missing": "refuse", "empty": "refuse", "truncated_jpeg": "truncated", "truncated_png": "truncated",
    "random_bytes": "refuse", "text_as_jpg": "refuse", "grayscale": "read", "rgba": "read", "cmyk": "read",
    "i16": "read", "palette": "read", "one_bit": "read", "huge": "refuse", "exif_rotated": "exif",
}
ANNOTATION_KINDS: dict[str, str] = {
    "truncated_json": "refuse", "wrong_top_level": "refuse", "missing_field": "refuse",
    "non_string_caption": "refuse", "empty_caption": "empty_text",
}
KINDS: tuple[str, ...] = (*IMAGE_KINDS, *ANNOTATION_KINDS)
LOSSY_KINDS = ("cmyk", "i16")
# largest mean absolute difference (normalised pixel units) for images that went through a lossy step
LOSSY_MEAN_TOLERANCE = 0.08
EXACT_TOLERANCE = 1e-5
CLEAR_ERROR_TYPES: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, KeyError, TypeError,
                                                      EOFError)


@dataclass(frozen=True)
class Target:
    """One dataset fed with bad inputs: how to build it and the layout of its entries."""

    name: str
    dataset: str
    config: str
    task: str
    index: int | None
    ann_key: str
    demo_key: str
    text_field: str
    required: tuple[str, ...]
    text_slot: int | None
    image_field: str = "image"
    image_suffix: str = ""
    collate: str = "safe"
    text_lists: bool = False


TARGETS: tuple[Target, ...] = (
    Target("pretrain", "pretrain", "configs/Pretrain_demo.yaml", "pretrain", None, "train_file", "pretrain",
           "caption", ("image", "caption"), 1, text_lists=True),
    Target("re_train", "re", "configs/Retrieval_demo.yaml", "retrieval", 0, "train_file", "re_train", "caption",
           ("image", "caption", "image_id"), 1),
    Target("re_test", "re", "configs/Retrieval_demo.yaml", "retrieval", 2, "test_file", "re_test", "caption",
           ("image", "caption"), None, text_lists=True),
    Target("vqa_train", "vqa", "configs/VQA_demo.yaml", "vqa", 0, "train_file", "vqa_train", "question",
           ("question", "image", "dataset", "answer"), 1, collate="vqa"),
    Target("vqa_test", "vqa", "configs/VQA_demo.yaml", "vqa", 1, "test_file", "vqa_test", "question",
           ("question", "image", "question_id"), 1),
    Target("nlvr_train", "nlvr", "configs/NLVR_demo.yaml", "nlvr", 0, "train_file", "nlvr_train", "sentence",
           ("images", "sentence", "label"), 2, image_field="images"),
    Target("ve_train", "ve", "configs/VE_demo.yaml", "ve", 0, "train_file", "ve_train", "sentence",
           ("image", "sentence", "label"), 1, image_suffix=".jpg"),
    Target("grounding_train", "grounding", "configs/Grounding_demo.yaml", "grounding", 0, "train_file",
           "grounding_train", "text", ("image", "text"), 1),
)
TARGETS_BY_NAME = {target.name: target for target in TARGETS}


# --------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------


def make_cases(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` cases: kinds and targets each cycle through a fresh shuffle, so small runs cover them all."""
    rng = random.Random(f"bad-inputs/{seed}")

    def cycle(items: tuple[Any, ...]) -> list[Any]:
        order: list[Any] = []
        while len(order) < count:
            block = list(items)
            rng.shuffle(block)
            order.extend(block)
        return order[:count]

    kinds, targets = cycle(KINDS), cycle(tuple(t.name for t in TARGETS))
    return [{"index": i, "kind": kind, "target": target, "seed": rng.randrange(2**31), "position": rng.randrange(3)}
            for i, (kind, target) in enumerate(zip(kinds, targets))]


# --------------------------------------------------------------------------------------------------------
# running one case (in the worker process)
# --------------------------------------------------------------------------------------------------------


class InputContext:
    """Demo data, loaded task configs and template entries, shared by the cases of one worker."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.demo = demo_data(work_dir / "demo")
        self.cases_dir = work_dir / "cases"
        self.cases_dir.mkdir(parents=True, exist_ok=True)
        self.configs: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, list[dict[str, Any]]] = {}
        self.source_images = sorted(str(p) for p in (Path(self.demo["root"]) / "images" / "train").glob("*.png"))

    def config(self, target: Target) -> dict[str, Any]:
        if target.config not in self.configs:
            from configs.loader import load_config

            self.configs[target.config] = _relocate(load_config(str(REPO / target.config)), self.demo["root"])
        return copy.deepcopy(self.configs[target.config])

    def template(self, target: Target) -> list[dict[str, Any]]:
        if target.name not in self.templates:
            entries = json.loads(Path(self.demo[target.demo_key]).read_text(encoding="utf-8"))
            if len(entries) < 3:
                raise ValueError(f"{self.demo[target.demo_key]} has fewer than 3 entries")
            self.templates[target.name] = entries[:3]
        return copy.deepcopy(self.templates[target.name])


def _relocate(node: Any, root: str) -> Any:
    """Point the demo configs' ``demo_data/...`` paths at the generated demo folder."""
    if isinstance(node, dict):
        return {key: _relocate(value, root) for key, value in node.items()}
    if isinstance(node, list):
        return [_relocate(value, root) for value in node]
    if isinstance(node, str) and (node == "demo_data" or node.startswith("demo_data/")):
        return os.path.join(root, node[len("demo_data/"):]) if node != "demo_data" else root
    return node


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _set_image(entry: dict[str, Any], target: Target, path: Path, rng: random.Random) -> None:
    value = str(path)
    if target.image_suffix and value.endswith(target.image_suffix):
        value = value[: -len(target.image_suffix)]
    if target.image_field == "images":
        images = list(entry["images"])
        images[rng.randrange(len(images))] = value
        entry["images"] = images
    else:
        entry[target.image_field] = value


def _break_annotation(kind: str, entries: list[dict[str, Any]], position: int, target: Target,
                      rng: random.Random) -> tuple[str, str]:
    """The text of the annotation file for an annotation kind, and a description of what was broken."""
    bad = entries[position]
    if kind == "truncated_json":
        text = json.dumps(entries)
        cut = rng.randrange(0, len(text))
        return text[:cut], f"cut at character {cut} of {len(text)}"
    if kind == "wrong_top_level":
        top = rng.choice(({"entries": entries}, "entries", 3, None, True))
        return json.dumps(top), f"top level {type(top).__name__}"
    if kind == "missing_field":
        field = rng.choice(target.required)
        del bad[field]
        return json.dumps(entries), f"entry {position} lacks {field!r}"
    if kind == "non_string_caption":
        choices: list[Any] = [42, 3.5, None, True, {"text": "a red circle"}]
        choices += [["a red circle", 7], [None]] if target.text_lists else [[1, 2], ["a red circle"]]
        bad[target.text_field] = rng.choice(choices)
        return json.dumps(entries), f"entry {position} {target.text_field!r} = {bad[target.text_field]!r}"
    if kind == "empty_caption":
        choices = ["", "   ", "?!.,", "- / -"] + ([[]] if target.text_lists else [])
        bad[target.text_field] = rng.choice(choices)
        return json.dumps(entries), f"entry {position} {target.text_field!r} = {bad[target.text_field]!r}"
    raise ValueError(f"unknown annotation kind {kind!r}")


def _names_a_file(exc: BaseException, files: list[Path]) -> bool:
    message = str(exc)
    return any(str(f) in message or f.name in message for f in files)


def _error_outcome(exc: BaseException, files: list[Path], stage: str) -> tuple[str, str]:
    from PIL import Image

    described = f"{type(exc).__name__} while {stage}: {short(str(exc), 240)}"
    if not isinstance(exc, (*CLEAR_ERROR_TYPES, Image.DecompressionBombError)):
        return LOST, f"unexpected exception type: {described}"
    if not _names_a_file(exc, files):
        return LOST, f"error does not name the file: {described}"
    return CLEAR_ERROR, described


def _build(target: Target, config: dict[str, Any]) -> Any:
    from dataset import create_dataset

    datasets = create_dataset(target.dataset, config)
    return datasets if target.index is None else datasets[target.index]


def _compare(sample: Any, reference: Any, lossy: bool) -> tuple[bool, str]:
    """Whether two samples agree: tensors within tolerance, everything else equal."""
    import numpy as np
    import torch

    worst = 0.0
    for got, want in zip(sample, reference):
        if isinstance(got, torch.Tensor):
            if got.shape != want.shape:
                return False, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
            diff = (got.float() - want.float()).abs()
            value = float(diff.mean() if lossy else diff.max())
            worst = max(worst, value)
            if value > (LOSSY_MEAN_TOLERANCE if lossy else EXACT_TOLERANCE):
                return False, f"{'mean' if lossy else 'max'} abs difference {value:.4f}"
        elif isinstance(got, np.ndarray):
            if not np.array_equal(got, want):
                return False, "array field differs"
        elif got != want:
            return False, f"field {got!r} != {want!r}"
    return True, f"{'mean' if lossy else 'max'} abs difference {worst:.2g}"


def _collate(target: Target, samples: list[Any]) -> tuple[bool, str]:
    """Collate the samples that did not raise; the collate must count every ``None`` and keep the rest."""
    import torch

    from dataset.collate import SafeCollate
    from dataset.vqa import CountedVQACollate

    nones = sum(sample is None for sample in samples)
    collate = CountedVQACollate() if target.collate == "vqa" else SafeCollate()
    try:
        batch, failed = collate(samples)
    except Exception as exc:  # noqa: BLE001 - any collate failure is a finding
        return False, f"collate raised {type(exc).__name__}: {short(str(exc), 200)}"
    if failed != nones:
        return False, f"collate counted {failed} failed samples, the dataset returned {nones} None"
    if batch is None:
        return (nones == len(samples)), "collate returned no batch although some samples were valid"
    images = batch[0]
    expected = len(samples) - nones if target.collate == "vqa" else len(samples)
    if not isinstance(images, torch.Tensor) or images.shape[0] != expected:
        return False, f"collated batch has {getattr(images, 'shape', None)}, expected {expected} samples"
    return True, ""


def _sample_text(target: Target, dataset: Any, sample: Any, position: int) -> list[str]:
    if target.text_slot is not None:
        return [sample[target.text_slot]]
    return [dataset.text[t] for t in dataset.img2txt[position]]


def run_case(case: dict[str, Any], ctx: InputContext) -> CaseResult:
    """Generate and run one case; never raises (a failure of the campaign itself is its own outcome)."""
    target = TARGETS_BY_NAME[case["target"]]
    result = CaseResult(case["index"], case["kind"], target.name, CAMPAIGN_ERROR)
    try:
        _run_case(case, target, ctx, result)
    except Exception as exc:  # noqa: BLE001 - reported, never hidden
        result.outcome, result.detail = CAMPAIGN_ERROR, f"{type(exc).__name__}: {short(str(exc))}"
    return result


def _run_case(case: dict[str, Any], target: Target, ctx: InputContext, result: CaseResult) -> None:
    kind, position = case["kind"], case["position"]
    rng = random.Random(case["seed"])
    folder = ctx.cases_dir / f"case_{case['index']:04d}_{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"case{case['index']:04d}_{kind}"
    config = ctx.config(target)
    max_pixels, limit_source = image_pixel_limit(config, target.task)
    entries = ctx.template(target)
    ann_path = folder / f"{stem}_annotations.json"
    files = [ann_path]
    image: BadImage | None = None
    expectation = IMAGE_KINDS.get(kind) or ANNOTATION_KINDS[kind]
    if kind in IMAGE_KINDS:
        image = make_bad_image(kind, folder, stem, rng, rng.choice(ctx.source_images), max_pixels,
                               target.image_suffix)
        files.append(image.path)
        _set_image(entries[position], target, image.path, random.Random(case["seed"] + 1))
        ann_path.write_text(json.dumps(entries), encoding="utf-8")
        result.extra["note"] = image.note + (f" ({limit_source})" if kind == "huge" else "")
    else:
        text, note = _break_annotation(kind, entries, position, target, rng)
        ann_path.write_text(text, encoding="utf-8")
        result.extra["note"] = note
    result.extra["files"] = [str(f) for f in files]
    config[target.ann_key] = [str(ann_path)] if isinstance(config[target.ann_key], list) else str(ann_path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = _build(target, config)
        except Exception as exc:  # noqa: BLE001 - classified below
            result.outcome, result.detail = _error_outcome(exc, files, "building the dataset")
            return
    dropped_warned = any(_names_a_file(Exception(str(w.message)), files) for w in caught)
    length = len(dataset)
    if length != len(entries):
        if length == len(entries) - 1 and dropped_warned and expectation != "read":
            result.outcome, result.detail = SKIPPED, "entry dropped when loading, with a warning naming the file"
            position = -1
        else:
            result.outcome = LOST
            result.detail = f"dataset has {length} entries, the file has {len(entries)} (no warning naming it)"
            return

    samples: list[Any] = []
    errors: dict[int, BaseException] = {}
    warned: dict[int, bool] = {}
    for i in range(length):
        _seed_all(case["seed"] + i)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                samples.append(dataset[i])
            except Exception as exc:  # noqa: BLE001 - classified below
                errors[i] = exc
                samples.append(exc)
        warned[i] = any(_names_a_file(Exception(str(w.message)), files) for w in caught)

    good_failures = [f"entry {i}: {type(s).__name__ if isinstance(s, Exception) else 'None'}"
                     + (f" {short(str(s), 160)}" if isinstance(s, Exception) else "")
                     for i, s in enumerate(samples) if i != position and (s is None or isinstance(s, Exception))]
    if good_failures:
        result.outcome, result.detail = LOST, "valid entries failed: " + "; ".join(good_failures)
        return
    collated_ok, collate_detail = _collate(target, [s for s in samples if not isinstance(s, Exception)])
    if not collated_ok:
        result.outcome, result.detail = LOST, collate_detail
        return
    if position < 0:
        return

    sample = samples[position]
    if isinstance(sample, Exception):
        result.outcome, result.detail = _error_outcome(sample, files, f"reading entry {position}")
        if result.outcome == CLEAR_ERROR and expectation == "read":
            result.outcome, result.detail = LOST, f"valid {kind} image refused: {result.detail}"
        return
    if sample is None:
        if expectation == "read":
            result.outcome, result.detail = LOST, f"valid {kind} image skipped"
        else:
            result.outcome = SKIPPED
            result.detail = "warning names the file" if warned[position] else "no warning named the file"
        return
    _classify_read(case, target, ctx, config, dataset, sample, image, expectation, result)


def _classify_read(case: dict[str, Any], target: Target, ctx: InputContext, config: dict[str, Any], dataset: Any,
                   sample: Any, image: BadImage | None, expectation: str, result: CaseResult) -> None:
    """The bad entry gave a sample: decide whether that was right."""
    kind, position = case["kind"], case["position"]
    if expectation == "empty_text":
        texts = _sample_text(target, dataset, sample, position)
        if all(text == "" for text in texts):
            result.outcome, result.detail = READ, f"texts {texts!r}"
        else:
            result.outcome, result.detail = LOST, f"empty caption came back as {texts!r}"
        return
    if expectation == "refuse" or image is None or not image.references:
        what = result.extra.get("note", "")
        result.outcome = LOST
        result.detail = f"bad input accepted as a sample ({kind}: {what})"
        if kind in ANNOTATION_KINDS and target.text_slot is not None:
            result.detail += f"; text became {sample[target.text_slot]!r}"
        return
    matches: list[str] = []
    details: list[str] = []
    for label, ref_path in image.references.items():
        ref_entries = json.loads(Path(result.extra["files"][0]).read_text(encoding="utf-8"))
        _replace_path(ref_entries[position], image.path, ref_path, target)
        ref_ann = Path(result.extra["files"][0]).with_name(f"reference_{label.split()[0]}.json")
        ref_ann.write_text(json.dumps(ref_entries), encoding="utf-8")
        ref_config = dict(config)
        ref_config[target.ann_key] = [str(ref_ann)] if isinstance(config[target.ann_key], list) else str(ref_ann)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_dataset = _build(target, ref_config)
            _seed_all(case["seed"] + position)
            reference = ref_dataset[position]
        if reference is None:
            raise RuntimeError(f"the clean reference image {ref_path} gave no sample")
        same, detail = _compare(sample, reference, lossy=kind in LOSSY_KINDS)
        details.append(f"{label}: {detail}")
        if same:
            matches.append(label)
    if matches:
        result.outcome = READ
        result.detail = f"matches the {matches[0]} reference" if kind == "exif_rotated" else details[0]
        if kind == "exif_rotated":
            result.extra["orientation"] = matches[0]
        return
    if expectation == "truncated":
        result.outcome, result.detail = READ_PARTIAL, "missing part filled in; " + "; ".join(details)
        return
    result.outcome, result.detail = LOST, f"{kind} image decoded wrongly: " + "; ".join(details)


def _replace_path(entry: dict[str, Any], bad: Path, reference: Path, target: Target) -> None:
    old, new = str(bad), str(reference)
    if target.image_suffix:
        old, new = old[: -len(target.image_suffix)], new[: -len(target.image_suffix)]
    if target.image_field == "images":
        entry["images"] = [new if value == old else value for value in entry["images"]]
    else:
        entry[target.image_field] = new


def _worker(cases: list[dict[str, Any]], work_dir: str, conn: Any) -> None:
    """Worker process: run the cases in order, reporting the start and the result of each."""
    warnings.simplefilter("ignore")
    ctx = InputContext(Path(work_dir))
    for case in cases:
        conn.send(("start", case["index"]))
        conn.send(("done", case["index"], run_case(case, ctx).as_dict()))
    conn.send(("finished",))
    conn.close()


# --------------------------------------------------------------------------------------------------------
# the campaign
# --------------------------------------------------------------------------------------------------------


def _result_from_dict(data: dict[str, Any]) -> CaseResult:
    known = {"index", "kind", "where", "outcome", "detail"}
    return CaseResult(data["index"], data["kind"], data["where"], data["outcome"], data["detail"],
                      {k: v for k, v in data.items() if k not in known})


def run_bad_inputs(count: int, seed: int, work_dir: Path, case_timeout: float = 120.0,
                   log: Callable[[str], None] = print) -> CampaignReport:
    """Run ``count`` bad-input cases in worker processes (restarted after a crash or a hang)."""
    report = CampaignReport("bad inputs")
    start_time = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)
    demo_data(work_dir / "demo")  # generated once, before the workers start
    cases = make_cases(count, seed)
    results: dict[int, CaseResult] = {}
    context = multiprocessing.get_context("spawn")
    next_index = 0
    restarts = 0
    while next_index < count:
        receiver, sender = context.Pipe(duplex=False)
        worker = context.Process(target=_worker, args=(cases[next_index:], str(work_dir), sender), daemon=True)
        worker.start()
        sender.close()
        current: int | None = None
        timeout = max(case_timeout, 300.0)  # the first message waits for the imports too
        while True:
            if not receiver.poll(timeout):
                worker.kill()
                worker.join()
                index = current if current is not None else next_index
                results[index] = CaseResult(index, cases[index]["kind"], cases[index]["target"], LOST,
                                            f"hang: no result within {case_timeout:.0f} s")
                next_index = index + 1
                break
            try:
                message = receiver.recv()
            except EOFError:
                worker.join()
                if current is None:
                    raise RuntimeError(f"the bad-input worker exited with code {worker.exitcode} before "
                                       "starting a case") from None
                results[current] = CaseResult(current, cases[current]["kind"], cases[current]["target"], LOST,
                                              f"crash: the process died with exit code {worker.exitcode}")
                next_index = current + 1
                break
            if message[0] == "start":
                current, timeout = message[1], case_timeout
            elif message[0] == "done":
                results[message[1]] = _result_from_dict(message[2])
                current, next_index = None, message[1] + 1
                if len(results) % 50 == 0:
                    log(f"  bad inputs: {len(results)}/{count} cases")
            else:
                worker.join()
                next_index = count
                break
        receiver.close()
        restarts += 1
    report.cases = [results[i] for i in range(count)]
    errors = [case for case in report.cases if case.outcome == CAMPAIGN_ERROR]
    if errors:
        report.notes.append(f"{len(errors)} cases failed inside the campaign itself (not counted as lost): "
                            + "; ".join(f"#{c.index} {c.detail}" for c in errors[:3]))
    partial = sum(case.outcome == READ_PARTIAL for case in report.cases)
    if partial:
        report.notes.append(f"{partial} truncated files loaded with their missing part filled in and no warning "
                            "(LOAD_TRUNCATED_IMAGES, kept as in the original)")
    orientations = sorted({case.extra.get("orientation") for case in report.cases if case.extra.get("orientation")})
    if orientations:
        report.notes.append(f"EXIF-rotated images were read with: {', '.join(orientations)}")
    report.summary["worker processes"] = restarts
    report.summary["targets"] = ", ".join(t.name for t in TARGETS)
    report.seconds = time.monotonic() - start_time
    return report
