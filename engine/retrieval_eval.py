"""Image-text retrieval evaluation: ITC candidates, ITM re-ranking (the original's scores, faster), recall."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from engine.metrics import MetricLogger, SmoothedValue, format_time
from models.precision import autocast
from utils import concat_all_gather, get_rank, get_world_size

#: Texts per tokenizer call (the original's chunk of 256) and at most per text-encoder pass.
TEXT_CHUNK = 256
EVAL_TEXT_LENGTH = 30
DEFAULT_PAIR_BATCH = 256
#: On CPU a fusion pass also holds at most about this many padded text tokens (larger passes run slower).
CPU_PASS_TOKENS = 1024
#: Memory for the fusion keys/values of the images whose pairs are being scored (a chunk of images).
KV_BUDGET_BYTES = 256 * 2**20
NOT_SCORED = -100.0


def shard_bounds(total: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``[start, end)`` of ``rank``'s contiguous shard of ``total`` items (shards of ``ceil(total/world)``)."""
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    size = math.ceil(total / world_size) if total else 0
    start = min(total, rank * size)
    return start, min(total, start + size)


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenate every rank's shard (as cut by :func:`shard_bounds`) into the ``total`` rows."""
    world_size = get_world_size()
    if world_size == 1:
        return local
    size = math.ceil(total / world_size)
    padded = local.new_zeros((size, *local.shape[1:]))
    padded[: local.shape[0]] = local
    return concat_all_gather(padded)[:total]


def gather_variable(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather 1-D tensors whose length differs between ranks (each list entry gathered alike)."""
    if get_world_size() == 1:
        return list(tensors)
    device = tensors[0].device
    length = torch.tensor([tensors[0].shape[0]], device=device)
    lengths = concat_all_gather(length).tolist()
    longest = max(lengths)
    out = []
    for tensor in tensors:
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        pieces = concat_all_gather(padded).split(longest)
        out.append(torch.cat([piece[:n] for piece, n in zip(pieces, lengths)]))
    return out


def tokenize_texts(tokenizer: Any, texts: Sequence[str], device: torch.device,
                   max_length: int = EVAL_TEXT_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and masks ``(T, max_length)``: padded and truncated to ``max_length`` as the original."""
    if not texts:
        raise ValueError("the evaluation split has no captions")
    ids, masks = [], []
    for start in range(0, len(texts), TEXT_CHUNK):
        encoded = tokenizer(list(texts[start:start + TEXT_CHUNK]), padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")
        ids.append(encoded.input_ids)
        masks.append(encoded.attention_mask)
    return torch.cat(ids).to(device), torch.cat(masks).to(device)


def _trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Padding keys get exactly zero attention: cutting padding columns leaves every [CLS] output unchanged.
    length = max(1, int(mask.sum(dim=1).max()))
    return ids[:, :length], mask[:, :length]


def length_chunks(lengths: torch.Tensor, max_size: int, min_size: int = 16, slack: float = 1.25
                  ) -> list[torch.Tensor]:
    """Row indices in chunks of at most ``max_size`` rows of similar ``lengths`` (padding: ``slack``)."""
    order = torch.argsort(lengths, stable=True)
    values = lengths[order].tolist()
    chunks, start, real = [], 0, 0
    for i, length in enumerate(values):
        size = i - start + 1
        if i > start and (size > max_size or (size > min_size and size * length > slack * (real + length))):
            chunks.append(order[start:i])
            start, real = i, 0
        real += length
    if values:
        chunks.append(order[start:])
    return chunks


@torch.no_grad()
def encode_texts(model: Any, ids: torch.Tensor, mask: torch.Tensor, amp: str = "none") -> torch.Tensor:
    """Normalised ITC text embeddings ``(n, E)`` (float32); length-bucketed passes, [CLS] row only."""
    device = ids.device
    if ids.shape[0] == 0:
        return torch.zeros(0, model.text_proj.out_features, device=device)
    embeds = torch.empty(ids.shape[0], model.text_proj.out_features, device=device)
    for rows in length_chunks(mask.sum(dim=1), TEXT_CHUNK):
        chunk_ids, chunk_mask = _trimmed(ids[rows], mask[rows])
        with autocast(device, amp):
            _, text_feat = model.text_features(chunk_ids, chunk_mask, cls_only=True)
        embeds[rows] = text_feat.float()
    return embeds


@torch.no_grad()
def encode_images(model: Any, batches: Iterable[torch.Tensor], device: torch.device, amp: str = "none"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT states ``(n, N+1, D)`` and normalised ITC embeddings ``(n, E)`` of the images in ``batches``."""
    feats, embeds = [], []
    for image in batches:
        with autocast(device, amp):
            image_feat, image_embed = model.image_features(image.to(device, non_blocking=True))
        feats.append(image_feat)
        embeds.append(image_embed.float())
    if not feats:
        encoder = model.visual_encoder
        tokens, width = encoder.pos_embed.shape[1:]
        dtype = encoder.pos_embed.dtype
        return (torch.zeros(0, tokens, width, device=device, dtype=dtype),
                torch.zeros(0, model.vision_proj.out_features, device=device))
    return torch.cat(feats), torch.cat(embeds)


@dataclass
class RetrievalFeatures:
    """Texts cover the whole split; ``image_feats`` only this rank's ``[image_start, image_start + n)``."""

    text_ids: torch.Tensor
    text_mask: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    image_feats: torch.Tensor
    image_start: int = 0


def _image_batches(loader: DataLoader, start: int, end: int) -> DataLoader:
    """A loader over images ``[start, end)`` of ``loader``'s dataset, with ``loader``'s settings."""
    if start == 0 and end == len(loader.dataset):
        return loader
    return DataLoader(Subset(loader.dataset, range(start, end)), batch_size=loader.batch_size,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, shuffle=False, drop_last=False)


@torch.no_grad()
def compute_features(model: Any, data_loader: DataLoader, tokenizer: Any, device: torch.device,
                     amp: str = "none") -> RetrievalFeatures:
    """Tokenize every caption; encode this rank's shard of texts and images; gather the embeddings."""
    dataset = data_loader.dataset
    text_ids, text_mask = tokenize_texts(tokenizer, dataset.text, device)
    num_texts, num_images = text_ids.shape[0], len(dataset)
    if num_images == 0:
        raise ValueError("the evaluation split has no images")
    t0, t1 = shard_bounds(num_texts)
    text_embeds = gather_shards(encode_texts(model, text_ids[t0:t1], text_mask[t0:t1], amp), num_texts)
    i0, i1 = shard_bounds(num_images)
    image_feats, image_embeds = encode_images(
        model, (batch[0] for batch in _image_batches(data_loader, i0, i1)), device, amp)
    image_embeds = gather_shards(image_embeds, num_images)
    return RetrievalFeatures(text_ids, text_mask, text_embeds, image_embeds, image_feats, i0)


def check_k_test(k_test: int, num_images: int, num_texts: int) -> int:
    k_test = int(k_test)
    if k_test < 1:
        raise ValueError(f"k_test must be at least 1, got {k_test}")
    if k_test > min(num_images, num_texts):
        # the original fails inside topk here
        raise ValueError(f"k_test = {k_test} exceeds the evaluation split ({num_images} images, {num_texts} "
                         "captions): set k_test to at most the smaller of the two")
    return k_test


@torch.no_grad()
def topk_candidates(image_embeds: torch.Tensor, text_embeds: torch.Tensor, k_test: int, keep_sims: bool = False,
                    max_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(topk_i2t (I, k), topk_t2i (T, k), sims (I, T) or None)``; sims built in row blocks."""
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    k_test = check_k_test(k_test, num_images, num_texts)
    rows = max(1, max_elements // max(num_texts, 1))
    text_t = text_embeds.t()
    topk_i2t, sims_blocks = [], []
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, num_images, rows):
        block = image_embeds[start:start + rows] @ text_t
        topk_i2t.append(block.topk(k_test, dim=1).indices)
        values, indices = block.t().topk(min(k_test, block.shape[0]), dim=1)
        indices = indices + start
        if best_v is None:
            best_v, best_i = values, indices
        else:
            assert best_i is not None
            merged_v, order = torch.cat([best_v, values], dim=1).topk(k_test, dim=1)
            best_i = torch.cat([best_i, indices], dim=1).gather(1, order)
            best_v = merged_v
        if keep_sims:
            sims_blocks.append(block.cpu())
    assert best_i is not None
    sims = torch.cat(sims_blocks) if keep_sims else None
    return torch.cat(topk_i2t), best_i, sims


def unique_pairs(topk_i2t: torch.Tensor, topk_t2i: torch.Tensor) -> torch.Tensor:
    """Sorted ids ``image * T + text`` of every pair among either direction's candidates, once each."""
    num_images, num_texts = topk_i2t.shape[0], topk_t2i.shape[0]
    image_rows = torch.arange(num_images, device=topk_i2t.device).unsqueeze(1)
    text_rows = torch.arange(num_texts, device=topk_t2i.device).unsqueeze(1)
    i2t = image_rows * num_texts + topk_i2t
    t2i = topk_t2i * num_texts + text_rows
    return torch.unique(torch.cat([i2t.flatten(), t2i.flatten()]))


def _passes(order: torch.Tensor, sorted_lengths: torch.Tensor, batch_size: int, max_tokens: int | None
            ) -> list[torch.Tensor]:
    """Cut ``order`` into passes of at most ``batch_size`` pairs and ``max_tokens`` padded tokens."""
    if max_tokens is None:
        return list(order.split(batch_size))
    passes, start = [], 0
    values = sorted_lengths.tolist()
    for i, length in enumerate(values):
        size = i - start + 1
        if i > start and (size > batch_size or size * length > max_tokens):
            passes.append(order[start:i])
            start = i
    if values:
        passes.append(order[start:])
    return passes


def _image_chunks(images: torch.Tensor, per_image_bytes: int, budget: int) -> list[torch.Tensor]:
    """The distinct ``images`` (sorted) in chunks whose fusion keys/values fit in ``budget`` bytes."""
    distinct = torch.unique(images)
    size = max(1, budget // max(per_image_bytes, 1))
    return list(distinct.split(size))


@torch.no_grad()
def score_pairs(model: Any, pairs: torch.Tensor, num_texts: int, features: RetrievalFeatures,
                batch_size: int = DEFAULT_PAIR_BATCH, amp: str = "none", header: str = "Evaluation:",
                print_freq: int = 50, kv_budget: int = KV_BUDGET_BYTES) -> torch.Tensor:
    """ITM match logits (float32) of ``pairs`` (ids ``image * T + text``, images held by this rank)."""
    if batch_size < 1:
        raise ValueError(f"itm_eval_batch_size must be at least 1, got {batch_size}")
    device = features.text_ids.device
    images = pairs // num_texts - features.image_start
    texts = pairs % num_texts
    if pairs.numel() and (int(images.min()) < 0 or int(images.max()) >= features.image_feats.shape[0]):
        raise ValueError("score_pairs got pairs of images this process did not encode")
    lengths = features.text_mask.sum(dim=1)[texts]
    pass_tokens = CPU_PASS_TOKENS if device.type == "cpu" else None
    scores = torch.empty(pairs.shape[0], dtype=torch.float32, device=device)
    project = getattr(model, "image_key_values", None)
    if project is None or not pairs.numel():
        chunks: list[torch.Tensor | None] = [None]
    else:
        with autocast(device, amp):
            one = project(features.image_feats[images[:1]])
        per_image = sum(t.numel() * t.element_size() for kv in one.layers.values() for t in kv)
        chunks = list(_image_chunks(images, per_image, kv_budget))
    plan: list[tuple[int, torch.Tensor]] = []
    for c, chunk in enumerate(chunks):
        members = torch.arange(pairs.shape[0], device=device) if chunk is None else \
            torch.nonzero(torch.isin(images, chunk)).flatten()
        order = members[torch.argsort(lengths[members], stable=True)]
        plan.extend((c, selection) for selection in _passes(order, lengths[order], batch_size, pass_tokens))
    total = pairs.shape[0]
    logger = MetricLogger(delimiter="  ")
    logger.add_meter("pairs", SmoothedValue(window_size=1, fmt=f"{{value:.0f}}/{total}"))
    done = 0
    current, chunk_kv = -1, None
    for c, selection in logger.log_every(plan, print_freq, header):
        ids, mask = _trimmed(features.text_ids[texts[selection]], features.text_mask[texts[selection]])
        with autocast(device, amp):
            chunk = chunks[c]
            if chunk is None:
                logits = model.itm_logits(ids, mask, features.image_feats[images[selection]])
            else:
                if c != current:
                    current, chunk_kv = c, project(features.image_feats[chunk])
                rows = torch.searchsorted(chunk, images[selection])
                logits = model.itm_logits(ids, mask, image_kv=chunk_kv.select(rows), cls_only=True)
        scores[selection] = logits[:, 1].float()
        done += selection.shape[0]
        logger.update(pairs=done)
    return scores


def assemble_score_matrices(pairs: torch.Tensor, scores: torch.Tensor, topk_i2t: torch.Tensor,
                            topk_t2i: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Dense ``(I, T)`` and ``(T, I)`` matrices: each query's candidates get their pair's score, the rest -100."""
    pairs, scores = pairs.cpu(), scores.cpu().float()
    topk_i2t, topk_t2i = topk_i2t.cpu(), topk_t2i.cpu()
    order = torch.argsort(pairs)
    pairs, scores = pairs[order], scores[order]
    num_images, num_texts = topk_i2t.shape[0], topk_t2i.shape[0]

    def lookup(ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(pairs, ids).clamp(max=max(pairs.numel() - 1, 0))
        if pairs.numel() == 0 or not torch.equal(pairs[pos], ids):
            raise RuntimeError("a candidate pair of the retrieval evaluation was not scored")
        return scores[pos]

    image_rows = torch.arange(num_images).unsqueeze(1)
    text_rows = torch.arange(num_texts).unsqueeze(1)
    score_i2t = torch.full((num_images, num_texts), NOT_SCORED)
    score_i2t.scatter_(1, topk_i2t, lookup(image_rows * num_texts + topk_i2t))
    score_t2i = torch.full((num_texts, num_images), NOT_SCORED)
    score_t2i.scatter_(1, topk_t2i, lookup(topk_t2i * num_texts + text_rows))
    return score_i2t.numpy(), score_t2i.numpy()


@dataclass
class RetrievalScores:
    """Score matrices (float32); ``num_pairs`` scored by ITM, ``num_candidates`` entries of both lists."""

    score_i2t: np.ndarray
    score_t2i: np.ndarray
    sims: np.ndarray | None
    num_pairs: int
    num_candidates: int


@torch.no_grad()
def rerank(model: Any, features: RetrievalFeatures, k_test: int, batch_size: int = DEFAULT_PAIR_BATCH,
           amp: str = "none", keep_sims: bool = False, kv_budget: int = KV_BUDGET_BYTES) -> RetrievalScores:
    """Candidates by ITC, every candidate pair scored once by ITM (split over the ranks), matrices."""
    num_images, num_texts = features.image_embeds.shape[0], features.text_embeds.shape[0]
    topk_i2t, topk_t2i, sims = topk_candidates(features.image_embeds, features.text_embeds, k_test, keep_sims)
    pairs = unique_pairs(topk_i2t, topk_t2i)
    start = features.image_start * num_texts
    end = (features.image_start + features.image_feats.shape[0]) * num_texts
    own = pairs[(pairs >= start) & (pairs < end)]
    scores = score_pairs(model, own, num_texts, features, batch_size, amp, kv_budget=kv_budget)
    all_pairs, all_scores = gather_variable([own, scores])
    score_i2t, score_t2i = assemble_score_matrices(all_pairs, all_scores, topk_i2t, topk_t2i)
    return RetrievalScores(score_i2t, score_t2i, None if sims is None else sims.numpy(), int(pairs.numel()),
                           (num_images + num_texts) * topk_i2t.shape[1])


@torch.no_grad()
def evaluation(model: Any, data_loader: DataLoader, tokenizer: Any, device: torch.device,
               config: Mapping[str, Any], amp: str = "none", keep_sims: bool = False) -> RetrievalScores:
    """Retrieval evaluation of the split (collective: every rank calls it); reads ``k_test``, ``itm_eval_batch_size``."""
    model.eval()
    print("Computing features for evaluation...")
    start_time = time.time()
    features = compute_features(model, data_loader, tokenizer, device, amp)
    batch_size = int(config["itm_eval_batch_size"])
    result = rerank(model, features, config["k_test"], batch_size, amp, keep_sims)
    print(f"Evaluation time {format_time(time.time() - start_time)} ({result.num_pairs} image-text pairs "
          f"re-ranked for {result.num_candidates} candidate entries)")
    return result


@torch.no_grad()
def per_query_scores(model: Any, image_feats: torch.Tensor, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                     text_mask: torch.Tensor, text_embeds: torch.Tensor, k_test: int, amp: str = "none"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Score matrices as the original computes them: one fusion pass per query, full 30-token padding."""
    device = text_ids.device
    num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
    k_test = check_k_test(k_test, num_images, num_texts)
    sims = image_embeds @ text_embeds.t()
    score_i2t = torch.full((num_images, num_texts), NOT_SCORED, device=device)
    for i, row in enumerate(sims):
        topk = row.topk(k_test, dim=0).indices
        with autocast(device, amp):
            logits = model.itm_logits(text_ids[topk], text_mask[topk], image_feats[i].repeat(k_test, 1, 1))
        score_i2t[i, topk] = logits[:, 1].float()
    sims = sims.t()
    score_t2i = torch.full((num_texts, num_images), NOT_SCORED, device=device)
    for t, row in enumerate(sims):
        topk = row.topk(k_test, dim=0).indices
        with autocast(device, amp):
            logits = model.itm_logits(text_ids[t].repeat(k_test, 1), text_mask[t].repeat(k_test, 1),
                                      image_feats[topk])
        score_t2i[t, topk] = logits[:, 1].float()
    return score_i2t.cpu().numpy(), score_t2i.cpu().numpy()


def _rank_of_best(scores: np.ndarray, targets: Iterable[int]) -> float:
    """Position of the best-placed target in numpy's reversed ``argsort`` order (ties as that sort leaves them)."""
    order = np.argsort(scores)[::-1]
    return min((np.where(order == target)[0][0] for target in targets), default=1e20)


def _recall(ranks: np.ndarray, k: int) -> float:
    return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)


def itm_eval(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Mapping[int, int] | Sequence[int],
             img2txt: Mapping[int, Sequence[int]] | Sequence[Sequence[int]]) -> dict[str, float]:
    """Recall@1/5/10 (percent) of text/image retrieval, means and ``r_mean``, bitwise as the original."""
    text_ranks = np.array([_rank_of_best(row, img2txt[i]) for i, row in enumerate(scores_i2t)], dtype=float)
    image_ranks = np.array([_rank_of_best(row, [txt2img[t]]) for t, row in enumerate(scores_t2i)], dtype=float)
    txt = [_recall(text_ranks, k) for k in (1, 5, 10)]
    img = [_recall(image_ranks, k) for k in (1, 5, 10)]
    txt_mean = (txt[0] + txt[1] + txt[2]) / 3
    img_mean = (img[0] + img[1] + img[2]) / 3
    return {"txt_r1": txt[0], "txt_r5": txt[1], "txt_r10": txt[2], "txt_r_mean": txt_mean,
            "img_r1": img[0], "img_r5": img[1], "img_r10": img[2], "img_r_mean": img_mean,
            "r_mean": (txt_mean + img_mean) / 2}
