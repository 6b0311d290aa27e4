"""Data: raw medical files -> the COSMOS layout -> the manifest (paper section 2).

:mod:`.readers` (files to arrays), :mod:`.layout` (the COSMOS release layout), :mod:`.indexer`
(a layout folder to the manifest), :mod:`.catalog` (dataset descriptors, Table 1),
:mod:`.preprocess` (raw datasets to the layout), :mod:`.demo` (cosmos-demo from registry
packages), :mod:`.dataset` (roots, sub-samples and the Fig. 3 statistics). Imports only the
shared top-level modules.
"""
