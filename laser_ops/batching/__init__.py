"""Continuous batching: rows of many requests and profiles share each forward pass.

``scheduler`` plans each step (pure bookkeeping), ``runner`` runs it on the model with a per-row KV
cache (``kv_cache``), ``sampler`` picks tokens for all rows at once, ``detokenizer`` turns them into
text, ``row_edits`` gives each row its own profile's weights, and ``engine`` ties them together.
"""
