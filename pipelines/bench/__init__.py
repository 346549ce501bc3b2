"""Benchmarks that print the numbers the issues ask for."""

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
