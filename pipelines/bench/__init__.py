"""Benchmarks: each measures a stage (or an exact Grad-Mimic step) against its baselines side by side in one run
and prints ratios, since a shared machine drifts between runs."""

import json
from typing import Any, Dict


def print_result(result: Dict[str, Any], as_json: bool) -> None:
    """One JSON line, or an aligned ``key  value`` table."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
