"""safedecode inside outlines: keep your outlines model, add the guard.

outlines (1.x) lets a steerable model run one logits processor per generator, given either as an
output type (outlines then builds its own processor) or as ``outlines.Generator(model,
processor=...)``; the two are exclusive, and its ``transformers`` wrapper passes ``logits_processor``
to ``model.generate`` itself, so a second processor cannot be added through ``inference_kwargs``.
:func:`outlines_generator` therefore hands outlines *one* processor: safedecode's, whose automaton
is the product of the output type (built with the same outlines-core as outlines' own JSON and
regex types) and the policy — the guarantee of both, in one mask::

    import outlines
    from safedecode.integrations.outlines import outlines_generator

    model = outlines.from_transformers(hf_model, hf_tokenizer)
    generate = outlines_generator(model, output_type=City, policy="secrets")
    city = City.model_validate_json(generate(prompt, max_new_tokens=200))

Output types are safedecode's (:mod:`safedecode.channels.output_types`: pydantic models, JSON
schemas, regexes, ``Literal``/``Enum``); outlines' CFG and other types have no safedecode form and
are refused by name. Streaming is unavailable because outlines' ``transformers`` wrapper does not
stream.
"""
from __future__ import annotations

from typing import Any, Optional

from ..adapters.processor import SafeLogitsProcessor
from ..channels.output_types import output_type as as_output_type
from ..extras import require
from ..policy.rules import Policy, load_policy


def outlines_generator(model, output_type: Any = None, policy: Any = None):
    """An ``outlines.Generator`` for ``model`` (an outlines ``Transformers`` model, from
    ``outlines.from_transformers``) whose one logits processor is safedecode's: ``output_type``
    (optional) and ``policy`` (a name, a path, a :class:`~safedecode.Policy`; optional) enforced
    together. At least one of them is required."""
    require("outlines", "outlines", "safedecode.integrations.outlines")
    import outlines

    tokenizer = getattr(model, "hf_tokenizer", None)
    if tokenizer is None:
        raise TypeError(f"outlines_generator: {type(model).__name__} is not an outlines transformers model "
                        f"(outlines.from_transformers(model, tokenizer))")
    if output_type is None and policy is None:
        raise TypeError("outlines_generator: give an output_type, a policy, or both")
    rules: Optional[Policy] = load_policy(policy) if isinstance(policy, (str, Policy)) or hasattr(policy, "__fspath__") \
        else (Policy(**policy) if isinstance(policy, dict) else None)
    if policy is not None and rules is None:
        raise TypeError(f"outlines_generator: policy must be a name, a path, a dict or a safedecode.Policy, "
                        f"got {type(policy).__name__}")
    if output_type is not None:
        rules = as_output_type(output_type).policy(rules)
    return outlines.Generator(model, processor=SafeLogitsProcessor(rules, tokenizer))


__all__ = ["outlines_generator"]
