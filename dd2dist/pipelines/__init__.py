"""Offline shard builders: tokenise image shards with a teacher's VQ encoder (DALI), sample teacher-token shards
across Ray workers.

They sit above the data layer (the shard format, :mod:`dd2dist.data`) and the teachers, since they need both;
the command lines are ``jobs/tokenize_images.py`` and ``jobs/precompute_teacher_tokens.py``.
"""
