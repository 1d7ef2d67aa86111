"""A Llama-2-style SentencePiece tokenizer with byte fallback, built in-process and deterministic
(no download): the third tokenizer family of the tests, and the CPU stand-in of the GPU checks."""
from __future__ import annotations

# Training corpus of the SentencePiece fixture. Multi-byte characters (é, ü, ñ, ß, Greek, Cyrillic,
# CJK) are frequent enough to be pieces; the rarer ones are cut by `limit_alphabet` and are then
# reachable only through the <0xNN> byte tokens.
SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "Hello world! Hello there. How are you today? I am fine, thank you.",
    "café crème brûlée naïve résumé élève déjà vu — à la carte, s'il vous plaît.",
    "Über größe straße Müller Grüße schön fünf Äpfel Öl.",
    "español niño mañana señor año piñata ¿qué tal? ¡olé!",
    "Καλημέρα κόσμε, ευχαριστώ πολύ. Привет мир, как дела? Спасибо.",
    "日本語のテキスト。東京は大きい都市です。中文文本,你好世界。",
    "Numbers 0123456789 and symbols #$%&*+-=/<>[]{}()@^_`|~ plus tabs\tand\nnewlines.",
    "password secret token key admin root user login account bank card number",
] * 8 + ["rare: ☃ ✓ 🙂 Ω ∑ ∂ € ¥ ₩ ł ő ğ ş ř ž"]


def _train_bpe(corpus, n_merges):
    """A tiny deterministic BPE trainer (the Rust trainer breaks ties by hash order). Words are
    split as Metaspace does ('▁' + word); characters seen fewer than 2 times are left out of the
    alphabet, so they can only be produced through byte fallback."""
    from collections import Counter

    words = Counter()
    for line in corpus:
        for w in ("\u2581" + line.replace(" ", "\u2581")).split("\u2581"):
            words["\u2581" + w] += 1
    chars = Counter()
    for w, n in words.items():
        for c in w:
            chars[c] += n
    alphabet = sorted(c for c, n in chars.items() if n >= 2)
    known = set(alphabet)
    seqs = {w: [c for c in w] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                if a in known and b in known:
                    pairs[a, b] += n
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < 2:
            break
        merges.append((a, b))
        known.add(a + b)
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return alphabet, merges


def build_sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: <unk>,<s>,</s> at ids 0-2, the 256 <0xNN> byte tokens at 3-258,
    then trained BPE pieces; Metaspace pre-tokenizer; decoder Replace('▁',' ') + ByteFallback +
    Fuse + Strip(' ', 1, 0). Deterministic."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    alphabet, merges = _train_bpe(SP_CORPUS, n_merges=300)

    vocab = {s: i for i, s in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in alphabet + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
