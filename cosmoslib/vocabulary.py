"""One modality vocabulary: names, spellings and the fixed integer codes of Table 6.

Every module that reads or writes a modality name goes through here: the indexer
(:mod:`cosmoslib.data`: task json, catalog, task names, ``--modality`` overrides) and the factors
(:mod:`cosmoslib.analysis.factors`: ``modality_code``).

Names
-----
:data:`PAPER_MODALITIES`
    The paper's 18 modalities (Fig. 1 (a)-(r)), spelled as in its tables.
:data:`EXTRA_MODALITIES`
    Other modalities a COSMOS-layout root may carry (PET, OCT, ...): recognised, but outside the
    paper's list, so their codes come after the paper's.
:data:`UNKNOWN`
    ``"unknown"``: a modality nobody could resolve. It is never a vocabulary name.

Matching
--------
:func:`canonical_modality` compares spellings by :func:`modality_key` (Unicode NFKC,
case-folded, every character that is not a letter or digit dropped), so ``"T1W MRI"``,
``"t1w-mri"`` and ``"T1WMRI"`` are one name, then knows the aliases of
:data:`MODALITY_ALIASES` (``"Ultrasound"`` -> US, ``"MR"`` -> MRI, ``"DWI"`` -> DW MRI, ...) and
names of the form ``<alias> MRI`` (``"DWI MRI"``, ``"Cine MRI"``).

Codes
-----
:data:`MODALITY_CODES` gives the paper's 18 modalities the integers 0..17 in case-insensitive
alphabetical order and ``"unknown"`` 18; :data:`EXTRA_MODALITY_CODES` continues with 19.. for
the extra names. Both are literals, so a code never changes when a list is edited.
"""

from __future__ import annotations

import math
import re
import unicodedata

#: The paper's 18 modalities, Fig. 1 (a)..(r).
PAPER_MODALITIES: tuple[str, ...] = (
    "CT", "MRI", "T1W MRI", "T2W MRI", "ADC MRI", "Cine-MRI", "CMR", "DW MRI", "T1-GD MRI",
    "T2-FLAIR MRI", "Histopathology", "Electron Microscopy", "US", "X-ray", "Fundus",
    "Colonoscopy", "Dermoscopy", "Microscopy",
)

#: Recognised modalities that are not in the paper's list.
EXTRA_MODALITIES: tuple[str, ...] = (
    "Endoscopy", "Mammography", "OCT", "PD MRI", "PET", "T1-FLAIR MRI",
)

#: Every name :func:`canonical_modality` can return.
KNOWN_MODALITIES: tuple[str, ...] = PAPER_MODALITIES + EXTRA_MODALITIES

#: The value of a modality that could not be resolved.
UNKNOWN = "unknown"

#: The paper's 18 modalities in case-insensitive alphabetical order, then "unknown".
MODALITY_CODES: dict[str, int] = {
    "ADC MRI": 0,
    "Cine-MRI": 1,
    "CMR": 2,
    "Colonoscopy": 3,
    "CT": 4,
    "Dermoscopy": 5,
    "DW MRI": 6,
    "Electron Microscopy": 7,
    "Fundus": 8,
    "Histopathology": 9,
    "Microscopy": 10,
    "MRI": 11,
    "T1-GD MRI": 12,
    "T1W MRI": 13,
    "T2-FLAIR MRI": 14,
    "T2W MRI": 15,
    "US": 16,
    "X-ray": 17,
    UNKNOWN: 18,
}

#: Codes of :data:`EXTRA_MODALITIES`, after the paper's (alphabetical, from 19).
EXTRA_MODALITY_CODES: dict[str, int] = {
    "Endoscopy": 19,
    "Mammography": 20,
    "OCT": 21,
    "PD MRI": 22,
    "PET": 23,
    "T1-FLAIR MRI": 24,
}

#: Other spellings, as :func:`modality_key` keys -> vocabulary name.
MODALITY_ALIASES: dict[str, str] = {
    "adc": "ADC MRI",
    "cine": "Cine-MRI",
    "cinemr": "Cine-MRI",
    "computedtomography": "CT",
    "cxr": "X-ray",
    "dw": "DW MRI",
    "dwi": "DW MRI",
    "dwmr": "DW MRI",
    "em": "Electron Microscopy",
    "flair": "T2-FLAIR MRI",
    "magneticresonanceimaging": "MRI",
    "mr": "MRI",
    "t1": "T1W MRI",
    "t1gd": "T1-GD MRI",
    "t1w": "T1W MRI",
    "t2": "T2W MRI",
    "t2flair": "T2-FLAIR MRI",
    "t2w": "T2W MRI",
    "ultrasound": "US",
    "xray": "X-ray",
}


def modality_key(text: str) -> str:
    """Comparison key of a name: NFKC, case-folded, letters and digits only.

    >>> modality_key("T2-FLAIR MRI")
    't2flairmri'
    """
    return re.sub(r"[\W_]+", "", unicodedata.normalize("NFKC", str(text)).casefold())


_LOOKUP: dict[str, str] = {modality_key(m): m for m in KNOWN_MODALITIES} | MODALITY_ALIASES


def canonical_modality(text) -> str | None:
    """The vocabulary name of a modality spelling, or None when it is not one.

    Parameters
    ----------
    text : str or None
        Any spelling (``"Ultrasound"``, ``"t1w-mri"``, ``"X ray"``, ``"DWI MRI"``).

    Returns
    -------
    str or None
        A name of :data:`KNOWN_MODALITIES`. None for None, NaN, empty text, ``"unknown"`` and
        anything the vocabulary does not know (the caller decides what that means; nothing
        here guesses).

    >>> canonical_modality("cine mri"), canonical_modality("Ultrasound"), canonical_modality("PETS")
    ('Cine-MRI', 'US', None)
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return None
    key = modality_key(text)
    if not key:
        return None
    name = _LOOKUP.get(key)
    if name is None and key.endswith("mri") and len(key) > 3:
        # "<alias> MRI" ("DWI MRI", "T1 MRI"): the stem must itself be an MR alias.
        stem = _LOOKUP.get(key[: -len("mri")])
        name = stem if stem is not None and stem.endswith("MRI") else None
    return name


def modality_code(text) -> int:
    """The fixed integer code of a modality (:data:`MODALITY_CODES`, :data:`EXTRA_MODALITY_CODES`).

    Anything :func:`canonical_modality` does not know -- None, NaN, ``"unknown"``, a typo --
    is ``MODALITY_CODES["unknown"]`` (18); :func:`cosmoslib.data.indexer.unknown_modalities` names the
    tasks concerned.
    """
    name = canonical_modality(text)
    if name is None:
        return MODALITY_CODES[UNKNOWN]
    return MODALITY_CODES.get(name, EXTRA_MODALITY_CODES.get(name, MODALITY_CODES[UNKNOWN]))
