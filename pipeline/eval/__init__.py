"""Test-time evaluation of recurrent-depth models.

- `depth`: loss / perplexity against the recurrence count r (one pass to max r), recurrence
  telemetry over iterations; `evaluate_depths` is what training calls every N steps.
- `adaptive`: per-token adaptive exit (KL, entropy, state-change or learned-gate criterion),
  exit-depth histogram, compute saved against fixed r at equal loss.
  `exit_curves`: loss against mean depth per criterion, one point per threshold.
- `generate`: sampling with a KV cache, fixed r or adaptive exit, Huginn KV-cache sharing and
  continuous chain of thought; `generate_batch` for B prompts.
- `decode`: the lean decode loop every generating path runs (static KV cache, RoPE once per
  position, the fast step of pipeline/model/fast_decode.py for fp32 models at TP 1, else the
  layers called directly; on CUDA torch.compile and a CUDA graph of a fixed-r step).
- `speculative`: self-speculative greedy decoding (draft at DRAFT_R, verify at the full r).
- `depth_by_category`: exit-depth histograms per input category, with and without continuous
  chain of thought.
- `lm_eval_adapter`: an lm-evaluation-harness `LM` at a chosen r or with adaptive exit.
- `task_eval`: exact-match accuracy on a reasoning task against r, pause tokens, continuous
  thoughts and adaptive exit, by difficulty, with FLOPs per answer (`rdpt eval --task`).
- `cli`: `rdpt eval` and `rdpt generate`.

Scoring, and the decode loop where the fast step does not apply, run the model's lean pieces
(pipeline/model/lean_forward.py), whose numbers are bitwise those of its general decomposed API
(prelude / initial_state / core_step / coda), which the other algorithms use; the fast step's
differ in the last bits (sums in another order), with the same tokens (tests/test_decode.py).
"""
