"""safedecode inside a real outlines Generator (outlines' transformers wrapper, SmolLM2): the
answer is a valid document of the output type (``jsonschema``) and no forbidden phrase appears in
it or in any decoded string value (``regex`` via find_violations)."""
import json

import jsonschema
import pytest
from pydantic import BaseModel

from safedecode import Policy, find_violations
from safedecode.integrations.outlines import outlines_generator

from tests.support.text_oracle import json_strings

outlines = pytest.importorskip("outlines")


class City(BaseModel):
    name: str
    country: str


FORBID = Policy(forbid=[{"id": "paris", "literal": "Paris", "ignore_case": True}])


def test_an_outlines_generator_runs_the_guard_with_the_output_type(smollm2_model):
    model, tokenizer = smollm2_model
    generate = outlines_generator(outlines.from_transformers(model, tokenizer), output_type=City, policy=FORBID)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Paris, capital of France, as JSON."}],
                                           tokenize=False, add_generation_prompt=True)
    for _ in range(2):  # outlines resets the processor between calls
        text = generate(prompt, max_new_tokens=60)
        value = json.loads(text)
        jsonschema.validate(value, City.model_json_schema())
        assert not any(find_violations(FORBID, s) for s in [text, *json_strings(value)])


def test_a_policy_alone_and_bad_arguments(smollm2_model):
    model, tokenizer = smollm2_model
    wrapped = outlines.from_transformers(model, tokenizer)
    text = outlines_generator(wrapped, policy=FORBID)("The capital of France is", max_new_tokens=12)
    assert not find_violations(FORBID, text)
    with pytest.raises(TypeError, match="output_type, a policy, or both"):
        outlines_generator(wrapped)
    with pytest.raises(TypeError, match="not an outlines transformers model"):
        outlines_generator(model, policy=FORBID)
