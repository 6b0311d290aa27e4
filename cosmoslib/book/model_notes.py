"""What each model of a chapter is, in words glued from the registry (never typed in a notebook).

Every number the book shows belongs to a model whose nature matters for reading it: a general
SAM trained with points and boxes on natural images, or a medical model trained with boxes only,
at 256 or 1024 px. :func:`describe` states those facts for one model from its registry entry
(:meth:`cosmoslib.models.registry.ModelEntry.facts`); :func:`models_note` does it for the models
of a config and names any model the config wanted but could not run, with the reason, so a
missing model is never silent.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from cosmoslib.models import mobilesam, registry

_NATURE_WORDS = {"general": "a general-purpose model (natural images)",
                 "medical": "a medical model",
                 "unknown": "a model of unstated training data"}


def describe(name: str) -> str:
    """One Markdown phrase: the model's name, nature, training prompts, input size and origin.

    Parameters
    ----------
    name : a registry name (a finetuned model registered with ``base=`` describes itself
        through its own entry, which inherits the base's facts unless it was given others).

    Returns
    -------
    str, e.g. ``"**mobilesam**: a general-purpose model (natural images), trained with points,
    boxes, masks prompts, 1024 px input; TinyViT-5M encoder distilled from SAM ViT-H ..."``.

    Raises
    ------
    cosmoslib.errors.InputError
        ``name`` is not registered.
    """
    facts = registry.lookup(name).facts()
    prompts = facts["trained_prompts"] or "unstated"
    text = (f"**{name}**: {_NATURE_WORDS[facts['nature']]}, trained with {prompts} as prompts, "
            f"{facts['input_size']} px input")
    if facts["origin"]:
        text += f"; {facts['origin']}"
    if facts["base"] and "finetuned" not in (facts["origin"] or ""):
        text += f" (finetuned from `{facts['base']}`)"
    return text


def models_note(models: Sequence[str], unavailable: Sequence[str] = ()) -> str:
    """The glued paragraph every model chapter opens with.

    Parameters
    ----------
    models : the registry names the chapter ran, in the config's order.
    unavailable : names the config asked for but could not run on this machine (see
        :func:`unavailable_reason`); each is named with the reason and how to add it.

    Returns
    -------
    str (Markdown): one line per model, then one per unavailable model.
    """
    lines = [f"- {describe(name)}." for name in models]
    lines += [f"- **{name}** was *not run*: {unavailable_reason(name)}" for name in unavailable]
    return "Models of this chapter:\n\n" + "\n".join(lines)


def short(name: str) -> str:
    """The model's nature in a few words, for labels beside its numbers.

    Returns
    -------
    str, e.g. ``"general; points, boxes, masks; 1024 px"`` or ``"medical; boxes; 256 px"``.
    """
    facts = registry.lookup(name).facts()
    return f"{facts['nature']}; {facts['trained_prompts'] or 'prompts unstated'}; {facts['input_size']} px"


def per_model(sentences: Mapping[str, str]):
    """A Markdown list with one labelled line per model, to glue with ``{glue:md}``.

    Parameters
    ----------
    sentences : ``{model name: sentence}`` in the order to show; each line starts with the
        model's name and :func:`short` description, so no number appears without what made it.

    Returns
    -------
    IPython.display.Markdown (what ``myst_nb.glue`` needs for the ``glue:md`` directive).

    Raises
    ------
    ValueError
        ``sentences`` is empty: a chapter with no model to describe is a bug upstream.
    """
    # IPython comes with the optional [book] extra: only a notebook kernel needs it.
    from IPython.display import Markdown

    if not sentences:
        raise ValueError("no model to describe")
    return Markdown("\n".join(f"- **{name}** ({short(name)}): {text}" for name, text in sentences.items()))


def points_note(models: Sequence[str], consequence: str) -> str:
    """The warning beside point-prompt numbers of models never trained with points.

    Parameters
    ----------
    models : the chapter's registry names.
    consequence : what that means for this chapter's numbers (one clause, e.g. "its S2-S4 and S1
        measure a prompt type it never learnt").

    Returns
    -------
    str: ``""`` when every model was trained with points, else one sentence naming each
    box-only model (from the registry's ``supports_points``).
    """
    box_only = [n for n in models if not registry.lookup(n).supports_points]
    if not box_only:
        return ""
    names = ", ".join(f"{n}" for n in box_only)
    verb = "was" if len(box_only) == 1 else "were"
    return f"{names} {verb} trained with box prompts only: {consequence}"


def show(config) -> None:
    """Display :func:`models_note` for a run-list config in a notebook (the chapter's first output)."""
    # IPython comes with the optional [book] extra: only a notebook kernel needs it.
    from IPython.display import Markdown, display

    display(Markdown(models_note(config.models, config.unavailable_models)))


def unavailable_reason(name: str) -> str:
    """Why a model the config wanted cannot run here, and how to add it (one sentence)."""
    if registry.lookup(name).arch == "mobilesam":
        return (f"its weights are not on this machine; {mobilesam.how_to_get()}, then rebuild the "
                f"book. Every table and finding below is then about the other models only.")
    return ("its checkpoint was not found (see the models page for where checkpoints go); every "
            "table below is about the other models only.")


__all__ = ["describe", "models_note", "per_model", "points_note", "short", "show", "unavailable_reason"]
