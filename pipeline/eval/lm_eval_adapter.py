"""lm-evaluation-harness adapter: score an rdpt model on lm-eval tasks at a chosen r or with
adaptive exit.

    from pipeline.eval.lm_eval_adapter import RdptLM, run_lm_eval
    lm = RdptLM.from_checkpoint("runs/tiny", r=32)   # a run, a checkpoint, an export, an HF dir
    lm = RdptLM.from_checkpoint("exports/huginn-hf")  # r = the training r-bar
    results = run_lm_eval(lm, ["my_task"], include_path="tasks/")   # {"my_task": {"acc,none": ...}}

Offline, lm-eval's built-in tasks cannot download their data; write a task YAML whose
`dataset_path: json` and `dataset_kwargs: {data_files: {...}}` point at local JSON/JSONL files
and pass its folder as `include_path` (CLI: `--lm-eval-include DIR`).

Scoring is deterministic by default (zero initial state); with `state_init="random"` the
initial state depends on the padded batch shape, so keep batch_size fixed when comparing runs.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM

from pipeline.eval.adaptive import ExitRule, score_tokens
from pipeline.eval.depth import IGNORE_INDEX, _EvalMode, check_state_init, model_device
from pipeline.eval.generate import GenerationConfig, generate


class RdptLM(LM):
    """An lm-eval `LM` over a RecurrentDepthLM and its HF `tokenizers` tokenizer.

    Args:
        model: the RecurrentDepthLM (decomposed API).
        tokenizer: a `tokenizers.Tokenizer`.
        eot_id: end-of-text id: the context of an empty prompt and the rolling-window prefix.
        max_length: longest scored window (the model's context length).
        r: fixed r, or the maximum r with `exit_rule`.
        exit_rule: adaptive exit per token (None: fixed r).
        state_init / seed: initial latent state.
        batch_size: requests scored together (right-padded).
        max_gen_toks: default generation length for generate_until.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eot_id: int,
        max_length: int,
        r: int = 32,
        exit_rule: ExitRule | None = None,
        state_init: str = "zero",
        seed: int = 0,
        batch_size: int = 8,
        max_gen_toks: int = 64,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"r: the number of core iterations must be >= 1, got {r}")
        self.model = model
        self.tokenizer = tokenizer
        self.eot_id = int(eot_id)
        self.max_length = int(max_length)
        self.r = int(r)
        self.exit_rule = exit_rule
        self.state_init = check_state_init(state_init)
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self.max_gen_toks = max_gen_toks
        self.depth_sum = 0
        self.depth_tokens = 0

    @classmethod
    def from_checkpoint(cls, ckpt_or_run: str, **kwargs) -> RdptLM:
        """Load with pipeline.eval.loading.load_for_inference and wrap it."""
        from pipeline.eval.loading import default_r, load_model_and_tokenizer

        loaded = load_model_and_tokenizer(ckpt_or_run)
        kwargs.setdefault("r", default_r(loaded))  # the r-bar the model was trained with
        return cls(
            loaded.model,
            loaded.tokenizer,
            eot_id=loaded.eot_id,
            max_length=loaded.max_length,
            **kwargs,
        )

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # Trailing spaces of the context belong to the continuation (lm-eval convention).
        n_space = len(context) - len(context.rstrip())
        if n_space:
            continuation = context[-n_space:] + continuation
            context = context[:-n_space]
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        if whole[: len(ctx)] == ctx:
            cont = whole[len(ctx) :]
        else:  # the merge crossed the boundary: encode separately
            cont = self.tok_encode(continuation)
        return (ctx or [self.eot_id]), cont

    # ------------------------------------------------------------------ scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) for token pairs."""
        device = model_device(self.model)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        with _EvalMode(self.model):
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                rows = []
                for i in idx:
                    ctx, cont = pairs[i]
                    full = (ctx + cont)[-(self.max_length + 1) :]
                    n_cont = min(len(cont), len(full) - 1)
                    rows.append((full[:-1], full[1:], n_cont))
                S = max(len(r[0]) for r in rows)
                inputs = torch.zeros(len(rows), S, dtype=torch.long)
                targets = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long)
                for b, (inp, tgt, n_cont) in enumerate(rows):
                    inputs[b, : len(inp)] = torch.tensor(inp)
                    if n_cont:
                        targets[b, len(tgt) - n_cont : len(tgt)] = torch.tensor(tgt[-n_cont:])
                inputs, targets = inputs.to(device), targets.to(device)
                sc = score_tokens(
                    self.model,
                    inputs,
                    targets,
                    max_r=self.r,
                    rule=self.exit_rule,
                    state_init=self.state_init,
                    seed=self.seed,
                )
                scored = targets != IGNORE_INDEX
                self.depth_sum += int(sc.depth[scored].sum())
                self.depth_tokens += int(scored.sum())
                for b, i in enumerate(idx):
                    m = scored[b]
                    out[i] = (float(sc.logprob[b][m].sum()), bool(sc.greedy[b][m].all()))
        return out  # type: ignore[return-value]

    @property
    def mean_depth(self) -> float:
        """Mean iterations per scored token so far (r, or less with adaptive exit)."""
        return self.depth_sum / self.depth_tokens if self.depth_tokens else 0.0

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score(pairs)
        for req, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for req in requests:
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.eot_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(lp for lp, _ in self._score(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
            prompt = (self.tok_encode(context) or [self.eot_id])[-self.max_length :]
            max_new = max(0, min(max_new, self.max_length - len(prompt)))
            cfg = GenerationConfig(
                max_new_tokens=max_new,
                r=self.r,
                exit_rule=self.exit_rule,
                temperature=temperature,
                top_p=float(kw.get("top_p", 1.0) or 1.0),
                state_init=self.state_init,
                seed=self.seed,
                stop_ids=[self.eot_id],
            )
            res = generate(self.model, prompt, cfg) if max_new else None
            ids = [t for t in (res.new_ids if res else []) if t != self.eot_id]
            text = self.tok_decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs


def run_lm_eval(
    lm: RdptLM,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
) -> dict:
    """Run lm-eval `tasks` on `lm`; returns lm-eval's per-task metrics {task: {metric: value}}.

    `include_path`: a folder of task YAML files (local data); with it, lm-eval's built-in task
    index is skipped (it needs the hub for data anyway).
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pipeline.common.errors import RdptConfigError

    tm = TaskManager(include_path=include_path, include_defaults=include_path is None)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        where = f"in {include_path}" if include_path else "(no --lm-eval-include given)"
        raise RdptConfigError(f"lm-eval task(s) not found {where}: {', '.join(missing)}")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=tm,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
    )
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        for task, metrics in out["results"].items()
    }
