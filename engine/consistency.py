"""Checking that every process of a distributed run ends up with the same model state."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
import torch.distributed as dist

from utils import get_world_size, group_device, is_dist_avail_and_initialized

DIGEST_BYTES = hashlib.sha256().digest_size


class ReplicaMismatchError(RuntimeError):
    """The model state differs between processes that should hold identical replicas."""


def state_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor: equal only if bitwise identical."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas_agree(model: torch.nn.Module) -> str:
    """Fingerprint the model on every process; raise :class:`ReplicaMismatchError` naming ranks that differ."""
    fingerprint = state_fingerprint(model.state_dict())
    if not is_dist_avail_and_initialized():
        return fingerprint
    device = group_device()
    local = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(gathered, local)
    digests = [bytes(t.cpu().tolist()).hex() for t in gathered]
    if len(set(digests)) > 1:
        differing = [rank for rank, d in enumerate(digests) if d != digests[0]]
        raise ReplicaMismatchError(
            f"the model state differs between processes: rank(s) {differing} disagree with rank 0 "
            f"(fingerprints: {', '.join(f'rank {r}: {d[:16]}' for r, d in enumerate(digests))})")
    return fingerprint
