"""Company data in: reading exports, normalising records, row checks, the dataset on disk.

Plain library code (pyarrow, numpy, tokenizers; no orchestration or GX imports): the
``tasks.ingest`` and ``tasks.validate`` stages put it together. Modules:

- ``readers``: JSONL / JSON / CSV / Parquet, streamed, bad rows kept with their number
- ``normalise``: one record shape, content ids, the hash split
- ``dataset``: Parquet parts, manifest, atomic publication
- ``checks``, ``pii``, ``tokens``, ``contamination``: the per-row checks
- ``rules``, ``errors``: rule names, policies, and the error a person reads
"""
