"""Helpers shared by test modules (pools, reference weights, brute-force oracles, output checks)."""
