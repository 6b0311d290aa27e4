"""Inference time (paper sections 3.4 and 4.6, Table 4): where it goes and what reuse saves."""

from __future__ import annotations

import platform

import pandas as pd
import torch


def device_description() -> str:
    """The compute device in words, e.g. ``"CPU: AMD EPYC 7B13 (2 threads), torch 2.14.1"``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return f"GPU: {name}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def reuse_speedup(row: pd.Series) -> float:
    """Speed-up of encoding once and reusing the embedding for every strategy (paper 3.4).

    Parameters
    ----------
    row : Series
        One model's row of :func:`cosmoslib.analysis.summaries.timing_table`: ``embedding`` seconds and
        one column per strategy (seconds of prompt + decode; S1 per image).

    Returns
    -------
    float
        ``sum_s (embed + t_s) / (embed + sum_s t_s)`` over the strategies present: the time of
        re-encoding the image for each strategy (SAM's original logic) over the time with one
        cached embedding. Tends to *n* (the number of strategies) when encoding dominates.
    """
    strategies = [c for c in row.index if c != "embedding" and pd.notna(row[c])]
    embed = float(row["embedding"])
    decode = sum(float(row[s]) for s in strategies)
    return (len(strategies) * embed + decode) / (embed + decode)
