"""Offline dataset preparation: tokenise text, pack sequences, write WebDataset shards.

Start at `prep.py` (the phases of `rdpt prep`). Then:
  config.py     PrepConfig (the YAML schema)
  sources.py    inputs -> ordered documents, chunk plan, train/val split by content hash
  tokenizer.py  byte-level BPE (HF tokenizers) and its exact, faster tiktoken form
  encode.py     phase 1: chunk -> .work/chunk-XXXXXX.npz, in worker processes
  pack.py       phase 2: rows of seq_len+1 tokens -> shards
  shards.py     tar/npy layout: writing, indexed reading
  verify.py     `rdpt prep verify` / `inspect`, manifest reading
  reasoning_tasks.py  the reasoning tasks (arithmetic chains, reachability) from a seed
  task_prep.py  `rdpt prep --task`: disjoint splits, word-level tokenizer, task shards
The reader used by training and evaluation is pipeline/data/loader.py; the command is
pipeline/cli/prep.py.
"""
