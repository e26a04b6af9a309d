"""Reasoning tasks generated from a seed: question, language reasoning steps, answer.

    from data_prep.reasoning_tasks import TASKS, ArithmeticSettings
    task = TASKS["arithmetic"](ArithmeticSettings(steps=(2, 6), modulus=10))
    example = task.sample(random.Random(0))    # Example(question, steps, answer, difficulty)
    example.question  # "c = b * 2 ; a = 3 ; b = a + 4 ? c"

Every example is whitespace-separated words from the task's fixed vocabulary
(`task.vocabulary()` plus STEP_END, QUESTION_END and ANSWER_MARK), so a word-level tokenizer
encodes it exactly (data_prep/task_prep.py).

- `arithmetic`: a chain of variable bindings modulo `modulus`, given in shuffled order; one
  reasoning step per binding that needs computing ("b = 3 + 4 = 7"); difficulty = the number
  of steps (drawn from `steps`).
- `reachability` (ProsQA-like): a shuffled list of directed edges; is the target or the
  distractor reachable from the source? One step per hop of the path ("n3 -> n7");
  difficulty = the number of hops. The distractor is never reachable (edges only lead from
  the distractor's chain into the path, or from the path to dead ends).

A task whose settings allow an example without reasoning steps is refused (RdptConfigError):
the suite exists to measure reasoning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field, model_validator

from pipeline.common.config_io import ConfigModel
from pipeline.common.errors import RdptConfigError

STEP_END = ";"
"""Ends every reasoning step (and every binding or edge of a question)."""
QUESTION_END = "?"
ANSWER_MARK = "=>"
"""Precedes the answer; exact match compares the words after the last one."""


@dataclass(frozen=True)
class Example:
    question: str
    steps: tuple[str, ...]
    answer: str
    difficulty: int

    @property
    def key(self) -> str:
        """What identifies the instance: two examples with the same question are one instance
        (the split of an example depends only on this)."""
        return self.question


def _check_range(name: str, lo: int, hi: int, least: int) -> None:
    if lo > hi:
        raise RdptConfigError(f"{name}: the range [{lo}, {hi}] is empty (min > max)")
    if lo < least:
        raise RdptConfigError(
            f"{name}: every example needs at least {least} reasoning step(s), got a minimum "
            f"of {lo} (a task without reasoning steps measures no reasoning)"
        )


class ArithmeticSettings(ConfigModel):
    steps: tuple[int, int] = (1, 4)
    """Inclusive range of the number of reasoning steps (one per computed binding)."""
    modulus: int = Field(10, ge=2, le=1000)
    """Values are taken modulo this (each value is one word)."""
    ops: list[str] = ["+", "-", "*"]
    variables: int = Field(26, ge=2, le=26)
    """How many letter names (a, b, ...) the bindings draw from."""

    @model_validator(mode="after")
    def _checks(self) -> ArithmeticSettings:
        _check_range("task.arithmetic.steps", *self.steps, least=1)
        bad = sorted(set(self.ops) - {"+", "-", "*"})
        if bad or not self.ops:
            raise RdptConfigError(f"task.arithmetic.ops: one or more of + - *, got {self.ops}")
        if self.steps[1] + 1 > self.variables:
            raise RdptConfigError(
                f"task.arithmetic: {self.steps[1]} steps need {self.steps[1] + 1} variables, "
                f"only {self.variables} are allowed"
            )
        return self


class ReachabilitySettings(ConfigModel):
    hops: tuple[int, int] = (2, 5)
    """Inclusive range of the path length from source to target (one step per hop)."""
    nodes: int = Field(64, ge=4, le=4096)
    """Node names n0 .. n{nodes-1} the graphs draw from."""
    dead_ends: int = Field(3, ge=0)
    """Edges from path nodes to nodes that lead nowhere."""
    back_edges: int = Field(2, ge=0)
    """Edges from the distractor chain into the path (they do not make it reachable)."""

    @model_validator(mode="after")
    def _checks(self) -> ReachabilitySettings:
        _check_range("task.reachability.hops", *self.hops, least=1)
        need = 2 * (self.hops[1] + 1) + self.dead_ends
        if need > self.nodes:
            raise RdptConfigError(
                f"task.reachability: {self.hops[1]} hops and {self.dead_ends} dead ends need "
                f"{need} distinct nodes, nodes={self.nodes}"
            )
        return self


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticTask:
    name = "arithmetic"
    Settings = ArithmeticSettings

    def __init__(self, settings: ArithmeticSettings):
        self.s = settings

    def vocabulary(self) -> list[str]:
        letters = [chr(ord("a") + i) for i in range(self.s.variables)]
        numbers = [str(i) for i in range(self.s.modulus)]
        return [*letters, *numbers, "=", *_OPS]

    def sample(self, rng: random.Random) -> Example:
        m = self.s.modulus
        n_steps = rng.randint(*self.s.steps)
        names = rng.sample([chr(ord("a") + i) for i in range(self.s.variables)], n_steps + 1)
        value = rng.randrange(m)
        bindings = [f"{names[0]} = {value}"]
        steps = []
        for i in range(1, n_steps + 1):
            op = rng.choice(self.s.ops)
            k = rng.randrange(m)
            new = _OPS[op](value, k) % m
            bindings.append(f"{names[i]} = {names[i - 1]} {op} {k}")
            steps.append(f"{names[i]} = {value} {op} {k} = {new}")
            value = new
        rng.shuffle(bindings)
        question = f" {STEP_END} ".join(bindings) + f" {QUESTION_END} {names[-1]}"
        return Example(question, tuple(steps), str(value), n_steps)


class ReachabilityTask:
    name = "reachability"
    Settings = ReachabilitySettings

    def __init__(self, settings: ReachabilitySettings):
        self.s = settings

    def vocabulary(self) -> list[str]:
        return [*(f"n{i}" for i in range(self.s.nodes)), "->", "or"]

    def sample(self, rng: random.Random) -> Example:
        hops = rng.randint(*self.s.hops)
        picked = rng.sample(range(self.s.nodes), 2 * (hops + 1) + self.s.dead_ends)
        names = [f"n{i}" for i in picked]
        path, chain = names[: hops + 1], names[hops + 1 : 2 * (hops + 1)]
        ends = names[2 * (hops + 1) :]
        edges = [(a, b) for a, b in zip(path, path[1:])]
        edges += [(a, b) for a, b in zip(chain, chain[1:])]
        edges += [(rng.choice(path[:-1]), e) for e in ends]
        edges += [(rng.choice(chain), rng.choice(path)) for _ in range(self.s.back_edges)]
        edges = sorted(set(edges), key=lambda e: rng.random())
        source, target, distractor = path[0], path[-1], chain[-1]
        reach = _reachable(edges, source)
        # NOTE: true by construction; checked because a wrong label would silently poison a task
        if target not in reach or distractor in reach:
            raise AssertionError(f"reachability generator: bad instance {edges}")
        a, b = (target, distractor) if rng.random() < 0.5 else (distractor, target)
        question = (
            f" {STEP_END} ".join(f"{x} -> {y}" for x, y in edges)
            + f" {QUESTION_END} {source} -> {a} or {b}"
        )
        steps = tuple(f"{x} -> {y}" for x, y in zip(path, path[1:]))
        return Example(question, steps, target, hops)


def _reachable(edges, source) -> set[str]:
    out: dict[str, list[str]] = {}
    for x, y in edges:
        out.setdefault(x, []).append(y)
    seen, todo = {source}, [source]
    while todo:
        for y in out.get(todo.pop(), []):
            if y not in seen:
                seen.add(y)
                todo.append(y)
    return seen


TASKS = {t.name: t for t in (ArithmeticTask, ReachabilityTask)}


def make_task(name: str, settings: dict | None = None):
    """The task called `name` with `settings` (RdptConfigError on an unknown name or key)."""
    if name not in TASKS:
        raise RdptConfigError(f"task: unknown task {name!r} (one of {sorted(TASKS)})")
    cls = TASKS[name]
    try:
        return cls(cls.Settings(**(settings or {})))
    except RdptConfigError:
        raise
    except ValueError as e:  # pydantic: name the task in the message
        raise RdptConfigError(f"task.{name}: {e}") from None
