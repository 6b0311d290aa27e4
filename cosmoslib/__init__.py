"""cosmoslib: the library behind the COSMOS book.

One module per idea of Huang et al., "Segment Anything Model for Medical Images?"
(Medical Image Analysis, 2024). Notebooks and the ``cosmos`` command only call into it.
"""

__version__ = "0.1.0"
