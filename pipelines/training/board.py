"""The progress board: a tiny actor a train stage's rank 0 reports to and the driver polls (the progress line, the
workers' pids and nodes, the phase marks).  It imports nothing heavy: Ray starts a fresh process for it in every
train stage, while the workers start, on the same cores.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional


class ProgressBoard:
    """A tiny actor the driver polls for the progress line, the workers' nodes (for the manifest) and their pids
    (for the fault tests)."""

    def __init__(self) -> None:
        self.state: Dict[str, Any] = {}
        self.pids: Dict[int, int] = {}
        self.nodes: Dict[int, str] = {}
        self.starts = 0  # worker-group starts: 1 + the restarts after failures
        self.stopped = ""  # why the workers stopped early, together (non-finite steps)
        self.marks: Dict[str, float] = {}  # phase -> wall time rank 0 reached it (the latest worker group's)

    def update(self, state: Dict[str, Any]) -> None:
        self.state = state

    def register(self, rank: int, pid: int, node: str = "") -> None:
        self.pids[rank] = pid
        self.nodes[rank] = node
        self.starts += rank == 0

    def mark(self, phase: str, at: float) -> None:
        self.marks[phase] = at

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def get(self) -> Dict[str, Any]:
        return {"state": self.state, "pids": dict(self.pids), "nodes": dict(self.nodes), "starts": self.starts,
                "stopped": self.stopped, "marks": dict(self.marks)}


def marker(board):
    """``mark(phase, at=now)``: tell the board (rank 0's; None: a no-op) when this worker reached a phase; fire
    and forget, or with ``flush`` wait until the board has every mark sent (before the driver reads them)."""

    def mark(phase: str, at: Optional[float] = None, flush: bool = False) -> None:
        if board is not None:
            ref = board.mark.remote(phase, time.time() if at is None else at)
            if flush:  # one caller's calls run in order: this one done, all done
                import ray

                ray.get(ref, timeout=30)

    return mark
