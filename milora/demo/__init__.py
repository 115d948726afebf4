"""Offline demo world: a tiny pretrained model plus fictional company data.

No model hub or public data set is reachable from the machines this project
runs on, yet the pipeline must run end to end and MiLoRA's promise (learn the
company data, keep what the base model knew) must be measurable. This package
builds a small, deterministic stand-in for both from the project's own code:

* :mod:`milora.demo.world`     - world-knowledge corpus and held-out probes;
* :mod:`milora.demo.company`   - company instruction data in two monthly drops, and decoy shops;
* :mod:`milora.demo.instructions` - general chat data for pretraining (decoys, world questions);
* :mod:`milora.demo.tokenizer` - offline byte-level BPE tokenizer with a chat template;
* :mod:`milora.demo.pretrain`  - seeded pretraining of a tiny ``LlamaForCausalLM``;
* :mod:`milora.demo.probes`    - answer normalisation, scoring and batched greedy QA;
* :mod:`milora.demo.build`     - ``python -m milora.demo.build`` entry point;
* :mod:`milora.demo.names`, :mod:`milora.demo.files` - seeded names, byte-stable writers.
"""

from __future__ import annotations

DEFAULT_SEED = 0
"""Seed used by the committed artefacts under ``data/demo``."""
