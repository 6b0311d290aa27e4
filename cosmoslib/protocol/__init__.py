"""Protocol: prompts, matching, scoring and the runner (paper sections 3.3-3.5, 4.2-4.12).

:mod:`.prompts` (S2-S6 and Table 8 shifts), :mod:`.matching` (Eq. 1), :mod:`.metrics` (DICE,
JAC, HD, HD95, ASSD, NSD), :mod:`.evaluate` (the runner) and :mod:`.distributed` (the same on a
Dask cluster), :mod:`.volumes` (3D scoring in mm), :mod:`.interactive` (Fig. 16),
:mod:`.annotation` (Table 7) and :mod:`.finetune` (Figs. 17-18). Imports data, models and the
shared top-level modules.
"""
