"""Test-time evaluation of recurrent-depth models.

- `depth`: loss / perplexity against the recurrence count r (one pass to max r), recurrence
  telemetry over iterations; `evaluate_depths` is what training calls every N steps.
- `adaptive`: per-token adaptive exit (KL, entropy or state-change criterion), exit-depth
  histogram, compute saved against fixed r at equal loss.
- `generate`: sampling with a KV cache, fixed r or adaptive exit, Huginn KV-cache sharing and
  continuous chain of thought.
- `lm_eval_adapter`: an lm-evaluation-harness `LM` at a chosen r or with adaptive exit.
- `task_eval`: exact-match accuracy on a reasoning task against r, pause tokens, continuous
  thoughts and adaptive exit, by difficulty, with FLOPs per answer (`rdpt eval --task`).
- `cli`: `rdpt eval` and `rdpt generate`.

All algorithms use the model's decomposed API (prelude / initial_state / core_step / coda).
"""
