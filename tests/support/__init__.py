"""What the tests and the benchmarks share: the oracles, the adversary, fixtures and case data.

Tests import only this package (never another test module); benchmarks import it and
``benchmarks/harness.py`` (never a test module, never each other). Each module is one thing:

* :mod:`.text_oracle` — the text contract (DESIGN §1): the text of bytes, ``regex`` on it;
* :mod:`.policy_oracle` — the policy contract: does a text violate a policy (``find_violations``'
  verdict, computed fast enough for adversarial runs);
* :mod:`.channel_oracle` — the channel contract: does an assistant output break a channel rule
  (control tokens, delimiters, leaks, links, tool calls), written without the guard's code;
* :mod:`.adversary` — the adversarial driver, asserted by the tests, counted by the benchmarks;
* :mod:`.vllm_batch` — the stand-in of vLLM's persistent batch and its ``BatchUpdate``;
* :mod:`.sentencepiece_fixture` — the in-process SentencePiece tokenizer with byte fallback;
* :mod:`.grammar_cases` — texts the shipped policies must find, and their near misses;
* :mod:`.injection_corpus` — the injection corpus, its conversations, guards and judged runs;
* :mod:`.redteam_corpus` — the red-team corpus, its policies and judges (payload detector, ROC).
"""
