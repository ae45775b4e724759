"""Data quality: label issues (confident learning), duplicates and leakage, out-of-distribution scores.

The algorithms behind the ``labels``, ``duplicates`` and ``ood`` report analyzers, kept
here so that each plugin file holds only its method's plumbing. Every function works on
whole batched tensors or arrays: no per-sample Python in a loop that grows with the data.
Imports: as xdl.methods.
"""
