"""Toy tasks with verifiable rewards that a tiny model can learn on a CPU in minutes.

A task makes prompts, knows each prompt's correct answer, scores a response and owns a
fixed held-out evaluation set (drawn from a seed disjoint from training prompts' stream).
Prompts and answers are short strings over a small alphabet, so the character tokenizer in
`models.py` covers them.

What the trainer calls on a task (your own needs only these; see examples/custom_task.py):

    sample(rng, n) -> (prompts, answers)   training prompts; `rng` is the trainer's generator, which
                                           a task with a fixed prompt stream may ignore
    score(prompts, generation) -> [n]      rewards; the default calls `reward(prompts, texts)`, override
                                           it to reward on token ids (generation.response_tokens)
    success(prompts, responses) -> [n]     held-out success (only by the default evaluation)
    eval_set(n) -> (prompts, answers)      held-out prompts, only when the trainer is given none
                                           (`eval_prompts=`); the default draws from its own seed,
                                           never from the training stream
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TASKS", "AdditionTask", "MixedReverseTask", "ReverseTask", "Task", "make_task"]


class Task:
    """Base class: subclasses define `alphabet`, `max_answer_len` and `sample`."""

    name: str = "task"
    #: Every character a prompt or an answer may contain.
    alphabet: str = ""
    #: Longest correct answer, in characters (= tokens with the character tokenizer).
    max_answer_len: int = 0
    #: Reward for a wrong answer = partial_credit × fraction of answer positions right (0 = exact match only).
    partial_credit: float = 0.0

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        """`n` random (prompts, answers)."""
        raise NotImplementedError

    def reward(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """Reward in [0, 1] per response: 1 for the exact answer, else partial credit.

        Partial credit is `partial_credit` times the fraction of positions right (over the longer of
        answer and response, so padding a response with extra characters does not pay): a denser
        signal that still ranks the exact answer strictly highest. `success` is the exact-match indicator used for evaluation.
        """
        answers = [self.answer(p) for p in prompts]
        out = np.empty(len(prompts), dtype=np.float32)
        for i, (ans, resp) in enumerate(zip(answers, responses)):
            if resp == ans:
                out[i] = 1.0
            else:
                hits = sum(a == b for a, b in zip(ans, resp))
                out[i] = self.partial_credit * hits / max(len(ans), len(resp), 1)
        return out

    def score(self, prompts: list[str], generation) -> np.ndarray:
        """Rewards for a `Generation` (text, token ids and log-probs of each response). The default
        rewards the decoded text; override to reward token ids."""
        return self.reward(prompts, generation.responses)

    def success(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        """1.0 where the response is exactly the answer."""
        return np.array([r == self.answer(p) for p, r in zip(prompts, responses)], dtype=np.float32)

    def answer(self, prompt: str) -> str:
        raise NotImplementedError

    def eval_set(self, n: int = 256, seed: int = 10_000) -> tuple[list[str], list[str]]:
        """A fixed held-out set. Training draws use the trainer's seed; this seed is separate,
        and prompts that would also appear in training are not excluded (the prompt spaces are
        large enough that overlap is small; see each task's docstring)."""
        return self.sample(np.random.default_rng(seed), n)


@dataclass
class ReverseTask(Task):
    """Reverse a digit string: prompt "3071>" → answer "1703".

    Lengths are drawn uniformly in [min_len, max_len]; with the defaults there are
    10^3 + 10^4 + 10^5 distinct prompts, so a 256-prompt held-out set barely overlaps training.
    """

    min_len: int = 3
    max_len: int = 5
    partial_credit: float = 0.0
    name: str = "reverse"

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"ReverseTask needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        self.alphabet = "0123456789>"
        self.max_answer_len = self.max_len

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        lengths = rng.integers(self.min_len, self.max_len + 1, size=n)
        digits = rng.integers(0, 10, size=(n, self.max_len))
        strings = ["".join(map(str, row[:k])) for row, k in zip(digits, lengths)]
        return [s + ">" for s in strings], [s[::-1] for s in strings]

    def answer(self, prompt: str) -> str:
        return prompt.rstrip(">")[::-1]


@dataclass
class AdditionTask(Task):
    """Add two non-negative integers below 10^digits: prompt "47+8=" → answer "55"."""

    digits: int = 2
    partial_credit: float = 0.0
    name: str = "add"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"AdditionTask needs digits >= 1, got {self.digits}")
        self.alphabet = "0123456789+="
        self.max_answer_len = self.digits + 1

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        a = rng.integers(0, 10**self.digits, size=n)
        b = rng.integers(0, 10**self.digits, size=n)
        return [f"{x}+{y}=" for x, y in zip(a, b)], [str(x + y) for x, y in zip(a, b)]

    def answer(self, prompt: str) -> str:
        left, right = prompt.rstrip("=").split("+")
        return str(int(left) + int(right))


@dataclass
class MixedReverseTask(ReverseTask):
    """Reverse a digit string of 2 to 8 digits: prompts of very different difficulty and answer
    length (short ones are soon always right, long ones long always wrong: both give groups without
    learning signal), with partial credit for the positions right."""

    min_len: int = 2
    max_len: int = 8
    partial_credit: float = 0.3
    name: str = "reverse_mixed"


TASKS: dict[str, type[Task]] = {"reverse": ReverseTask, "add": AdditionTask, "reverse_mixed": MixedReverseTask}


def make_task(name: str, **kwargs) -> Task:
    """Build a task by name (`reverse`, `reverse_mixed` or `add`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
