"""The paper's six test strategies (section 3.3), named once for the whole library.

``S1`` is the *Everything* mode (a grid of point prompts, filtered); ``S2``-``S6`` prompt one
object each, with the rules of :mod:`cosmoslib.protocol.prompts`.
"""

from __future__ import annotations

#: Every strategy, in the paper's order.
STRATEGIES = ("S1", "S2", "S3", "S4", "S5", "S6")
#: The strategies that prompt one object (rows of the prompt table).
PROMPT_STRATEGIES = ("S2", "S3", "S4", "S5", "S6")
#: Short names used in figure legends.
STRATEGY_NAMES = {
    "S1": "Everything",
    "S2": "1 positive point",
    "S3": "5 positive points",
    "S4": "5 positive + 5 negative points",
    "S5": "box",
    "S6": "box + 1 positive point",
}
#: Prompt curricula of decoder finetuning (paper 4.12): name -> the strategies an object's training
#: prompt is drawn from. ``box``: the tight box (S5), the authors' script; ``mixed``: any of S2-S6.
CURRICULA: dict[str, tuple[str, ...]] = {"box": ("S5",), "mixed": PROMPT_STRATEGIES}
#: The prompt kinds (the model registry's ``trained_prompts`` words) each strategy gives a model:
#: S1's grid and S2-S4 are points, S5 a box, S6 a box and a point.
STRATEGY_PROMPTS = {"S1": ("points",), "S2": ("points",), "S3": ("points",), "S4": ("points",),
                    "S5": ("boxes",), "S6": ("boxes", "points")}


def check(strategies) -> list[str]:
    """Upper-cased ``strategies``, or a ``ValueError`` naming the unknown ones."""
    wanted = [str(s).strip().upper() for s in strategies]
    bad = [s for s in wanted if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)}")
    return wanted
