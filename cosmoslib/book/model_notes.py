"""What each model of a chapter is, in words glued from the registry (never typed in a notebook).

Every number the book shows belongs to a model whose nature matters for reading it: a general
SAM trained with points and boxes on natural images, or a medical model trained with boxes only,
at 256 or 1024 px. :func:`describe` states those facts for one model from its registry entry
(:meth:`cosmoslib.models.registry.ModelEntry.facts`); :func:`models_note` does it for the models
of a config and names any model the config wanted but could not run, with the reason, so a
missing model is never silent.
"""

from __future__ import annotations

from typing import Sequence

from cosmoslib.models import registry

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


def unavailable_reason(name: str) -> str:
    """Why a model the config wanted cannot run here, and how to add it (one sentence)."""
    if registry.lookup(name).arch == "mobilesam":
        from cosmoslib.models import mobilesam

        return (f"its weights are not on this machine; {mobilesam.how_to_get()}, then rebuild the "
                f"book. Every table and finding below is then about the other models only.")
    return ("its checkpoint was not found (see the models page for where checkpoints go); every "
            "table below is about the other models only.")


__all__ = ["describe", "models_note", "unavailable_reason"]
