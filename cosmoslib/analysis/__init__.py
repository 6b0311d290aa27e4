"""Analysis: from result tables to the paper's numbers (paper 4.3-4.8 and its findings).

:mod:`.factors` and :mod:`.fourier` (the object factors of 4.8), :mod:`.stats` (Table 6),
:mod:`.uncertainty` (cluster bootstrap, paired tests), :mod:`.summaries` and
:mod:`.volume_summaries` (aggregations the chapters plot), :mod:`.timing`, :mod:`.synthetic`
(known-answer data), :mod:`.paper` (numbers quoted from the paper) and :mod:`.findings`
(which of the eight findings hold). Imports protocol and everything below it.
"""
