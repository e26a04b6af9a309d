"""Exact-match accuracy on a reasoning task (`rdpt eval --task`) for every way of spending
compute without text: depth r, pause tokens, continuous thoughts, adaptive exit.

    from pipeline.eval.task_eval import TaskEvalPlan, evaluate_task
    plan = TaskEvalPlan(recurrences=[1, 4, 16], pauses=[0, 4], thoughts=[0, 2], r=4)
    results = evaluate_task(model, examples, plan, ids, model_cfg)  # see `score`
    results["methods"]["depth"]  # [{"r": 1, "accuracy": ..., "by_difficulty": {...},
                                 #   "flops_per_answer": ...}, ...]

Every point answers each example greedily from its question: the prompt is the question
(+ N pause tokens, or + <|begin_thought|> N thoughts <|end_thought|>), the model writes what
it was trained to write (reasoning steps or not) and its answer is the words after the last
`=>` up to <|endoftext|>. Exact match compares those ids with the reference answer's.

Methods (one curve each): `depth` (r over `recurrences`, no pauses or thoughts), `pause` (the
pause counts at r = plan.r), `thought` (the thought counts at plan.r, fed back per
plan.feedback) and `adaptive` (exit per generated token up to plan.max_r under plan.exit_rule;
one point). Compute is the forward FLOPs of every position the answer needed (prompt, pauses,
thoughts and every generated token, at the depth it ran): model/flops.py's inference count at
the mean sequence length, summed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.model.flops import forward_flops_per_token


@dataclass
class TaskEvalPlan:
    recurrences: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    pauses: list[int] = field(default_factory=list)
    thoughts: list[int] = field(default_factory=list)
    r: int = 4
    """The depth of the pause and thought points."""
    exit_rule: object | None = None
    max_r: int = 64
    feedback: str = "coda"
    max_new_tokens: int = 64
    state_init: str = "zero"
    seed: int = 0

    def points(self) -> list[tuple[str, int]]:
        """(method, knob) of every point: knob = r, pause count, thought count, max r."""
        pts = [("depth", r) for r in self.recurrences]
        pts += [("pause", n) for n in self.pauses]
        pts += [("thought", n) for n in self.thoughts]
        if self.exit_rule is not None:
            pts.append(("adaptive", self.max_r))
        return pts


@dataclass
class Prediction:
    new_ids: list[int]
    positions: int  # positions the model processed (prompt + extras + generated)
    iterations: float  # mean core iterations per processed position


def answer_ids(ids: Sequence[int], answer_mark: int, eot: int) -> tuple[int, ...] | None:
    """The ids after the last `=>` up to <|endoftext|> (None: the model wrote no `=>`)."""
    ids = list(ids)
    if eot in ids:
        ids = ids[: ids.index(eot)]
    if answer_mark not in ids:
        return None
    last = len(ids) - 1 - ids[::-1].index(answer_mark)
    return tuple(ids[last + 1 :])


def score(examples, predict: Callable, plan: TaskEvalPlan, ids: dict, flops_of) -> dict:
    """Accuracy per point, overall and by difficulty, and FLOPs per answer.

    examples: TaskExample (pipeline/data/task_loader.py); predict(question_ids, method, knob)
    -> Prediction; ids: {"=>", "<|endoftext|>"} -> id; flops_of(positions, iterations) ->
    forward FLOPs of one answer."""
    from pipeline.data.task_loader import ANSWER, QUESTION

    mark, eot = ids["=>"], ids["<|endoftext|>"]
    methods: dict[str, list] = defaultdict(list)
    for method, knob in plan.points():
        right, total = defaultdict(int), defaultdict(int)
        flops = 0.0
        for ex in examples:
            question = [int(t) for t in ex.tokens[ex.segments == QUESTION]]
            reference = answer_ids([int(t) for t in ex.tokens[ex.segments == ANSWER]], mark, eot)
            pred = predict(question, method, knob)
            ok = answer_ids(pred.new_ids, mark, eot) == reference
            right[ex.difficulty] += int(ok)
            total[ex.difficulty] += 1
            flops += flops_of(pred.positions, pred.iterations)
        n = sum(total.values())
        methods[method].append(
            {
                "knob": knob,
                "r": plan.r if method in ("pause", "thought") else knob,
                "accuracy": sum(right.values()) / max(n, 1),
                "by_difficulty": {str(d): right[d] / total[d] for d in sorted(total)},
                "examples": n,
                "flops_per_answer": flops / max(n, 1),
            }
        )
    return {"methods": dict(methods)}


# ------------------------------------------------------------------ the model's predictions
@torch.no_grad()
def predict_with_model(model, plan: TaskEvalPlan, ids: dict):
    """predict(question_ids, method, knob) for `score`, greedy, with a KV cache."""
    from pipeline.eval.adaptive import ExitRule  # noqa: F401  (plan.exit_rule's type)
    from pipeline.eval.depth import _EvalMode
    from pipeline.eval.generate import GenerationConfig, generate

    eot, pause = ids["<|endoftext|>"], ids["<|pause|>"]

    def with_generate(prompt, r, rule):
        cfg = GenerationConfig(
            max_new_tokens=plan.max_new_tokens,
            r=r,
            exit_rule=rule,
            state_init=plan.state_init,
            seed=plan.seed,
            stop_ids=[eot],
        )
        res = generate(model, prompt, cfg)
        # the prompt runs at r; every generated token but the last is fed back at its depth
        n = len(prompt) + max(len(res.new_ids) - 1, 0)
        iters = len(prompt) * r + sum(res.depths[1:])
        return Prediction(res.new_ids, n, iters / max(n, 1))

    def predict(question, method, knob):
        if method == "depth":
            return with_generate(question, knob, None)
        if method == "pause":
            return with_generate(question + [pause] * knob, plan.r, None)
        if method == "adaptive":
            return with_generate(question, plan.max_r, plan.exit_rule)
        with _EvalMode(model):
            return generate_with_thoughts(model, question, knob, plan, ids)

    return predict


def generate_with_thoughts(model, question, n_thoughts: int, plan: TaskEvalPlan, ids: dict):
    """Greedy answer after `question <|begin_thought|> n thoughts <|end_thought|>`."""
    from pipeline.model.continuous_thought import initial_states, run_positions, thought_forward

    bot, eot_thought, eot = ids["<|begin_thought|>"], ids["<|end_thought|>"], ids["<|endoftext|>"]
    before, after = list(question) + [bot], [eot_thought]
    total = len(before) + n_thoughts + len(after) + plan.max_new_tokens
    x = model.embed(torch.tensor([before], device=model.embedding.weight.device))
    s0 = initial_states(model, total, plan.state_init, plan.seed, 0, x)
    out = thought_forward(
        model, before, n_thoughts, after, r=plan.r, feedback=plan.feedback, s0_SBH=s0
    )
    cache, pos = out.cache, len(before) + n_thoughts + len(after)
    logits = out.logits_SV[-1]
    new: list[int] = []
    for _ in range(plan.max_new_tokens):
        tok = int(logits.argmax())
        new.append(tok)
        if tok == eot or pos >= model.cfg.max_seq_len:
            break
        x = model.embed(torch.tensor([[tok]], device=x.device))
        res = run_positions(model, x, s0[pos : pos + 1], cache, pos, plan.r)
        logits = model.head(res.hidden_SBH)[0, -1]
        pos += 1
    return Prediction(new, pos, float(plan.r))


def evaluate_task(model, examples, plan: TaskEvalPlan, ids: dict, model_cfg) -> dict:
    """`score` with the model's own greedy predictions (see the module docstring)."""
    examples = list(examples)
    mean_len = sum(len(ex.tokens) for ex in examples) / max(len(examples), 1)

    def flops_of(positions: int, iterations: float) -> float:
        r_lo = int(iterations)
        frac = iterations - r_lo
        per = (1 - frac) * forward_flops_per_token(model_cfg, r_lo, int(mean_len))
        if frac:
            per += frac * forward_flops_per_token(model_cfg, r_lo + 1, int(mean_len))
        return positions * per

    return score(examples, predict_with_model(model, plan, ids), plan, ids, flops_of)


# ------------------------------------------------------------------ report
def print_task_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    levels = sorted(
        {d for pts in results["methods"].values() for p in pts for d in p["by_difficulty"]},
        key=int,
    )
    t = Table(title=f"task {results.get('task', '')}: exact-match accuracy")
    for col in ("method", "knob", "r", "accuracy", *[f"d={d}" for d in levels], "GFLOP/answer"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for method, pts in results["methods"].items():
        for p in pts:
            t.add_row(
                method,
                str(p["knob"]),
                str(p["r"]),
                f"{p['accuracy']:.3f}",
                *[f"{p['by_difficulty'].get(d, float('nan')):.3f}" for d in levels],
                f"{p['flops_per_answer'] / 1e9:.4f}",
            )
    Console().print(t)


def plot_task(results: dict, out_dir) -> list:
    """accuracy vs FLOPs per answer, one line per method; accuracy by difficulty per point."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in results["methods"].items():
        xs = [p["flops_per_answer"] for p in pts]
        ax.plot(xs, [p["accuracy"] for p in pts], marker="o", label=method)
        for p, x in zip(pts, xs):
            ax.annotate(str(p["knob"]), (x, p["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs per answer")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(f"task {results.get('task', '')}")
    ax.legend()
    first = out_dir / "task_accuracy_vs_flops.png"
    fig.tight_layout()
    _save(fig, first)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in results["methods"].items():
        for p in pts:
            ds = sorted(p["by_difficulty"], key=int)
            ax.plot(
                [int(d) for d in ds],
                [p["by_difficulty"][d] for d in ds],
                marker=".",
                label=f"{method} {p['knob']}",
            )
    ax.set_xlabel("difficulty (reasoning steps)")
    ax.set_ylabel("exact-match accuracy")
    ax.legend(fontsize=6, ncol=2)
    second = out_dir / "task_accuracy_by_difficulty.png"
    fig.tight_layout()
    _save(fig, second)
    plt.close(fig)
    return [first, second]


def _save(fig, path) -> None:
    from pipeline.common.atomic import atomic_open

    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def task_metrics(results: dict) -> list[tuple[dict, int]]:
    """MLflow metrics: task/<method>/accuracy (and per difficulty) with step = knob."""
    groups = []
    for method, pts in results["methods"].items():
        for p in pts:
            m = {
                f"task/{method}/accuracy": p["accuracy"],
                f"task/{method}/flops_per_answer": p["flops_per_answer"],
            }
            for d, acc in p["by_difficulty"].items():
                m[f"task/{method}/accuracy_d{d}"] = acc
            groups.append((m, int(p["knob"])))
    return groups
