"""Reading datasets written by `rdpt prep` (layer 1: data).

  loader.py   DatasetInfo (manifest), SplitReader (indexed rows), ResumableLoader (the
              training loader: deterministic order independent of the data-parallel size,
              exact mid-epoch resume), iterate_sequences (evaluation batches)
  task_loader.py  task datasets: TaskLoader (loss mask, step segments, pause tokens),
              task_examples (evaluation)

The writing side (tokenise, pack, shards, manifest) is the `data_prep` package.
"""
