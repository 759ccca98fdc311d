"""No silent training: a warning when several steps in a row learnt nothing.

A group whose completions all get the same reward has zero advantage, so it contributes no policy gradient.
When every group of `ZERO_SIGNAL_STEPS` consecutive steps is like that, the run is only spending time (a
model that never writes the answer format trains at reward 0 with every group skipped). `ZeroSignalWatch`
reads each step's logged metrics (averaged over ranks: `frac_reward_zero_std` is the share of groups whose
rewards are all equal) and returns one warning per such streak, naming the likely cause from the same
metrics: format reward 0, no answer parsing, every group all correct or all wrong, or else rewards that do
not vary within a group.
"""

from __future__ import annotations

#: Consecutive steps whose every group has zero advantage before the warning.
ZERO_SIGNAL_STEPS = 3


class ZeroSignalWatch:
    """Feed every step's metrics to `observe`; it returns a warning line once per streak of
    `steps` zero-signal steps (a step with some signal ends the streak; a step without groups is ignored)."""

    def __init__(self, steps: int = ZERO_SIGNAL_STEPS) -> None:
        self.steps = steps
        self.streak: list[tuple[int, dict]] = []
        self.warned = False

    def observe(self, step: int, metrics: dict) -> str | None:
        share = metrics.get("frac_reward_zero_std")
        if not isinstance(share, (int, float)) or share != share:  # no groups this step (NaN or absent)
            return None
        if share < 1.0:
            self.streak, self.warned = [], False
            return None
        self.streak.append((step, metrics))
        if self.warned or len(self.streak) < self.steps:
            return None
        self.warned = True
        first, last = self.streak[0][0], self.streak[-1][0]
        return (f"steps {first}-{last}: every group had zero advantage (all completions of each prompt got the "
                f"same reward), so nothing was learnt; likely cause: {likely_cause([m for _, m in self.streak])}")


def likely_cause(history: list[dict]) -> str:
    """What the metrics of a zero-signal streak point at (the first that holds in every step)."""

    def every(test) -> bool:
        return all(test(metrics) for metrics in history)

    if every(lambda m: m.get("rewards/format") == 0):
        return ("format reward 0: no completion writes <think>...</think><answer>...</answer> (check "
                "prompt_template and the model's chat template, or warm the format up first as the demo does)")
    unparsed = [key for key in history[0] if key.startswith("unparsed_by_type/")]
    if unparsed and every(lambda m: all(m.get(key) == 1 for key in unparsed)):
        return ("no answer parses for its problem type (all answers unparsed): check that the prompt asks for "
                "the answer form the problem type reads")
    if every(lambda m: m.get("all_correct") == 1):
        return "every group is all correct: the data is too easy for this model (nothing left to learn)"
    if every(lambda m: m.get("all_wrong") == 1):
        return ("every group is all wrong: the task is too hard for this model, or the solutions are in a form "
                "the answers never match")
    return ("the rewards do not vary within a group: a reward that is constant for these prompts, or too little "
            "sampling diversity (temperature, top_p, top_k)")
