"""Train / validation / test splits by source, never by slice (paper 4.12, issue 11).

Slices of one volume are not independent: a split that puts neighbouring slices of one scan
on both sides measures memory, not learning. So the unit of the split is the source volume or
file (manifest ``source``); data in the authors' release layout has no source, and there the
images are grouped by the case part of ids shaped ``<task>_<case>_<slice>``, else each image is
its own group. :func:`split_manifest` says which rule it used; a task with a single group goes
wholly to one part and the split records it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cosmoslib.files import (
    InputError,
    atomic_write_csv,
)
from cosmoslib.protocol import prompts

__all__ = ["PARTS", "DEFAULT_FRACTIONS", "Split", "group_keys", "split_manifest"]

_KEY = ["task", "image_id", "label_value"]
#: File name of a saved split in a finetuning run folder.
SPLIT_FILE = "split.csv"
#: The parts of a split, in order.
PARTS = ("train", "val", "test")
#: Default target shares of objects in train / val / test.
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def _check_fractions(fractions) -> tuple[float, float, float]:
    fr = tuple(float(v) for v in fractions)
    if len(fr) != 3 or any(v < 0 or not math.isfinite(v) for v in fr) or fr[0] <= 0:
        raise InputError(None, f"fractions must be three non-negative shares (train > 0) for "
                               f"train/val/test, got {fractions!r}")
    total = sum(fr)
    return tuple(v / total for v in fr)


# ----------------------------------------------------------------------------- the split


def _case_of(task: str, image_id: str) -> str | None:
    """The case part of an id shaped ``<task>_<case>_<slice>[_<more digits>]``, else None."""
    task, image_id = str(task), str(image_id)
    if not image_id.startswith(task + "_"):
        return None
    parts = image_id[len(task) + 1:].split("_")
    if len(parts) >= 2 and parts[0] and all(p.isdigit() for p in parts[1:]):
        return parts[0]
    return None


def group_keys(manifest: pd.DataFrame) -> pd.DataFrame:
    """The split group of every manifest row, and the rule that gave it.

    Rules, first that applies: ``source`` -- the row's source volume or file (``source``
    column, shared across tasks: two label sets of one volume are one group); ``case`` -- the
    case part of an image id shaped ``<task>_<case>_<slice>`` (the authors' release naming;
    the slice part and any further parts are digits); ``image`` -- the image alone.

    Returns
    -------
    DataFrame
        ``group`` and ``rule`` columns, aligned with ``manifest``'s index.
    """
    groups, rules = [], []
    has_source = "source" in manifest
    for row in manifest.itertuples(index=False):
        source = getattr(row, "source", None) if has_source else None
        if isinstance(source, str) and source.strip():
            groups.append(f"source:{source.strip()}")
            rules.append("source")
            continue
        case = _case_of(row.task, row.image_id)
        if case is not None:
            groups.append(f"case:{row.task}:{case}")
            rules.append("case")
        else:
            groups.append(f"image:{row.task}:{row.image_id}")
            rules.append("image")
    return pd.DataFrame({"group": groups, "rule": rules}, index=manifest.index)


_RULE_TEXT = {"source": "source volume or file (manifest `source`)",
              "case": "case part of ids shaped <task>_<case>_<slice>",
              "image": "each image whole (no source, ids not shaped <task>_<case>_<slice>)"}


@dataclass
class Split:
    """A train / val / test split of images by group (see :func:`split_manifest`).

    Attributes
    ----------
    images : DataFrame
        One row per image: ``task, image_id, group, rule, stratum, part``, sorted by task and
        image_id.
    strata : DataFrame
        One row per stratum: ``stratum, tasks, n_groups, n_images, n_objects, assignment``
        (how its groups were placed, in words).
    fractions : (train, val, test)
        The normalised target shares.
    seed : int
    """

    images: pd.DataFrame
    strata: pd.DataFrame
    fractions: tuple[float, float, float]
    seed: int

    @property
    def rule(self) -> str:
        """Which grouping rule(s) the split used, in words with group counts."""
        counts = self.images.drop_duplicates("group")["rule"].value_counts()
        return "; ".join(f"{_RULE_TEXT[r]}: {int(counts[r])} groups" for r in ("source", "case", "image")
                         if r in counts)

    def rows(self, manifest: pd.DataFrame, part: str) -> pd.DataFrame:
        """The rows of ``manifest`` whose image is in ``part`` (manifest order, index reset)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        keys = self.images.loc[self.images["part"] == part, ["task", "image_id"]]
        return manifest.merge(keys, on=["task", "image_id"]).reset_index(drop=True)

    def counts(self, manifest: pd.DataFrame | None = None) -> pd.DataFrame:
        """Groups, images (and objects when ``manifest`` is given) per part."""
        out = (self.images.groupby("part").agg(groups=("group", "nunique"), images=("image_id", "size"))
               .reindex(list(PARTS), fill_value=0))
        if manifest is not None:
            out["objects"] = [len(self.rows(manifest, p)) for p in PARTS]
        return out

    def digest(self) -> str:
        """32 hex digits over every image's (task, image_id, group, part)."""
        text = self.images[["task", "image_id", "group", "part"]].to_csv(index=False)
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def summary(self) -> dict[str, Any]:
        """What the provenance records about the split."""
        return {"rule": self.rule, "fractions": list(self.fractions), "seed": int(self.seed),
                "digest": self.digest(), "file": SPLIT_FILE,
                "counts": {p: {k: int(v) for k, v in row.items()}
                           for p, row in self.counts().to_dict("index").items()},
                "strata": self.strata.to_dict("records")}

    def save(self, path: str | os.PathLike) -> Path:
        """Write :attr:`images` as CSV, atomically."""
        return atomic_write_csv(self.images, path)


def _strata(image_groups: pd.DataFrame) -> dict[str, list[str]]:
    """Connected components of the task-group graph: ``{stratum name: sorted groups}``."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for task, group in image_groups[["task", "group"]].drop_duplicates().itertuples(index=False):
        a, b = find("t:" + str(task)), find("g:" + str(group))
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[str, list[str]] = {}
    for node in list(parent):
        members.setdefault(find(node), []).append(node)
    out = {}
    for nodes in members.values():
        tasks = sorted(n[2:] for n in nodes if n.startswith("t:"))
        out["+".join(tasks)] = sorted(n[2:] for n in nodes if n.startswith("g:"))
    return dict(sorted(out.items()))


def split_manifest(manifest: pd.DataFrame, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   seed: int = 0) -> Split:
    """Split the images of ``manifest`` into train / val / test by group, never by slice.

    Parameters
    ----------
    manifest : DataFrame
        One row per object (``task, image_id, label_value``; ``source`` when known).
    fractions : (train, val, test)
        Target shares of objects (normalised to sum 1; val or test may be 0).
    seed : int
        Seed of the group order inside each stratum.

    Returns
    -------
    Split

    Notes
    -----
    Groups come from :func:`group_keys`; a stratum is a connected set of tasks and groups (a
    task with all its groups; tasks sharing a group join). In each stratum, groups are put in
    a seeded random order, then: with ``k >= 3`` groups each part with a non-zero share gets at
    least one group and about ``k x share`` groups (train takes the rest); with ``k = 2`` one
    goes to train and one to test (to val when test's share is 0); a stratum with one group
    goes whole to one part: strata of one group are placed last, largest first, each into the
    part furthest below its target number of objects. The ``assignment`` column of
    :attr:`Split.strata` says which case applied.
    """
    fr = _check_fractions(fractions)
    if len(manifest) == 0:
        raise InputError(None, "cannot split an empty manifest")
    keyed = pd.concat([manifest[["task", "image_id"]].reset_index(drop=True),
                       group_keys(manifest).reset_index(drop=True)], axis=1)
    if keyed.groupby(["task", "image_id"])["group"].nunique().max() > 1:
        raise InputError(None, "an image's rows name different source volumes; fix the manifest")
    images = keyed.drop_duplicates(["task", "image_id"]).sort_values(["task", "image_id"]).reset_index(drop=True)
    n_obj_group = keyed.groupby("group").size()
    strata = _strata(images)
    total = float(len(keyed))
    target = {p: f * total for p, f in zip(PARTS, fr)}
    have = {p: 0.0 for p in PARTS}
    part_of: dict[str, str] = {}
    notes: dict[str, str] = {}
    singles = []
    for name, groups in strata.items():
        k = len(groups)
        if k == 1:
            singles.append(name)
            continue
        rng = prompts.object_rng(int(seed), "finetune-split", name, 0)
        order = [groups[i] for i in rng.permutation(k)]
        if k == 2:
            second = "test" if fr[2] > 0 else ("val" if fr[1] > 0 else "train")
            alloc = ["train", second]
            notes[name] = f"2 groups: one to train, one to {second}"
        else:
            n_val = max(1, round(k * fr[1])) if fr[1] > 0 else 0
            n_test = max(1, round(k * fr[2])) if fr[2] > 0 else 0
            while k - n_val - n_test < 1:  # train keeps at least one group
                if n_test > 1 and n_test >= n_val:
                    n_test -= 1
                elif n_val > 1:
                    n_val -= 1
                else:  # k >= 3 and one group each for val and test: train has k - 2 >= 1
                    break
            alloc = ["val"] * n_val + ["test"] * n_test
            alloc = ["train"] * (k - len(alloc)) + alloc
            notes[name] = f"{k} groups: {alloc.count('train')} train, {n_val} val, {n_test} test"
        for g, p in zip(order, alloc):
            part_of[g] = p
            have[p] += float(n_obj_group[g])
    singles.sort(key=lambda s: (-int(n_obj_group[strata[s][0]]), s))
    for name in singles:
        g = strata[name][0]
        open_parts = [p for p, f in zip(PARTS, fr) if f > 0]
        p = max(open_parts, key=lambda q: (target[q] - have[q], -PARTS.index(q)))
        part_of[g] = p
        have[p] += float(n_obj_group[g])
        notes[name] = f"single group: whole stratum to {p}"
    images["stratum"] = images["group"].map({g: s for s, gs in strata.items() for g in gs})
    images["part"] = images["group"].map(part_of)
    rows = []
    for name, groups in strata.items():
        mine = images[images["stratum"] == name]
        rows.append(dict(stratum=name, tasks=name.replace("+", ", "), n_groups=len(groups),
                         n_images=int(len(mine)), n_objects=int(n_obj_group[groups].sum()),
                         assignment=notes[name]))
    return Split(images=images[["task", "image_id", "group", "rule", "stratum", "part"]],
                 strata=pd.DataFrame(rows), fractions=fr, seed=int(seed))


