"""Parity toolkit: `check` (engine vs reference logprobs), `lint` (config pitfalls), `ablate` and `compare`.

Submodules are imported on demand (some pull in torch or matplotlib); nothing is re-exported here.
"""
