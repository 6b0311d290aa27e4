"""Book: what the chapters open, and the run list that drives them.

:mod:`.runlist` (typed ``Config`` per run-list config, papermill, the table of contents),
:mod:`.chapters` (``Chapter.open``: manifest, models, results and captions for a notebook) and
:mod:`.plots` (the book's figure style). The top layer below :mod:`cosmoslib.cli`.
"""
