"""The paper's own numbers, quoted (Huang et al., Medical Image Analysis 2024).

The book prints the paper's numbers beside ours wherever the same object-modality (or model,
strategy, factor) appears. Those numbers are *quoted*, never recomputed: they were transcribed
once from the tab-separated tables of the paper's full text into ``data/paper/<name>.csv``
(long format; ``data/paper/README.md`` says which table or sentence each file quotes and lists
the transcription caveats). This module only reads them back and maps our object/modality
names onto the paper's rows.

Units follow the project conventions: DICE in % (0..100), HD in pixels, times in seconds
(``table4_time``) or as stated by ``time_unit`` (``table7_annotation``).
"""

from __future__ import annotations

import re
import unicodedata

import pandas as pd

from cosmoslib import paths
from cosmoslib.files import InputError

_CITATION = "Huang et al., Medical Image Analysis 2024"
#: The label the book puts on every quoted number (use :func:`note` for one naming the table).
QUOTED_NOTE = f"quoted from {_CITATION}; not recomputed"

#: Which element of the paper each quoted table reproduces.
SOURCES: dict[str, str] = {
    "table2_dice": "Table 2",
    "table3_hd": "Table 3",
    "table4_time": "Table 4",
    "table5_everything_grid": "Table 5",
    "table6_partial_corr": "Table 6",
    "table7_annotation": "Table 7",
    "table8_prompt_shift": "Table 8",
    "fig6_means": "Sections 4.3-4.4 (text on Fig. 6)",
    "sec4_12_finetune": "Sections 4.12 and 5 (text on Figs. 17-18)",
}

_S = "string"
_F = "float64"
_I = "int64"
#: Column -> dtype of each quoted table, in file order. Missing cells read as <NA>/NaN.
SCHEMAS: dict[str, dict[str, str]] = {
    "table2_dice": {"object_modality": _S, "object": _S, "modality": _S,
                    "object_normalized": _S, "model": _S, "strategy": _S, "dice": _F},
    "table3_hd": {"object_modality": _S, "object": _S, "modality": _S,
                  "object_normalized": _S, "model": _S, "strategy": _S, "hd": _F},
    "table4_time": {"model": _S, "stage": _S, "seconds": _F},
    "table5_everything_grid": {"object": _S, "object_modality": _S, "object_name": _S,
                               "modality": _S, "citation": _S, "model": _S, "grid": _I,
                               "dice": _F, "subscript": _F},
    "table6_partial_corr": {"model": _S, "strategy": _S, "factor": _S, "rho": _F, "p": _F,
                            "p_text": _S, "bold": "boolean"},
    "table7_annotation": {"annotator": _S, "condition": _S, "hce": _F, "time": _F,
                          "time_unit": _S},
    "table8_prompt_shift": {"run": _S, "shift": _S, "shift_min_px": _I, "shift_max_px": _I,
                            "strategy": _S, "dice_drop": _F},
    "fig6_means": {"model": _S, "strategy": _S, "metric": _S, "kind": _S, "value": _F,
                   "ref_model": _S, "ref_strategy": _S, "section": _S, "quote": _S},
    "sec4_12_finetune": {"model": _S, "quantity": _S, "value": _F, "unit": _S,
                         "section": _S, "quote": _S},
}


def paper_dir():
    """Folder of the quoted tables: ``<home>/data/paper`` (committed)."""
    return paths.home() / "data" / "paper"


def available() -> list[str]:
    """Names accepted by :func:`quoted`, sorted."""
    return sorted(SCHEMAS)


def note(name: str) -> str:
    """One-line label for numbers from quoted table ``name``, naming the paper element.

    >>> note("table2_dice")
    'quoted from Huang et al., Medical Image Analysis 2024, Table 2; not recomputed'
    """
    _check_name(name)
    return f"quoted from {_CITATION}, {SOURCES[name]}; not recomputed"


def _check_name(name: str) -> None:
    if name not in SCHEMAS:
        raise InputError(
            paper_dir() / f"{name}.csv",
            f"no quoted table named {name!r}; available: {', '.join(available())}",
        )


def quoted(name: str) -> pd.DataFrame:
    """Read one quoted table of the paper.

    Parameters
    ----------
    name : str
        File stem under ``data/paper`` without ``.csv``, one of :func:`available`
        (e.g. ``"table2_dice"``).

    Returns
    -------
    pandas.DataFrame
        Long-format table with the columns of :data:`SCHEMAS` ``[name]`` and their dtypes
        (text as ``string``, numbers as ``float64``/``int64``, flags as nullable ``boolean``).
        Cells the paper does not give are missing (``<NA>``/``NaN``), never zero.
        ``df.attrs`` holds ``source`` (paper element) and ``note`` (see :func:`note`).

    Raises
    ------
    cosmoslib.files.InputError
        Unknown ``name`` (the message lists the available names), missing file, or a file
        whose header differs from the schema or whose cells do not parse.
    """
    _check_name(name)
    path = paper_dir() / f"{name}.csv"
    schema = SCHEMAS[name]
    if not path.is_file():
        raise InputError(path, "quoted table file is missing")
    header = pd.read_csv(path, nrows=0).columns.tolist()
    if header != list(schema):
        raise InputError(path, f"columns {header} differ from the expected {list(schema)}")
    try:
        # keep_default_na=False + na_values=[""]: only empty cells are missing, so text such
        # as "NA" in a quote stays text.
        df = pd.read_csv(path, dtype=schema, keep_default_na=False, na_values=[""])
    except (ValueError, TypeError) as exc:
        raise InputError(path, f"cells do not match the schema: {exc}") from exc
    df.attrs["source"] = SOURCES[name]
    df.attrs["note"] = note(name)
    return df


# --- joining our object/modality names to the paper's rows ----------------------------------

#: Spelling slips of the paper, fixed in normalized names (Tables 2-3 write "Arota").
TYPOS = {"arota": "aorta"}

#: Other names for the same modality (normalized form -> the paper's normalized form).
MODALITY_ALIASES = {
    "ultrasound": "us",
    "computedtomography": "ct",
    "mr": "mri",
    "magneticresonanceimaging": "mri",
    "em": "electronmicroscopy",
}


def normalize_name(name: str) -> str:
    """Comparison key of an object or modality name.

    Unicode NFKC, case-folded, split into alphanumeric words, known typos fixed word by word
    (:data:`TYPOS`), words joined without separators: ``"Gall Bladder"``, ``"gallbladder"`` and
    ``"GALL-BLADDER"`` all give ``"gallbladder"``; ``"Arota"`` gives ``"aorta"``;
    ``"Cine-MRI"`` gives ``"cinemri"``.
    """
    words = re.findall(r"[0-9a-z]+", unicodedata.normalize("NFKC", str(name)).casefold())
    return "".join(TYPOS.get(w, w) for w in words)


def normalize_modality(name: str) -> str:
    """:func:`normalize_name` plus :data:`MODALITY_ALIASES` (e.g. ``"Ultrasound"`` -> ``"us"``)."""
    key = normalize_name(name)
    return MODALITY_ALIASES.get(key, key)


def modality_family(name: str) -> str:
    """Coarse family of a modality: every MR sequence (``"T1W MRI"``, ``"Cine-MRI"``,
    ``"CMR"``, ...) is ``"mri"``; any other modality is its own family."""
    key = normalize_modality(name)
    return "mri" if key.endswith("mri") or key == "cmr" else key


def match_object_modality(ours: pd.DataFrame, table: str = "table2_dice") -> pd.DataFrame:
    """Find the paper's object-modality row for each of our (object, modality) rows.

    Rules, first hit wins (names compared with :func:`normalize_name` /
    :func:`normalize_modality`, so case, spaces, hyphens and the typo "Arota" do not matter):

    1. ``exact``: same object and same modality.
    2. ``paper_generic``: our modality is a specific MR sequence (e.g. ``"T2W MRI"``) and the
       paper has the object under plain ``"MRI"`` (e.g. ``Prostate-MRI``).
    3. ``family_unique``: our modality is plain ``"MRI"`` and the paper has exactly one row of
       the object in the MR family (e.g. ``Left Ventricle`` -> ``Left Ventricle-Cine-MRI``).
       With several candidates (``Brain Tumor`` has four MR sequences) nothing is matched.

    No other synonyms are assumed (e.g. ``"Electron Microscopy"`` is not ``"Microscopy"``):
    a wrong pairing would put the paper's number next to a different object, which is worse
    than showing none.

    Parameters
    ----------
    ours : pandas.DataFrame
        Must have ``object`` and ``modality`` columns; other columns and the index are kept.
        Missing names never match.
    table : str
        Quoted table whose object-modality rows are matched: ``"table2_dice"`` (default) or
        ``"table3_hd"`` (the two have the same 46 rows).

    Returns
    -------
    pandas.DataFrame
        A copy of ``ours`` with ``paper_object_modality``, ``paper_object``,
        ``paper_modality`` (the paper's spelling, for joining with :func:`quoted` tables) and
        ``match_rule`` (``exact`` | ``paper_generic`` | ``family_unique``), all ``<NA>``
        where no row matches.

    Raises
    ------
    cosmoslib.files.InputError
        ``ours`` is not a DataFrame with ``object`` and ``modality`` columns, or ``table``
        has no object-modality rows.
    """
    if not isinstance(ours, pd.DataFrame) or not {"object", "modality"} <= set(ours.columns):
        raise InputError(None, "match_object_modality needs a DataFrame with 'object' and "
                               "'modality' columns")
    paper = quoted(table)
    if "object_modality" not in paper.columns:
        raise InputError(paper_dir() / f"{table}.csv", "has no object-modality rows")
    rows = paper[["object_modality", "object", "modality"]].drop_duplicates()
    rows = rows.assign(obj=rows["object"].map(normalize_name),
                       mod=rows["modality"].map(normalize_modality),
                       fam=rows["modality"].map(modality_family))
    by_exact = {(r.obj, r.mod): r.object_modality for r in rows.itertuples()}
    mr_rows = rows[rows["fam"] == "mri"]
    mr_count = mr_rows.groupby("obj")["object_modality"].agg(list)
    by_unique_mr = {obj: oms[0] for obj, oms in mr_count.items() if len(oms) == 1}

    def lookup(obj_name, mod_name):
        # Three dictionary look-ups per row; a merge per rule would be longer to read.
        if pd.isna(obj_name) or pd.isna(mod_name):
            return pd.NA, pd.NA
        obj, mod, fam = (normalize_name(obj_name), normalize_modality(mod_name),
                         modality_family(mod_name))
        if (obj, mod) in by_exact:
            return by_exact[(obj, mod)], "exact"
        if fam == "mri" and mod != "mri" and (obj, "mri") in by_exact:
            return by_exact[(obj, "mri")], "paper_generic"
        if mod == "mri" and obj in by_unique_mr:
            return by_unique_mr[obj], "family_unique"
        return pd.NA, pd.NA

    found = [lookup(o, m) for o, m in zip(ours["object"], ours["modality"])]
    out = ours.copy()
    key = pd.array([f[0] for f in found], dtype="string")
    info = rows.set_index("object_modality")
    out["paper_object_modality"] = key
    out["paper_object"] = pd.array(
        [pd.NA if pd.isna(k) else info.at[k, "object"] for k in key], dtype="string")
    out["paper_modality"] = pd.array(
        [pd.NA if pd.isna(k) else info.at[k, "modality"] for k in key], dtype="string")
    out["match_rule"] = pd.array([f[1] for f in found], dtype="string")
    return out
