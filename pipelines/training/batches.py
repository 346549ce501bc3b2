"""A worker's batches: its rank's stream step by step, replayable held-out chunks, and images on the device."""

from __future__ import annotations

import contextlib
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from pipelines.models.build import ModelSpec
from pipelines.training.data import grouped


def to_images(batch: Dict[str, np.ndarray], spec: ModelSpec, device: torch.device) -> torch.Tensor:
    """``uint8`` images to normalised floats on the device (normalising here keeps transfers 4x smaller); a cached
    tower CLIP's image features as they are."""
    if spec.cached:
        return torch.from_numpy(batch["image"]).to(device, non_blocking=True)
    mean, std = spec.normalisation
    x = torch.from_numpy(batch["image"]).to(device, non_blocking=True).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


@contextlib.contextmanager
def autocast(precision: str, device: torch.device):
    """bf16 autocast on ``device`` when ``precision`` is ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def step_batches(stream: Iterator[Dict[str, np.ndarray]], first: int) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """``(step, batch)`` from a rank's stream from step ``first`` on; earlier steps (a stream started too early)
    are skipped, a gap is an error."""
    expect = first
    for batch in grouped(stream, "step"):
        step = int(batch["step"][0])
        if step < expect:
            continue
        if step != expect:
            raise RuntimeError(f"data stream jumped from step {expect} to {step}")
        yield step, batch
        expect += 1


class Ahead:
    """An iterator whose first item is fetched at once, on a thread: a rank's stream starts (its decoders start up
    and decode the first steps) while the worker builds its model."""

    def __init__(self, items: Iterator) -> None:
        self.items, self.first, self.error, self.empty = iter(items), None, None, False
        self.thread = threading.Thread(target=self._fetch, daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            self.first = next(self.items)
        except StopIteration:
            self.empty = True
        except BaseException as exc:  # noqa: BLE001 - raised where the items are consumed
            self.error = exc

    def __iter__(self) -> Iterator:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.empty:
            yield self.first
            yield from self.items


class Replayable:
    """A dataset shard read many times (evaluation): decoded once and kept if it fits ``budget`` bytes, else
    streamed through Ray Data again on every pass.  The first pass starts at once, on a thread, so the held-out
    chunks decode while the worker builds its model and takes its first steps."""

    def __init__(self, shard, budget: int = 2 << 30) -> None:
        self.shard, self.budget = shard, budget
        self.kept: Optional[List[Dict[str, np.ndarray]]] = None
        self.first: Optional[Ahead] = Ahead(self._keep())  # one item: the first pass (None: over the budget)

    def _keep(self) -> Iterator[Optional[List[Dict[str, np.ndarray]]]]:
        yield self._read()

    def _read(self) -> Optional[List[Dict[str, np.ndarray]]]:
        kept: List[Dict[str, np.ndarray]] = []
        size = 0
        for batch in self.shard.iter_batches(batch_size=None, batch_format="numpy"):
            size += sum(v.nbytes for v in batch.values())
            if size > self.budget:
                return None  # streamed on every pass instead
            kept.append(batch)
        return kept

    def batches(self) -> Iterator[Dict[str, np.ndarray]]:
        if self.first is not None:
            self.kept, self.first = next(iter(self.first)), None
        if self.kept is not None:
            yield from self.kept
            return
        yield from self.shard.iter_batches(batch_size=None, batch_format="numpy")
