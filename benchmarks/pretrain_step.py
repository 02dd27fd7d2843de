"""Time one SIMLA pretraining step (forward of all five losses, backward, AdamW step).

python benchmarks/pretrain_step.py --preset small [--device cpu] [--amp none|bf16|fp16]
    [--grad_checkpointing] [--step_in_backward] [--compile [--compile_mode M]] [--fused_dropout] [--tf32]
    [--batch_size 4] [--steps 5] [--json out.json]

Presets ``tiny``, ``small``, ``base``. Prints seconds per step, samples/s, peak memory and (GPU or
``--count_flops``) FLOPs, FLOP/s and MFU, as JSON and one summary line. ``--compile`` compiles each ViT block
and BERT layer; the first step (which compiles) is timed apart from the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.memory import peak_rss_mb, rss_mb  # noqa: E402
from configs.schema import patch_grid  # noqa: E402
from dataset.masking import MaskingGenerator  # noqa: E402
from engine.runtime import use_tf32  # noqa: E402
from models.attention import use_fused_dropout  # noqa: E402
from models.compile import MODES, compile_regions, compiled_graphs  # noqa: E402
from models.precision import autocast, grad_scaler  # noqa: E402
from models.simla.pretrain import SIMLA  # noqa: E402
from optim import create_optimizer  # noqa: E402
from optim.in_backward import StepInBackward  # noqa: E402

PARITY_CONFIGS = os.path.join(REPO_ROOT, "tests", "data", "parity", "configs")

COMMON = {"temp": 0.07, "momentum": 0.995, "alpha": 0.4, "mlm_probability": 0.15, "from_scratch": True}
PRESETS = {
    "tiny": dict(COMMON, image_res=64, vision_width=32, vision_depth=12, vision_heads=4, patch_size=16,
                 embed_dim=16, queue_size=8, bert_config=os.path.join(PARITY_CONFIGS, "tiny_shared_bert.json"),
                 vocab_size=515, batch_size=4, mask_patches=5, mask_min=2),
    "small": dict(COMMON, image_res=128, vision_width=256, vision_depth=6, vision_heads=4, patch_size=16,
                  embed_dim=256, queue_size=64, bert_config=os.path.join(REPO_ROOT, "configs", "bench_small_bert.json"),
                  vocab_size=30522, batch_size=4, mask_patches=19, mask_min=4),
    "base": dict(COMMON, image_res=256, vision_width=768, embed_dim=256, queue_size=1024,
                 bert_config=os.path.join(REPO_ROOT, "configs", "shared_bert.json"), vocab_size=30522, batch_size=2,
                 mask_patches=75, mask_min=16),
}


def make_batch(preset: dict, batch_size: int, device: torch.device, generator: torch.Generator):
    res, grid = preset["image_res"], patch_grid(preset)
    image = torch.randn(batch_size, 3, res, res, generator=generator)
    lengths = torch.randint(9, 14, (batch_size,), generator=generator)
    length = int(lengths.max())
    ids = torch.randint(min(1000, preset["vocab_size"] // 2), preset["vocab_size"], (batch_size, length), generator=generator)
    ids[:, 0] = 101
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    random.seed(0)  # the masking generator draws from Python's random: the same masks in every run
    masker = MaskingGenerator(grid, preset["mask_patches"], min_num_patches=preset["mask_min"])
    masked = torch.stack([torch.from_numpy(masker()) for _ in range(batch_size)]).flatten(1).bool()
    codes = torch.randint(0, 8192, (batch_size, grid * grid), generator=generator)
    text = SimpleNamespace(input_ids=ids.to(device), attention_mask=mask.to(device))
    return image.to(device), text, codes.to(device), masked.to(device)


def count_step_flops(run_step) -> int:
    """FLOPs of one forward + backward as FlopCounterMode counts them (2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run_step()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype = torch.bfloat16, repeats: int = 20) -> float:
    """Measured rate of dense ``size``-cubed matrix products in ``dtype`` (the MFU denominator on GPUs)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for count in (2, repeats):  # warm-up, then timed
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(count):
            c = a @ b
        float(c[0, 0])  # waits for the products
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


#: Dense peak FLOP/s per precision of the GPUs the MFU figure is quoted against (H100 SXM, H200).
GPU_PEAK_FLOPS = {"none": 67e12, "bf16": 989e12, "fp16": 989e12}


def measure_step(preset: str, batch_size: int | None = None, device: str | torch.device = "cpu", amp: str = "none",
                 grad_checkpointing: bool = False, compile: str | None = None, fused_dropout: bool = False,
                 tf32: bool = False, step_in_backward: bool = False, steps: int | None = None, warmup: int = 2,
                 count_flops: bool = False, compile_mode: str | None = None) -> dict:
    """Time ``steps`` steps of the ``preset`` model after ``warmup`` ones (at least one: its time, which holds
    the compilation, is ``first_step_s``); ``compile``: the ``compile_regions`` backend, or None."""
    if step_in_backward and amp == "fp16":
        raise ValueError("step_in_backward cannot be combined with amp fp16")
    preset_config = dict(PRESETS[preset], grad_checkpointing=grad_checkpointing)
    batch_size = batch_size or preset_config["batch_size"]
    steps = steps or (3 if preset == "base" else 5)
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    tokenizer = SimpleNamespace(vocab_size=preset_config["vocab_size"], cls_token_id=101, pad_token_id=0,
                                mask_token_id=103)
    model = SIMLA(tokenizer=tokenizer, config=preset_config).to(device).train()
    optimizer = create_optimizer({"opt": "adamW", "lr": 1e-4, "weight_decay": 0.02}, model)
    scaler = grad_scaler(device, amp)
    stepper = StepInBackward(optimizer) if step_in_backward else None
    regions = compile_regions(model, compile_mode, backend=compile) if compile else 0
    image, text, codes, masked = make_batch(preset_config, batch_size, device, torch.Generator().manual_seed(0))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            losses = model(image, text, visual_token_ids=codes, masked_visual_token_pos=masked, alpha=0.4)
        total = sum(losses)
        if stepper is not None:
            with stepper.active():
                total.backward()
        else:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    tf32_before = torch.backends.cuda.matmul.allow_tf32
    use_tf32(tf32)
    use_fused_dropout(fused_dropout)
    try:
        first = timed()
        for _ in range(warmup - 1):
            timed()
        graphs = compiled_graphs()
        times = [timed() for _ in range(steps)]
        graphs = compiled_graphs() - graphs
        peak_gpu = torch.cuda.max_memory_allocated(device) if cuda else None
        if count_flops:
            with torch.compiler.set_stance("force_eager"):  # compiled kernels would hide their FLOPs from the counter
                flops = count_step_flops(step)
        else:
            flops = None
    finally:
        use_tf32(tf32_before)
        use_fused_dropout(False)
    median = statistics.median(times)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = {
        "what": "pretraining step", "preset": preset, "device": str(device), "amp": amp,
        "grad_checkpointing": grad_checkpointing, "step_in_backward": step_in_backward, "compile": compile,
        "compile_mode": compile_mode, "compiled_regions": regions, "graphs_compiled_in_timed_steps": graphs,
        "fused_dropout": fused_dropout, "tf32": tf32, "batch_size": batch_size,
        "params_millions": round(params / 1e6, 2), "threads": torch.get_num_threads(),
        "first_step_s": round(first, 4), "median_s_per_step": round(median, 4),
        "samples_per_s": round(batch_size / median, 2), "steps": [round(t, 4) for t in times],
    }
    if peak_gpu is not None:
        result["peak_gpu_mb"] = round(peak_gpu / 2**20, 1)
    if flops is not None:
        result["gflop_per_step"] = round(flops / 1e9, 2)
        result["achieved_tflops_per_s"] = round(flops / median / 1e12, 3)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--grad_checkpointing", action="store_true")
    parser.add_argument("--step_in_backward", action="store_true",
                        help="update each parameter during backward and free its gradient (as the scripts' flag)")
    parser.add_argument("--compile", action="store_true", help="compile each ViT block and BERT layer")
    parser.add_argument("--compile_mode", choices=MODES, default=None)
    parser.add_argument("--fused_dropout", action="store_true", help="as the scripts' flag")
    parser.add_argument("--tf32", action="store_true", help="as the scripts' flag")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5, base 3)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps (at least one); the first, which compiles, is reported as first_step_s")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--count_flops", action="store_true",
                        help="count the FLOPs of one step (an extra, untimed step; always done on GPU) and "
                             "report GFLOP per step, achieved TFLOP/s and, on GPU, MFU")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    after_imports = rss_mb()
    cuda = torch.device(args.device).type == "cuda"
    result = measure_step(args.preset, args.batch_size, args.device, args.amp, args.grad_checkpointing,
                          "inductor" if args.compile else None, args.fused_dropout, args.tf32,
                          args.step_in_backward, args.steps, args.warmup, args.count_flops or cuda,
                          args.compile_mode)
    if cuda:
        result["mfu"] = round(result["achieved_tflops_per_s"] * 1e12 / GPU_PEAK_FLOPS[args.amp], 4)
    dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    result["matmul_tflops_per_s"] = round(matmul_tflops(torch.device(args.device), 2048, dtype, repeats=5), 3)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["rss_after_imports_mb"] = round(after_imports, 1)
    result["peak_rss_above_imports_mb"] = round(peak_rss_mb() - after_imports, 1)
    print(json.dumps(result, indent=2))
    print(f"{args.preset}, batch {result['batch_size']}, {result['device']}, amp {args.amp}: median "
          f"{result['median_s_per_step']} s/step ({result['samples_per_s']} samples/s) over {len(result['steps'])} "
          f"steps; peak RSS {result['peak_rss_mb']} MB, "
          f"{result['peak_rss_above_imports_mb']} MB above the RSS after imports ({result['rss_after_imports_mb']} MB); "
          f"2048-cubed products at {result['matmul_tflops_per_s'] * 1e3:.0f} GFLOP/s"
          + (f"; {result['gflop_per_step']} GFLOP/step, {result['achieved_tflops_per_s']} TFLOP/s"
             if "gflop_per_step" in result else "")
          + (f", MFU {result['mfu']:.1%} (of {GPU_PEAK_FLOPS[args.amp] / 1e12:.0f} TFLOP/s)" if "mfu" in result else "")
          + (f"; {result['compiled_regions']} regions compiled, first step {result['first_step_s']} s" if args.compile else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
