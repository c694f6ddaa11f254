"""PII scrubber: replaces personal data and secrets in chat text with typed placeholders.

Pure, deterministic, no I/O. Runs on every event, so one pass over each text finds which
detectors' cues (strings or words every match of theirs holds) it has, and only those run;
validated matches (Luhn, mod-97, octet ranges, SSN area/group/serial, real calendar dates,
digit counts) keep precision up. An optional second pass (`SecondPass`, e.g. an NER model)
can run after the built-in detectors; it is off by default. See docs/privacy.md for what is
caught and what is missed.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import ahocorasick


class PiiType(StrEnum):
    URL_SECRET = "URL_SECRET"
    SECRET = "SECRET"
    EMAIL = "EMAIL"
    IBAN = "IBAN"
    CARD = "CARD"
    IP = "IP"
    PHONE = "PHONE"
    PERSON = "PERSON"
    ADDRESS = "ADDRESS"
    SSN = "SSN"
    DATE_OF_BIRTH = "DATE_OF_BIRTH"
    PASSPORT = "PASSPORT"
    HANDLE = "HANDLE"

    @property
    def placeholder(self) -> str:
        return f"<{self.value}>"


@dataclass(frozen=True)
class ScrubResult:
    text: str
    counts: Mapping[PiiType, int]
    """Replacements per type; types with no replacement are absent."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class MessagesScrubResult:
    messages: list[dict[str, Any]]
    counts: Mapping[PiiType, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


Replacement = Callable[[re.Match[str]], str | None]


def _substitute(pattern: re.Pattern[str], text: str, replacement: Replacement) -> tuple[str, int]:
    """re.sub where the callback may decline a match (returns None) after validating it."""
    if pattern.search(text) is None:  # the common case: skip building the callback
        return text, 0
    count = 0

    def substitute(match: re.Match[str]) -> str:
        nonlocal count
        new = replacement(match)
        if new is None:
            return match.group()
        count += 1
        return new

    return pattern.sub(substitute, text), count


def _replace_group(match: re.Match[str], group: str, placeholder: str) -> str:
    """Rebuild the match with only `group` replaced, keeping its context (key names, titles...)."""
    whole = match.group()
    start = match.start(group) - match.start()
    end = match.end(group) - match.start()
    return whole[:start] + placeholder + whole[end:]


def _replace_spans(text: str, spans: Iterable[tuple[int, int]], placeholder: str) -> tuple[str, int]:
    """Replace non-overlapping spans (the first of overlapping ones wins) with `placeholder`."""
    pieces = []
    previous = 0
    count = 0
    for start, end in sorted(spans, key=lambda span: (span[0], -span[1])):
        if start < previous:
            continue
        pieces.append(text[previous:start])
        pieces.append(placeholder)
        previous = end
        count += 1
    pieces.append(text[previous:])
    return "".join(pieces), count


def _matches_at_words(pattern: re.Pattern[str], text: str, roots: tuple[str, ...]) -> list[re.Match[str]]:
    """Matches of `pattern` tried only where one of the lowercase `roots` starts a word.

    For patterns that start with a keyword: a case-blind search with a dozen branches tests
    each position of the text and costs several microseconds, a str.find per root a fraction.
    """
    lower = _lower(text)
    matches = []
    for root in roots:
        position = lower.find(root)
        while position >= 0:
            if position == 0 or not (lower[position - 1].isalnum() or lower[position - 1] == "_"):
                match = pattern.match(text, position)
                if match:
                    matches.append(match)
            position = lower.find(root, position + 1)
    return matches


def _longest_valid_prefix(candidate: str, is_valid: Callable[[str], bool]) -> int | None:
    """Length of the longest prefix, cut at a group separator, that validates.

    Separated number groups are matched greedily and may swallow a trailing CVV, date or
    sort code; retrying shorter prefixes keeps the real number from leaking.
    """
    cuts = [m.start() for m in re.finditer(r"[ -]", candidate)] + [len(candidate)]
    for cut in reversed(cuts):
        if is_valid(candidate[:cut]):
            return cut
    return None


# --- pre-checks ------------------------------------------------------------------------------
# The numeric detectors' pre-checks are substring tests on the text's *shape*: every decimal
# digit (what \d matches) as "9", every ASCII letter as "a", the rest as it is. One translation
# per text replaces a regex scan per detector, each costlier than the whole translation.

_ASCII_SHAPE = bytes.maketrans(b"0123456789" + string.ascii_letters.encode(), b"9" * 10 + b"a" * 52)
_DIGIT = re.compile(r"\d")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_View = TypeVar("_View")


def _of_last_text(view: Callable[[str], _View]) -> Callable[[str], _View]:
    """`view` remembering its last text and result: the cue scan and the detectors of one
    scrub() look at the same text in turn. (An lru_cache miss costs ~0.45 us, more than most
    views; one (text, result) pair swapped whole is safe across threads.)"""
    last: tuple[str | None, Any] = (None, None)

    def remembered(text: str) -> _View:
        nonlocal last
        seen, result = last
        if seen is text:
            return result
        result = view(text)
        last = (text, result)
        return result

    return remembered


@_of_last_text
def _shape(text: str) -> str:
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_SHAPE).decode("ascii")
    return _ASCII_LETTER.sub("a", _DIGIT.sub("9", text))


# The case-keeping shape: digits as "9", ASCII capitals as "A", ASCII lowercase as "a", any
# other character as "?" (one per character, so positions match the text's).
_CASE_SHAPE = bytes.maketrans(
    b"0123456789" + string.ascii_uppercase.encode() + string.ascii_lowercase.encode(),
    b"9" * 10 + b"A" * 26 + b"a" * 26,
)


@_of_last_text
def _case_shape(text: str) -> str:
    return text.encode("ascii", "replace").translate(_CASE_SHAPE).decode("ascii")


@_of_last_text  # several context detectors test keywords in the lowercased text
def _lower(text: str) -> str:
    return text.lower()


@_of_last_text
def _words(text: str) -> list[str]:
    """The lowercased text's whitespace-separated words (punctuation attached), for set tests
    such as KEYWORDS.isdisjoint(_words(text)). Shared by the detectors: do not modify."""
    return _lower(text).split()


_LETTER_RUN = re.compile(r"[a-z]+")


def _window_words(text: str, start: int, end: int) -> set[str]:
    """The lowercase letter runs of text[start:end]: context words, for a set test."""
    return set(_LETTER_RUN.findall(text[max(0, start) : end].lower()))


def _has_any(text: str, pieces: tuple[str, ...]) -> bool:
    for piece in pieces:  # a plain loop: any() over a generator costs more than the tests
        if piece in text:
            return True
    return False


@dataclass(frozen=True)
class _Cue:
    """What every match of a detector holds, one of: a substring of the text as written
    (`text`), of the lowercased text (`lower`), of its shape (`shape`, see _shape), or a word of
    the lowercased text (`words`, punctuation attached, as _words splits it); `digit`: and a
    digit. A text with none is skipped by that detector (_CueScan). Detectors with several
    patterns test the same constants again to pick which of them to run."""

    text: tuple[str, ...] = ()
    lower: tuple[str, ...] = ()
    shape: tuple[str, ...] = ()
    words: frozenset[str] = frozenset()
    digit: bool = False


class _CueScan:
    """Which detectors' cues a text holds, found in one pass: an Aho-Corasick automaton over
    the text, its lowercased form and its shape joined, plus one set intersection of its words.

    Thirteen detectors each testing their own pre-checks cost ~1 us apiece per text, most of
    them finding nothing; a regular expression alternating the ~150 cue strings costs ~10 us
    (re tries each alternative at each position); the automaton ~1 us.
    """

    def __init__(self, cues: Sequence[_Cue]) -> None:
        self.automaton = ahocorasick.Automaton()
        self.words: dict[str, int] = {}
        self.digits = 0
        for index, cue in enumerate(cues):
            bit = 1 << index
            for piece in (*cue.text, *cue.lower, *cue.shape):
                self.automaton.add_word(piece, self.automaton.get(piece, 0) | bit)
            for word in cue.words:
                self.words[word] = self.words.get(word, 0) | bit
            if cue.digit:
                self.digits |= bit
        self.automaton.make_automaton()
        self.cue_words = frozenset(self.words)  # dict.keys() & words would copy every key

    def __call__(self, text: str) -> int:
        """A bit per cue (by index) that `text` holds."""
        shape = _shape(text)
        lower = _lower(text)
        found = 0
        # A piece found across a "\0" seam is a false cue: the detector runs and finds nothing.
        scanned = f"{text}\0{shape}" if lower == text else f"{text}\0{lower}\0{shape}"
        for _, bits in self.automaton.iter(scanned):
            found |= bits
        words = _words(text)
        if not self.cue_words.isdisjoint(words):  # no set built for the many texts without one
            for word in self.cue_words.intersection(words):
                found |= self.words[word]
        if "9" not in shape:
            found &= ~self.digits
        return found


# --- secrets -----------------------------------------------------------------------------

_PRIVATE_KEY_BLOCK = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----.*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",  # a pasted key may be cut off
    re.S,
)

_SECRET_TOKEN = re.compile(
    r"""(?<![\w-])(?:
        sk-(?=[\w-]*\d)[A-Za-z0-9_-]{20,}                 # OpenAI / Anthropic (sk-proj-, sk-ant-)
      | gh[pousr]_[A-Za-z0-9]{30,}                        # GitHub tokens
      | github_pat_[A-Za-z0-9_]{40,}
      | glpat-[A-Za-z0-9_-]{20,}                          # GitLab
      | (?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}               # AWS access key ids
      | xox[abposr]-[A-Za-z0-9-]{10,}                     # Slack
      | AIza[0-9A-Za-z_-]{35}                             # Google API keys
      | [rsp]k_(?:live|test)_[A-Za-z0-9]{16,}             # Stripe
      | eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}   # JWT
    )(?![\w-])""",
    re.X,
)

_AUTH_HEADER = re.compile(
    r"\b(?:[Bb]earer|[Aa]uthorization:\s*[Bb]asic)\s+(?P<secret>[A-Za-z0-9._~+/-]{16,}=*)"
)

_SECRET_ASSIGNMENT = re.compile(
    r"""(?<![\w.-])[\w.-]*?(?:(?P<password>passw(?:or)?d|passphrase|pwd)|secret|token|key|credential)
        [\w.-]*?["']?\s*(?::=|[:=])\s*["']?
        (?P<secret>[^\s"'`,;]{4,})""",
    re.I | re.X,
)

# Literal pieces one of which every _SECRET_TOKEN match contains: one cheap scan rules out
# most texts before the expensive pattern runs.
_SECRET_TOKEN_HINTS = (
    "sk-", *(f"gh{c}_" for c in "pousr"), "github_pat_", "glpat-", "AKIA", "ASIA", "ABIA", "ACCA",
    *(f"xox{c}-" for c in "abposr"), "AIza", "k_live_", "k_test_", "eyJ",
)  # fmt: skip
_SECRET_TOKEN_HINT = re.compile("|".join(map(re.escape, _SECRET_TOKEN_HINTS)))
_PRIVATE_KEY_HINT = "PRIVATE KEY-----"
_AUTH_HEADER_HINTS = ("earer", "uthorization:")

# Substrings every key name in _SECRET_ASSIGNMENT contains; checking them is far cheaper than
# the case-insensitive scan.
_SECRET_KEY_HINTS = ("pass", "pwd", "secret", "token", "key", "credential")

# Values that refer to a secret instead of being one; anything else after a password key is
# taken as the password itself (so Pa$$w0rd or 100%sure are scrubbed).
_CODE_VALUE = re.compile(
    r"""^\$[{(\w]                  # $VAR, ${VAR}, $(command)
      | ^\{                        # {var}, {{ template }}
      | ^%[(\w]                    # %(name)s, %s
      | ^<[\w-]*>?$                # <your-password>
      | ^[A-Za-z_][\w.]*[(\[]       # a call or lookup: getpass(), os.environ[
      | ^[A-Za-z_]\w*(?:\.\w+)+$    # attribute access: config.password
      | ^[*x•.]+$                  # already masked""",
    re.X,
)
_NOT_A_VALUE = frozenset(
    "null none nil true false undefined required optional string str bytes int any "
    "self this env secret password token".split()
)


def _looks_like_code(value: str) -> bool:
    return value.lower() in _NOT_A_VALUE or _CODE_VALUE.search(value) is not None


def _looks_random(value: str) -> bool:
    """Token-like: long, and mixes character classes the way generated keys do."""
    has_digit = any(c.isdigit() for c in value)
    has_alpha = any(c.isalpha() for c in value)
    mixed_case = any(c.islower() for c in value) and any(c.isupper() for c in value)
    return (len(value) >= 12 and has_digit and has_alpha) or (len(value) >= 24 and mixed_case)


def _secret_assignment(match: re.Match[str]) -> str | None:
    value = match.group("secret")
    if _looks_like_code(value):
        return None
    # Any password value is a secret; for keys/tokens require a generated-looking value,
    # since max_tokens=512 or token: string are not secrets.
    if match.group("password") or _looks_random(value):
        return _replace_group(match, "secret", PiiType.SECRET.placeholder)
    return None


def _auth_header(match: re.Match[str]) -> str | None:
    # "Bearer authentication" in prose is not a credential; real tokens look generated.
    if _looks_random(match.group("secret")):
        return _replace_group(match, "secret", PiiType.SECRET.placeholder)
    return None


# Passwords, PINs and door codes stated in prose: "my password is hunter2", "the pin is 4821",
# "I changed my password to X". The key says what follows; the value is checked because
# "the password is wrong" and "the pin is 4 digits" are everyday sentences. The pattern is
# matched where a key word starts (found by str.find), not searched for: a case-blind search
# with this many branches costs several microseconds per text.
_SECRET_PROSE = re.compile(
    r"""(?:
        (?P<password>password|passwd|passphrase|pass\s+word|pwd|pw)
      | (?P<code>pin(?:\s+(?:code|number|no\.?))?|passcode|pass\s+code|code|combination)
    )
    (?:\s+(?:for|to|of|on)\s+(?:(?:the|my|our|your|this|his|her|their)\s+)?[\w.-]+(?:\s+[\w.-]+)?)?
    (?:\s+(?P<to>to)|\s+(?:is|was|will\s+be|is\s+now|=)|\s*[:=]|['’]s)\s+
    (?P<secret>["'`‘“][^"'`’”\n]{1,64}["'`’”]|[^\s"'`]+)""",
    re.I | re.X,
)
_PROSE_ROOTS = ("pass", "pw", "pin", "code", "combination")
# "code" alone is everywhere; a door code is a secret.
_CODE_QUALIFIERS = frozenset(
    "door gate alarm lock unlock entry garage safe access security building lockbox box keybox".split()
)
# "changed my password to X": "to" introduces the value only after one of these.
_SETTING_VERBS = frozenset("changed changing change set setting reset updated update".split())
# Words one of which every _SECRET_PROSE match holds: one set test per text rules most out.
_PROSE_KEYWORDS = frozenset(
    f"{word}{end}"
    for word in ("password", "passwd", "passphrase", "pass", "pwd", "pw", "pin", "passcode", "code", "combination")
    for end in ("", ":", "'s", "’s")
)
_PROSE_TRAILING = ".,;:?)]}"
# Words after "the password is" that describe it instead of being it.
_NOT_PASSWORDS = frozenset(
    """
    wrong incorrect correct right invalid valid expired required optional needed mandatory too not
    no very really quite weak strong long short same different similar identical saved stored hashed
    encrypted empty blank missing set changed reset forgotten lost visible hidden shown secure
    insecure safe unsafe compromised leaked unknown stuck also still now it this that there here
    mine yours his hers ours theirs ok okay fine good bad great private secret protected simple easy
    hard complicated complex default temporary new old current case sensitive null none nothing
    something anything everything weird strange obvious the a an my your our their in on at for of
    to from with by as if so but and or just only always never usually probably definitely what
    which who where when how why ready done working broken disabled enabled locked unlocked taken
    available
    """.split()
)
_DESCRIPTIVE_SUFFIXES = ("ed", "ing", "ly", "ive", "ous", "able", "ible", "ful", "less", "ent", "ant", "ary", "ory")
_UNIT_AFTER_NUMBER = re.compile(
    r"\s*(?:characters?|chars?|letters?|digits?|symbols?|numbers?|words?|long|minimum|min|max|maximum"
    r"|days?|weeks?|months?|years?|hours?|minutes?|seconds?|times?|percent|%|or\s+more|\+)",
    re.I,
)
_CLAUSE_END = re.compile(r"\s*(?:$|[.,;!?)\n]|\s(?:and|but|so|or|btw|lol|if|please|pls|now)\b)", re.I)


def _is_password_value(value: str, text: str, end: int) -> bool:
    if len(value) < 3 or _looks_like_code(value):
        return False
    if any(c.isdigit() for c in value):
        return _UNIT_AFTER_NUMBER.match(text, end) is None  # "is 8 characters", "was 90 days"
    if not value.replace("-", "").replace("'", "").isalpha():
        return True  # symbols: Pa$$word, p@ss
    inner = value[1:]
    if any(c.isupper() for c in inner) and any(c.islower() for c in inner):
        return True  # BlueHorse, correctHorse
    lower = value.lower()
    if lower in _NOT_PASSWORDS or "-" in value or (len(value) >= 6 and lower.endswith(_DESCRIPTIVE_SUFFIXES)):
        return False
    # A bare word is only a password where the clause ends with it: "my password is sunshine."
    return _CLAUSE_END.match(text, end) is not None


def _is_code_value(value: str, text: str, end: int) -> bool:
    digits = _digit_count(value)
    return (
        3 <= digits <= 12
        and value[0].isdigit()
        and all(c.isdigit() or c in "#*-" for c in value)
        and _UNIT_AFTER_NUMBER.match(text, end) is None
    )


def _secret_in_prose(match: re.Match[str]) -> tuple[int, int] | None:
    """The span of the secret value, or None where the words say it is no secret."""
    text = match.string
    value = match.group("secret")
    start, end = match.start("secret"), match.end("secret")
    before = text[max(0, match.start() - 40) : match.start()].lower().split()
    key = (match.group("code") or "").lower()
    if key == "code" and not (before and before[-1] in _CODE_QUALIFIERS):
        return None
    if match.group("to") and _SETTING_VERBS.isdisjoint(before[-4:]):
        return None
    quoted = value[0] in "\"'`‘“"
    if quoted:
        if len(value) < 4:
            return None
        start, end, value = start + 1, end - 1, value[1:-1]
    else:
        stripped = value.rstrip(_PROSE_TRAILING)
        end -= len(value) - len(stripped)
        value = stripped
    if not value or value.startswith("<"):  # empty, or a placeholder already
        return None
    if match.group("code"):
        if not _is_code_value(value, text, end):
            return None
    elif quoted:  # a quoted value is the password as typed, whatever word it is
        if _looks_like_code(value):
            return None
    elif not _is_password_value(value, text, end):
        return None
    return start, end


def _secrets_in_prose(text: str) -> list[tuple[int, int]]:
    return [span for m in _matches_at_words(_SECRET_PROSE, text, _PROSE_ROOTS) if (span := _secret_in_prose(m))]


def _scrub_secrets(text: str) -> tuple[str, int]:
    total = 0
    if _PRIVATE_KEY_HINT in text:
        text, count = _PRIVATE_KEY_BLOCK.subn(PiiType.SECRET.placeholder, text)
        total += count
    if _SECRET_TOKEN_HINT.search(text):
        text, count = _SECRET_TOKEN.subn(PiiType.SECRET.placeholder, text)
        total += count
    if _has_any(text, _AUTH_HEADER_HINTS):
        text, count = _substitute(_AUTH_HEADER, text, _auth_header)
        total += count
    lower = _lower(text)
    if ("=" in text or ":" in text) and _has_any(lower, _SECRET_KEY_HINTS):
        text, count = _substitute(_SECRET_ASSIGNMENT, text, _secret_assignment)
        total += count
    if not _PROSE_KEYWORDS.isdisjoint(_words(text)):
        spans = _secrets_in_prose(text)
        if spans:
            text, count = _replace_spans(text, spans, PiiType.SECRET.placeholder)
            total += count
    return text, total


# --- URLs carrying credentials or tokens ----------------------------------------------------

_URL = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]{1,15}://|www\.)[^\s<>\"'`]+")
_URL_USER_PASSWORD = re.compile(r"^[^/?#]*://[^/?#@\s]*:[^/?#@\s]*@")
_URL_SECRET_PARAM = re.compile(
    r"""[?&#;](?:
        (?:[\w-]*[_-])?(?:token|secret|signature|sig|password|passwd|pwd|credential)
      | key|apikey|api[_-]?key|access[_-]?key|auth|session|sessionid|sid|jwt|pass
    )=[^&#\s]""",
    re.I | re.X,
)
_URL_TRAILING_PUNCTUATION = ".,;:!?'\""
# Webhook and bot URLs carry their secret in the path: whoever has the URL can post as the app.
_WEBHOOK_URL = re.compile(
    r"""^(?:[a-z][a-z0-9+.-]*://)?(?:www\.)?(?:
        hooks\.slack\.com/(?:services|workflows|triggers)/
      | (?:[\w-]+\.)*discord(?:app)?\.com/api/(?:v\d+/)?webhooks/\d
      | [\w-]+\.webhook\.office\.com/
      | outlook\.office(?:365)?\.com/webhook/
      | hooks\.zapier\.com/hooks/
      | api\.telegram\.org/(?:file/)?bot\d+:
      | maker\.ifttt\.com/(?:trigger/[^/]+/with/)?key/
    )""",
    re.I | re.X,
)
# Any other host: a path segment after /webhook(s)/ or /hooks/ that looks generated.
_WEBHOOK_PATH_SEGMENTS = re.compile(r"(?i)/(?:webhooks?|hooks?)/((?:[^/?#\s]+/)*[^/?#\s]*)")
# Without a scheme or www.: host.tld/path, only looked at when a secret parameter or a webhook
# is possible (the pre-check in _scrub_url_secrets).
_BARE_URL = re.compile(
    r"(?<![\w@.:/%-])(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}(?::\d{2,5})?/[^\s<>\"'`]*",
    re.I,
)


def _is_webhook(url: str) -> bool:
    if "hook" not in url.lower() and "/bot" not in url and "ifttt" not in url:
        return False
    if _WEBHOOK_URL.search(url):
        return True
    match = _WEBHOOK_PATH_SEGMENTS.search(url)
    return match is not None and any(_looks_random(part) for part in match.group(1).split("/"))


def _url_secret(match: re.Match[str]) -> str | None:
    url = match.group()
    # Sentence punctuation and an unbalanced closing bracket belong to the prose, not the URL.
    tail_start = len(url)
    while tail_start:
        char = url[tail_start - 1]
        if char in _URL_TRAILING_PUNCTUATION:
            tail_start -= 1
        elif char in ")]}" and url.count(char) > url.count({")": "(", "]": "[", "}": "{"}[char]):
            tail_start -= 1
        else:
            break
    url, tail = url[:tail_start], url[tail_start:]
    if _URL_USER_PASSWORD.search(url) or _URL_SECRET_PARAM.search(url) or _is_webhook(url):
        return PiiType.URL_SECRET.placeholder + tail
    return None


# "ww." also finds "Www." (phones capitalize a message's first word), "WW." finds "WWW.";
# plain substring tests, as a case-blind regex search here costs several times more.
_URL_HINTS = ("://", "ww.", "WW.")


def _scrub_url_secrets(text: str) -> tuple[str, int]:
    total = 0
    if _has_any(text, _URL_HINTS):
        text, total = _substitute(_URL, text, _url_secret)
    # Scheme-less URLs ("hooks.slack.com/services/...", "example.com/reset?token=..."): a secret
    # parameter needs "=" after one of ?&#;, a webhook its word.
    if "/" in text and "." in text and (
        ("=" in text and ("?" in text or "&" in text or "#" in text or ";" in text))
        or "hook" in _lower(text)
        or "/bot" in text
    ):
        text, count = _substitute(_BARE_URL, text, _url_secret)
        total += count
    return text, total


# --- email -----------------------------------------------------------------------------------

# The lookbehind anchors the local part at a token start, keeping the scan linear.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[\w-]+\.)+[^\W\d_]{2,}(?![\w-]|\.[^\W\d_])")


# Spelled-out addresses: "anna dot berg at example dot com", "anna [at] example [dot] com",
# "anna(at)example(dot)org". A plain " at " before a dotted domain ("look at example.com") is
# weak evidence: then the local part must look like one (a dot, digit, _ or +) or the sentence
# must be about mail.
_SPELLED_AT = r"(?:\s*(?P<bracket>[\[(<{])\s*at\s*[\])>}]\s*|\s+at\s+)"
_SPELLED_DOT = r"(?:\s*[\[(<{]\s*dot\s*[\])>}]\s*|\s+dot\s+|\.)"
_TLDS = (
    "com|org|net|edu|gov|mil|int|info|biz|name|io|co|me|dev|app|ai|email|online|site|xyz|tech|"
    "uk|de|fr|es|it|nl|be|ch|at|se|no|dk|fi|pl|pt|ie|is|cz|sk|hu|ro|gr|tr|ru|ua|us|ca|mx|br|ar|"
    "cl|pe|jp|cn|kr|tw|hk|sg|in|pk|au|nz|za|ng|ke|eg|il|ae|sa|eu"
)
_SPELLED_EMAIL = re.compile(
    rf"""(?<![\w.@%+-])
    (?P<local>[a-z0-9][\w%+-]*(?:{_SPELLED_DOT}[a-z0-9][\w%+-]*){{0,3}})
    {_SPELLED_AT}
    (?P<domain>[a-z0-9][a-z0-9-]*(?:{_SPELLED_DOT}[a-z0-9][a-z0-9-]*){{0,3}}{_SPELLED_DOT}(?:{_TLDS}))
    (?![\w-]|\.[a-z])""",
    re.I | re.X,
)
_SPELLED_DOT_WORD = re.compile(r"(?i)(?:\s|[\[(<{])dot(?:\s|[\])>}])")
_EMAIL_CONTEXT = re.compile(r"(?i)mail|contact|reach|write\s+to|address|inbox|send")
# Words that stand before " at " in ordinary sentences ("download it at python dot org").
_NOT_LOCAL_PARTS = frozenset(
    """
    me us you him her them it this that here there we they i work works worked working look
    looking looked live lives living lived stay stays staying stayed arrive arrived meet met be
    is are was were am home office team support sales info help admin everyone anyone someone
    people staff school job available online found find get buy shop order ordered download
    downloaded sign signed log logged apply hosted
    """.split()
)


def _spelled_email(match: re.Match[str]) -> str | None:
    local = match.group("local")
    if len(local) < 2 or local.lower() in _NOT_LOCAL_PARTS or not any(c.isalpha() for c in local):
        return None
    if match.group("bracket") is not None or _SPELLED_DOT_WORD.search(match.group()):
        return PiiType.EMAIL.placeholder
    # Plain " at " and a dotted domain: "mail me at example.com" is a website, so the local part
    # must look like one (a dot, digit, _ or +) or the words before must be about mail.
    if any(c in local for c in "._+%") or any(c.isdigit() for c in local):
        return PiiType.EMAIL.placeholder
    window = match.string[max(0, match.start() - 60) : match.start()]
    return PiiType.EMAIL.placeholder if _EMAIL_CONTEXT.search(window) else None


def _scrub_emails(text: str) -> tuple[str, int]:
    total = 0
    if "@" in text:
        text, total = _EMAIL.subn(PiiType.EMAIL.placeholder, text)
    if _may_be_spelled_email(_lower(text)):
        text, count = _substitute(_SPELLED_EMAIL, text, _spelled_email)
        total += count
    return text, total


_TLD_SET = frozenset(_TLDS.split("|"))


_SPELLED_AT_BRACKETS = ("at)", "at]", "at}", "at>")


def _may_be_spelled_email(lower: str) -> bool:
    """A bracketed "at", or " at " with a spelled "dot" or a dotted domain after it."""
    if _has_any(lower, _SPELLED_AT_BRACKETS):
        return True
    position = lower.find(" at ")
    if position < 0:
        return False
    if " dot " in lower:
        return True
    while position >= 0:  # "x at yahoo.co.uk": the word after " at " ends in .tld
        domain = lower[position + 4 :].split(None, 1)[0].rstrip(".,;:!?)") if position + 4 < len(lower) else ""
        if "." in domain and domain.rsplit(".", 1)[1] in _TLD_SET:
            return True
        position = lower.find(" at ", position + 3)
    return False


# --- social handles ----------------------------------------------------------------------------
# "@name" is a handle only where the sentence names a platform or asks to be followed: "@"
# also opens decorators (@dataclass), annotations (@Override), CSS rules and npm scopes.

_PLATFORMS = (
    r"twitter|tweet\w*|x\.com|instagram|insta|ig|tiktok|tik\s+tok|snapchat|snap|telegram|threads|bluesky"
    r"|bsky|mastodon|reddit|discord|twitch|youtube|yt|github|gitlab|steam|xbox|psn|kik|wechat|linkedin"
    r"|facebook|fb|pinterest|tumblr|soundcloud|onlyfans|patreon|venmo"
)
_HANDLE_CHARS = r"[A-Za-z0-9_](?:[A-Za-z0-9_.]{0,28}[A-Za-z0-9_])?(?:\#\d{4})?"
_AT_HANDLE = re.compile(rf"(?<![\w@./+-])@(?P<handle>{_HANDLE_CHARS})(?![\w@(]|\.[A-Za-z0-9]|/)")
# Words near an @handle that make it one: the platform, or asking to be followed or messaged.
_HANDLE_CONTEXT_WORDS = frozenset(
    """
    twitter tweet tweets tweeted instagram insta ig tiktok snapchat snap telegram threads bluesky bsky
    mastodon reddit discord twitch youtube yt github gitlab steam xbox psn kik wechat linkedin facebook fb
    pinterest tumblr soundcloud onlyfans patreon venmo handle username follow dm account profile page
    """.split()
)
_HANDLE_CONTEXT_PHRASES = ("on x", "x (formerly", "x.com", "user name", "tag me", "find me", "add me", "message me")


def _handle_context(text: str, start: int, end: int) -> bool:
    if not _HANDLE_CONTEXT_WORDS.isdisjoint(_window_words(text, start, end)):
        return True
    window = text[max(0, start) : end].lower()
    return any(phrase in window for phrase in _HANDLE_CONTEXT_PHRASES)


_HANDLE_AFTER_PLATFORM = re.compile(
    rf"""(?ix)
    (?:
        \bmy\s+(?:{_PLATFORMS}|x)\s*(?P<named>(?:handle|username|user\s*name|account|name|id|tag)\s*)?
          (?:is|:|=|-|['’]s)\s*
      | \b(?:add|follow|find|dm|message|text|hit)\s+me\s+(?:up\s+)?(?:on|at)\s+(?:{_PLATFORMS})\s*[,:-]?\s*
          (?:(?:it['’]?s|i['’]?m|as|at|is)\s+)?
      | \bmy\s+(?P<named_only>handle|username|user\s*name|gamertag|screen\s*name)\s+(?:on\s+\w+\s+)?(?:is|:|=)\s*
    )
    (?P<at>@)?(?P<handle>{_HANDLE_CHARS})(?![\w@]|\.[A-Za-z0-9])""",
)
_REDDIT_USER = re.compile(r"(?<![\w/])/?u/(?P<handle>[A-Za-z0-9_-]{3,20})(?![\w/-])")
# Words after "my " / "me on " that _HANDLE_AFTER_PLATFORM starts from: a word-set lookup at
# each "my " is far cheaper than scanning the text for some thirty platform names.
_PLATFORM_WORDS = frozenset(
    """
    twitter x instagram insta ig tiktok tik snapchat snap telegram threads bluesky bsky mastodon reddit
    discord twitch youtube yt github gitlab steam xbox psn kik wechat linkedin facebook fb pinterest tumblr
    soundcloud onlyfans patreon venmo handle username user gamertag screen
    """.split()
)
_PLATFORM_MARKERS = ("my ", " me on ", " me at ", " me up on ")
_PLATFORM_GATE = frozenset(f"{word}{end}" for word in _PLATFORM_WORDS for end in ("", ",", ":"))


def _mentions_platform(lower: str) -> bool:
    for marker in _PLATFORM_MARKERS:
        position = lower.find(marker)
        while position >= 0:
            start = position + len(marker)
            word = lower[start : start + 16].split(" ", 1)[0].strip(",:;.!?'’")
            if word in _PLATFORM_WORDS or word.startswith(("instagram", "twitter")):
                return True
            position = lower.find(marker, start)
    return False


_NOT_HANDLES = frozenset(
    "private public down dead empty gone deleted banned suspended locked hacked new old broken "
    "inactive blocked there here same different full boring verified the a an mine not".split()
)


def _at_handle(match: re.Match[str]) -> str | None:
    text = match.string
    line_start = text.rfind("\n", 0, match.start()) + 1
    line_end = text.find("\n", match.end())
    start = max(line_start, match.start() - 60)
    end = min(match.end() + 40, len(text) if line_end < 0 else line_end)
    if _handle_context(text, start, match.start()) or _handle_context(text, match.end(), end):
        return PiiType.HANDLE.placeholder
    return None


def _handle_after_platform(match: re.Match[str]) -> str | None:
    handle = match.group("handle")
    if handle.lower() in _NOT_HANDLES or handle.isdigit() or len(handle) < 3:
        return None
    # Without "@" or "handle"/"username", a plain word may describe the account ("my insta is
    # private"): only handle-shaped values (a dot, _, digit) are taken.
    plain = match.group("at") is None and match.group("named") is None and match.group("named_only") is None
    if plain and not any(c in handle for c in "._#") and not any(c.isdigit() for c in handle):
        return None
    start = match.start("at") if match.group("at") else match.start("handle")
    whole = match.group()
    return whole[: start - match.start()] + PiiType.HANDLE.placeholder


def _scrub_handles(text: str) -> tuple[str, int]:
    total = 0
    if "u/" in text:
        text, total = _REDDIT_USER.subn(PiiType.HANDLE.placeholder, text)
    if not _PLATFORM_GATE.isdisjoint(_words(text)) and _mentions_platform(_lower(text)):
        text, count = _substitute(_HANDLE_AFTER_PLATFORM, text, _handle_after_platform)
        total += count
    if "@" in text and _handle_context(text, 0, len(text)):  # no platform word: no @handle
        text, count = _substitute(_AT_HANDLE, text, _at_handle)
        total += count
    return text, total


# --- IBAN ------------------------------------------------------------------------------------

_IBAN = re.compile(r"(?<!\w)[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?(?!\w)")


def _is_iban(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban(match: re.Match[str]) -> str | None:
    candidate = match.group()
    end = _longest_valid_prefix(candidate, _is_iban)
    if end is None:
        return None
    return PiiType.IBAN.placeholder + candidate[end:]


def _scrub_ibans(text: str) -> tuple[str, int]:
    return _substitute(_IBAN, text, _iban)


# --- payment cards -----------------------------------------------------------------------------

# Not after currency signs/decimal points and not before decimals: amounts are not cards.
_CARD = re.compile(r"(?<![\w.,+/$€£#-])(?:\d{13,19}|\d{4}(?:[ -]\d{2,7}){2,4})(?!\w|[.,-]\d)")


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    if " " in candidate and "-" in candidate:  # real cards use one separator style
        return False
    digits = candidate.replace(" ", "").replace("-", "")
    # Issuer ranges in use start with 2-6 (Mastercard 2-series to Discover/UnionPay).
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn_valid(digits)


def _card(match: re.Match[str]) -> str | None:
    candidate = match.group()
    end = _longest_valid_prefix(candidate, _is_card)
    if end is None:
        return None
    return PiiType.CARD.placeholder + candidate[end:]


def _scrub_cards(text: str) -> tuple[str, int]:
    return _substitute(_CARD, text, _card)


# --- US social security numbers -------------------------------------------------------------------
# AAA-GG-SSSS. Dashed, the shape is distinctive; spaced or run together it needs the keyword.
# Never issued: area 000, 666 or 900-999, group 00, serial 0000.

_SSN_DASHED = re.compile(r"(?<![\w.,/$€£#+-])(\d{3})-(\d{2})-(\d{4})(?![\w-]|[.,/]\d)")
_SSN_AFTER_KEYWORD = re.compile(
    r"""(?ix)(?:ssn|ss\#|social\s+security(?:\s+(?:number|num|no\.?|\#|card))?|social)
        \s*(?:\#|number|no\.?)?\s*(?:is|was|:|=|-)?\s*
        (?P<ssn>\d{3}(?P<sep>[ -]?)\d{2}(?P=sep)\d{4})(?![\w-]|[.,/]\d)"""
)


def _is_ssn(digits: str) -> bool:
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    return area != "000" and area != "666" and area[0] != "9" and group != "00" and serial != "0000"


def _ssn_dashed(match: re.Match[str]) -> str | None:
    return PiiType.SSN.placeholder if _is_ssn("".join(match.groups())) else None


_SSN_ROOTS = ("ssn", "ss#", "social")
_SSN_SHAPE = "999-99-9999"


def _scrub_ssns(text: str) -> tuple[str, int]:
    total = 0
    lower = _lower(text)
    if _has_any(lower, _SSN_ROOTS):
        matches = _matches_at_words(_SSN_AFTER_KEYWORD, text, _SSN_ROOTS)
        spans = [m.span("ssn") for m in matches if _is_ssn(m.group("ssn").replace("-", "").replace(" ", ""))]
        if spans:
            text, total = _replace_spans(text, spans, PiiType.SSN.placeholder)
    if _SSN_SHAPE in _shape(text):
        text, count = _substitute(_SSN_DASHED, text, _ssn_dashed)
        total += count
    return text, total


# --- passport numbers ------------------------------------------------------------------------------
# Formats differ by country (US/UK 9 digits, DE C01X00T47, IN K8831204, FR 09AA12345), so the
# keyword decides and the value must be 6-10 letters and digits with at least 5 digits.

_PASSPORT = re.compile(
    r"""(?ix)passport
        (?:\s*[,:-]?\s*(?:the\s+)?(?:number|num|no\.?|nr\.?|\#|id|code))?
        (?:\s+(?:is|was|reads))?\s*[:#=-]?\s*
        (?P<passport>[A-Z0-9]{6,10})(?![\w-])"""
)


def _scrub_passports(text: str) -> tuple[str, int]:
    matches = _matches_at_words(_PASSPORT, text, ("passport",))
    spans = [m.span("passport") for m in matches if _digit_count(m.group("passport")) >= 5]
    return _replace_spans(text, spans, PiiType.PASSPORT.placeholder) if spans else (text, 0)


# --- dates of birth ----------------------------------------------------------------------------------
# Only a date that a birth keyword introduces ("born on", "DOB:", "date of birth", "birthday
# is"): dates on their own are everywhere. The date must exist (no 31 April, 29 February only
# in leap years); numeric dates may be day-first or month-first.

_MONTHS = {
    name: number
    for number, names in enumerate(
        (
            ("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",),
            ("june", "jun"), ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"),
            ("october", "oct"), ("november", "nov"), ("december", "dec"),
        ),
        start=1,
    )
    for name in names
}  # fmt: skip
_MONTH = "|".join(sorted(_MONTHS, key=len, reverse=True))
_BIRTH_DATE = re.compile(
    rf"""(?ix)
    \b(?:born|date\s+of\s+birth|birth\s*date|birthdate|birthday|d\.o\.b\.?|dob)
    (?:\s+(?:is|was|on|:))*\s*[:=-]?\s*(?:on\s+)?(?:the\s+)?
    (?P<date>
        (?P<n1>\d{{1,4}})(?P<sep>[./-])(?P<n2>\d{{1,2}})(?P=sep)(?P<n3>\d{{2,4}})
      | (?P<day>\d{{1,2}})(?:st|nd|rd|th)?(?:\s+of)?\s+(?P<month>{_MONTH})\.?(?:,?\s+(?P<year>\d{{4}}))?
      | (?P<month2>{_MONTH})\.?\s+(?P<day2>\d{{1,2}})(?:st|nd|rd|th)?(?:,?\s+(?P<year2>\d{{4}}))?
    )(?![\w/.-]\d|\w)"""
)


def _real_date(year: int | None, month: int, day: int) -> bool:
    if year is not None and not 1880 <= year <= 2100:
        return False
    if not 1 <= month <= 12 or day < 1:
        return False
    leap = year is None or (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0))
    return day <= (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[month - 1]


def _is_birth_date(match: re.Match[str]) -> bool:
    if match.group("n1"):
        n1, n2, n3 = match.group("n1"), match.group("n2"), match.group("n3")
        if len(n1) == 4:
            valid = len(n3) <= 2 and _real_date(int(n1), int(n2), int(n3))
        elif len(n3) in (2, 4) and len(n1) <= 2:
            year = int(n3) if len(n3) == 4 else 2000 + int(n3)  # the century only changes 29/02/00
            valid = _real_date(year, int(n2), int(n1)) or _real_date(year, int(n1), int(n2))
        else:
            valid = False
    else:
        suffix = "" if match.group("day") else "2"  # "12 March 1985" or "March 12, 1985"
        day, month, year = (match.group(name + suffix) for name in ("day", "month", "year"))
        valid = _real_date(int(year) if year else None, _MONTHS[month.lower()], int(day))
    return valid


# Where a birth keyword can start; _BIRTH_DATE is matched there instead of searched for.
_BIRTH_ROOTS = ("born", "birth", "date of birth", "dob", "d.o.b")


def _scrub_birth_dates(text: str) -> tuple[str, int]:
    spans = [m.span("date") for m in _matches_at_words(_BIRTH_DATE, text, _BIRTH_ROOTS) if _is_birth_date(m)]
    return _replace_spans(text, spans, PiiType.DATE_OF_BIRTH.placeholder) if spans else (text, 0)


# --- IP addresses ------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:.]{3,45}(?![\w:])")


def _is_netmask(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # 255.255.255.0, 255.255.240.0: ones then zeros, from 255. on (the subnet mask of any network).
    if address.version != 4:
        return False
    value = int(address)
    zeros = ~value & 0xFFFFFFFF
    return value >> 24 == 255 and zeros & (zeros + 1) == 0


def _identifies_a_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Loopback/unspecified/broadcast and netmasks are in every code snippet and identify no one.
    return not (address.is_loopback or address.is_unspecified or _is_netmask(address))


def _ipv4(match: re.Match[str]) -> str | None:
    if _identifies_a_host(ipaddress.IPv4Address(match.group())):
        return PiiType.IP.placeholder
    return None


def _ipv6(match: re.Match[str]) -> str | None:
    candidate = match.group().rstrip(".")
    if candidate.count(":") < 2:  # every IPv6 address has two; "answer 12:" is common text
        return None
    try:
        address = ipaddress.IPv6Address(candidate)
    except ValueError:
        return None
    groups = [g for g in candidate.split(":") if g]
    # Two+ groups with a digit and a 3+ char group: rules out slices (x[1::2]) and C++ scopes.
    if (
        len(groups) < 2
        or max(len(g) for g in groups) < 3
        or not any(c.isdigit() for c in candidate)
        or not _identifies_a_host(address)
    ):
        return None
    return PiiType.IP.placeholder + match.group()[len(candidate) :]


def _scrub_ips(text: str) -> tuple[str, int]:
    total = 0
    if ":" in text:
        text, total = _substitute(_IPV6_CANDIDATE, text, _ipv6)
    if "9.9" in _shape(text):  # every _IPV4 match has a digit, a dot, a digit
        text, count = _substitute(_IPV4, text, _ipv4)
        total += count
    return text, total


# --- phone numbers -----------------------------------------------------------------------------

# Groups after the first need a separator: optional separators between variable-length digit
# groups would make the regex backtrack through every split of a long digit run.
# "00" is the international call prefix written instead of "+". Being weaker evidence, it needs
# a separator after the country code and a number that drops the trunk 0 (or writes "(0)"), so
# zero-padded ids and digit groups inside other numbers (0044 0532 0130) stay.
_PHONE_INTERNATIONAL = re.compile(
    r"(?<![\w+])(?:\+(?:[1-9]\d{7,14}"
    r"|[1-9]\d{0,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,12}(?:[ .-]\d{1,8}){0,6})"
    r"|00[1-9]\d{0,3}(?:[ .-]?\(0\)[ .-]?|[ .-])[1-9]\d{0,7}(?:[ .-]\d{1,8}){0,6})"
    r"(?!\w|[.-]\d)"
)
# North American 3-3-4; area code and exchange never start with 0 or 1.
_PHONE_NANP = re.compile(
    r"(?<![\w+.-])(?:1[ .-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?!\w|[.-]\d)"
)
# National numbers with a trunk 0 (UK, FR, DE, ...), one separator style throughout so that
# dates (01/02/2023 10:30) and ranges are not taken for phone numbers.
_PHONE_TRUNK = re.compile(
    r"(?<![\w+.,/-])(?:\(0\d{1,4}\)|0\d{1,4})(?P<sep>[ ./-])\d{2,8}(?:(?P=sep)\d{2,4}){0,4}"
    r"(?!\w|[.:/,-]\d)"
)
_PHONE_AFTER_KEYWORD = re.compile(
    r"(?i)\b(?:phone|ph|tel|telephone|mobile|cell|cellphone|call(?:\s+(?:me|us))?|text(?:\s+me)?|whatsapp|fax|sms"
    r"|(?:reach|ring|contact)\s+(?:me|us|him|her|them)|dial)\.?"
    r"(?:\s*(?:number|no\.?|#))?\s*(?:is|at|on|:|-)?\s*"
    r"(?P<phone>\+?\d[\d ().-]{5,17}\d)(?!\w|[.-]\d)"
)


# "my number is 555-0199", "the landlord's number is ...", "our home phone number is ...": a
# possessive and only phone-like words before "number" ("my order number is" is no phone).
_PHONE_NUMBER_IS = re.compile(
    r"""(?ix)\b(?:my|his|her|their|our|your|[a-z]+['’]s)\s+
        (?:(?:new|old|home|work|office|cell|mobile|personal|private|direct|contact|landline|phone
          |telephone|whatsapp|emergency|business|daytime|evening|best|other|main|current)\s+){0,3}
        (?:number|no\.?|num|\#)
        (?:['’]s|\s+is|\s*[:=-])\s*(?:now\s+|still\s+)?
        (?P<phone>\+?\(?\d[\d ().-]{5,17}\d)(?!\w|[.,-]\d)"""
)
# Ten digits run together (NANP 415 555 0132 as 4155550132, Indian mobiles 98xxxxxxxx, optionally
# +91/0 before, or split 5+5) are phones only with a phone word in the same sentence: alone they
# are order ids, sums and hashes as often.
_PHONE_BARE = re.compile(
    r"(?<![\w+.,/$€£#-])(?:\+?91[ -]?|0)?(?:[6-9]\d{4}[ -]?\d{5}|[2-9]\d{2}[2-9]\d{6})(?!\w|[.,-]\d)"
)
_PHONE_CONTEXT_WORDS = frozenset(
    "phone ph tel telephone mobile cell cellphone call calls calling text txt whatsapp sms ring reach contact "
    "dial landline".split()
)
_BARE_PHONE_SHAPES = ("9999999999", "99999 99999", "99999-99999")
_POSSESSIVE_WORDS = frozenset("my his her their our your".split())


def _bare_phone(match: re.Match[str]) -> str | None:
    text = match.string
    start = max(text.rfind(".", 0, match.start()), text.rfind("\n", 0, match.start()), match.start() - 50)
    end = min(x for x in (text.find(". ", match.end()), text.find("\n", match.end()), match.end() + 50) if x >= 0)
    if not _PHONE_CONTEXT_WORDS.isdisjoint(_window_words(text, start, match.start())):
        return PiiType.PHONE.placeholder
    if not _PHONE_CONTEXT_WORDS.isdisjoint(_window_words(text, match.end(), end)):
        return PiiType.PHONE.placeholder
    return None


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _phone_with_digits(low: int, high: int) -> Replacement:
    def replacement(match: re.Match[str]) -> str | None:
        return PiiType.PHONE.placeholder if low <= _digit_count(match.group()) <= high else None

    return replacement


def _international_phone(match: re.Match[str]) -> str | None:
    number = match.group()
    digits = _digit_count(number) - (2 if number.startswith("00") else 0)
    return PiiType.PHONE.placeholder if 8 <= digits <= 15 else None  # E.164: at most 15


def _phone_after_keyword(match: re.Match[str]) -> str | None:
    if 7 <= _digit_count(match.group("phone")) <= 15:
        return _replace_group(match, "phone", PiiType.PHONE.placeholder)
    return None


_PHONE_PATTERNS: tuple[tuple[re.Pattern[str], Replacement], ...] = (
    (_PHONE_INTERNATIONAL, _international_phone),
    (_PHONE_NANP, _phone_with_digits(10, 11)),
    (_PHONE_TRUNK, _phone_with_digits(9, 12)),
)
# Every match of _PHONE_PATTERNS holds "+" and a digit (international), NANP's last two groups
# ("555-0123"), "00" and a digit 1-9 (international) or a trunk 0 group, separator, two digits.
_NANP_SHAPES = ("999 9999", "999.9999", "999-9999")
_ZERO_PREFIXED = re.compile(r"(?<![\w+])00[1-9]|(?<![\w+.,/-])\(?0\d{1,4}\)?[ ./-]\d\d")
# What every _ZERO_PREFIXED match holds: "00", or in the shape a digit, maybe ")", a separator and
# two digits.
_INTERNATIONAL_PREFIX = "00"
_TRUNK_SHAPES = tuple(f"9{close}{separator}99" for close in ("", ")") for separator in " ./-")


def _may_be_phone_number(text: str) -> bool:
    shape = _shape(text)
    return "+9" in shape or _has_any(shape, _NANP_SHAPES) or (
        (_INTERNATIONAL_PREFIX in text or _has_any(shape, _TRUNK_SHAPES)) and _ZERO_PREFIXED.search(text) is not None
    )


_PHONE_KEYWORD_HINTS = (
    "ph", "tel", "mobile", "cell", "call", "text", "whatsapp", "fax", "sms", "reach", "ring", "contact", "dial"
)  # fmt: skip
_PHONE_KEYWORD_HINT = re.compile("|".join(_PHONE_KEYWORD_HINTS))
# "my number is", "her no. is", "our # is": one of these, then a possessive.
_NUMBER_WORD_HINTS = ("num", "no.", " no ", "#")


def _phone_number_is(match: re.Match[str]) -> str | None:
    if 7 <= _digit_count(match.group("phone")) <= 15:
        return _replace_group(match, "phone", PiiType.PHONE.placeholder)
    return None


def _scrub_phones(text: str) -> tuple[str, int]:
    total = 0
    if _may_be_phone_number(text):
        for pattern, replacement in _PHONE_PATTERNS:
            text, count = _substitute(pattern, text, replacement)
            total += count
    lower = _lower(text)
    if _PHONE_KEYWORD_HINT.search(lower):
        text, count = _substitute(_PHONE_AFTER_KEYWORD, text, _phone_after_keyword)
        total += count
        lower = _lower(text)
    if _has_any(lower, _NUMBER_WORD_HINTS) and (
        not _POSSESSIVE_WORDS.isdisjoint(_words(text)) or "'s " in lower or "’s " in lower
    ):
        text, count = _substitute(_PHONE_NUMBER_IS, text, _phone_number_is)
        total += count
    if "99999" in _shape(text) and _has_any(_shape(text), _BARE_PHONE_SHAPES):
        text, count = _substitute(_PHONE_BARE, text, _bare_phone)
        total += count
    return text, total


# --- street addresses ------------------------------------------------------------------------------
# A house number and a capitalised street name with a street type ("42 Elm Street", "318 W 42nd
# St", "12 rue de la Paix"), a street then its number where the type is part of the word
# ("Hauptstraße 12", "Keizersgracht 123", "Drottninggatan 53") or leads it ("Calle Mayor 25"),
# PO boxes and "Flat No. 302"-style house numbers. A unit, city, state and postal code that
# follow are taken with it. Counts are not addresses: a plural noun after the street type
# ("2 Abbey Road vinyls", "3 Ocean View rooms") or a brand in the name ("3 Google Drive
# accounts") rules a match out, unless a cue such as "I live at" comes before it; all-lowercase
# addresses ("i live at 23 rosewood avenue") need that cue.

_STREET_TYPES = (
    "Street|St|Road|Rd|Avenue|Ave|Av|Boulevard|Blvd|Lane|Ln|Terrace|Ter|Crescent|Cres|Highway|Hwy|Parkway"
    "|Pkwy|Expressway|Freeway|Turnpike|Tpke|Drive|Dr|Court|Ct|Place|Pl|Way|Close|Square|Sq|Circle|Cir|Trail"
    "|Trl|Row|Walk|Gardens|Grove|Mews|Hill|Park|Loop|Plaza|Alley|Path|Point|View|Heights|Green|Rise|Parade"
    "|Wharf|Quay"
)
_DIRECTION = r"(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)"
_STREET_NAME_WORD = r"(?:[A-Z][a-zà-ÿ'’]+(?:-[A-Z]?[a-zà-ÿ]+)*|\d{1,3}(?:st|nd|rd|th)|[NSEW]\.?|Saint|St\.)"
_HOUSE_NUMBER = r"\d{1,5}[A-Za-z]?(?:[-/]\d{1,4}[A-Za-z]?)?"
_STREET_NUMBER_FIRST = re.compile(
    rf"""(?<![\w.,/$€£#:-])(?P<number>{_HOUSE_NUMBER}),?\s+
    (?:
        (?P<words>(?:{_STREET_NAME_WORD}\s+){{1,3}})
        (?:{_STREET_TYPES})\b\.?
        (?:\s+{_DIRECTION}\b\.?)?
      | (?P<single>Broadway|[A-Z][a-z]+(?:way|gate))\b                     # 2200 Broadway, 63 Kingsway
      | (?P<romance>(?i:rue|avenue|av\.|bd|boulevard|place|chemin|allée|impasse|quai|cours|route|square)\s+
          (?:(?:de\s+la|de\s+l['’]|du|des|de|d['’]|la|le|les)\s*)?
          [A-ZÀ-Ý][\wà-ÿ'’-]+(?:\s+[A-ZÀ-Ý][\wà-ÿ'’-]+){{0,3}})
    )""",
    re.X,
)
_COMPOUND_STREET_TYPES = (
    "straße|strasse|str\\.|weg|gasse|allee|platz|damm|ufer|chaussee|steig|pfad|gracht|straat|laan"
    "|plein|kade|singel|dijk|gatan|vägen|gata|gaten|veien|vej|vegur|katu|utca|ulica"
)
_STREET_NAME_FIRST = re.compile(
    rf"""(?<![\w-])(?:
        (?P<compound>[A-ZÄÖÜÅØÆ][a-zäöüßåøæé]{{2,}}(?:-[A-ZÄÖÜ]?[a-zäöüß]+)*(?:{_COMPOUND_STREET_TYPES}))
      | (?P<prefix>(?:Calle|C/|Carrer|Avenida|Avda\.?|Rua|Rúa|Viale|Via|Piazza|Piazzale|Corso|Largo|Paseo|Plaza
          |Praça|Travessa|Camino|Strada|ul\.|Ulica|Boulevard|Avenue|Rue)\s+
          (?:(?:de|del|la|las|los|da|do|dos|das|di|della|dei|degli|delle)\s+)*
          [A-ZÀ-Ý][\wà-ÿ'’-]+(?:\s+[A-ZÀ-Ý][\wà-ÿ'’-]+){{0,2}})
    ),?\s+(?P<number>\d{{1,4}}[a-zA-Z]?(?:[-/]\d{{1,4}}[a-zA-Z]?)?)(?![\w.,/-]\d|[\w-])""",
    re.X,
)
# All lowercase ("i live at 23 rosewood avenue"): only after a cue such as "I live at".
_LOWERCASE_STREET_TYPES = (
    "street|st|road|rd|avenue|ave|lane|ln|boulevard|blvd|drive|dr|court|ct|terrace|crescent|close|way|place"
)
_STREET_LOWERCASE = re.compile(
    rf"(?<![\w.,/$€£#:-]){_HOUSE_NUMBER},?\s+(?:[a-z][a-z'’-]+\s+){{1,3}}(?:{_LOWERCASE_STREET_TYPES})\b\.?"
)
_PO_BOX = re.compile(r"\b(?:P\.?\s?O\.?\s?Box|Post\s+Office\s+Box|Postfach|Apartado)\s+\d{1,7}\b", re.I)
_HOUSE_NUMBER_PREFIX = re.compile(
    r"\b(?:Flat|House|H\.|Plot|Door|Apartment|Apt|Villa|Bungalow)\s*(?:No\.?|Number|Num|#)\s*[A-Za-z]?\d[\w/-]{0,7}"
)
_US_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND"
    "|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY|PR"
)
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?\s?\d[ABD-HJLNP-UW-Z]{2}"
_POSTAL_CODE = (
    rf"(?:(?:{_US_STATES})\s+\d{{5}}(?:-\d{{4}})?"  # US: state and ZIP
    rf"|{_UK_POSTCODE}"
    r"|(?:AB|BC|MB|NB|NL|NS|NT|NU|ON|PE|QC|SK|YT)\s+[A-Z]\d[A-Z]\s?\d[A-Z]\d"  # Canada
    r"|(?:NSW|VIC|QLD|WA|SA|TAS|ACT|NT)\s+\d{4}"  # Australia
    r"|[1-9]\d{5}|[1-9]\d{2}\s\d{3})"  # India
)
_CITY = r"[A-Z][\wà-ÿ'’.-]+(?:\s+[A-Z][\wà-ÿ'’.-]+){0,2}"
_UNIT = r"(?:Apt|Apartment|Unit|Suite|Ste|Flat|Floor|Fl|Room|Rm|\#)\.?\s*\#?\s*[\w-]{1,6}"
# After a number-first street: unit, then city and a postal code (kept only with the code).
_ADDRESS_TAIL = re.compile(rf"(?:,?\s*{_UNIT})?(?:,?\s+{_CITY})?,?\s+{_POSTAL_CODE}\b")
# After a street-first address: "10115 Berlin", "1015 CJ Amsterdam", "111 21 Stockholm".
_CONTINENTAL_TAIL = re.compile(
    r",?\s+(?:\d{4,5}|\d{3}\s\d{2}|\d{4}\s?[A-Z]{2})\s+[A-Z][\wà-ÿ'’-]+(?:\s+[A-Z][\wà-ÿ'’-]+)?\b"
)
# A run of comma-separated parts ending at an Indian PIN code ("..., Bengaluru 560038").
_PIN_TAIL = re.compile(r"(?:,\s*[^,.;\n]{1,40}){0,6}?,\s*[A-Z][\w.-]+(?:\s+[A-Z][\w.-]+)?\s*-?\s*[1-9]\d{5}\b")
# "2 Abbey Road vinyls", "3 Ocean View rooms": a plural noun right after the street type makes
# the number a count. Verbs in -s after an address are fine ("12 Oak Drive needs a roof").
_FOLLOWING_WORD = re.compile(r"\s+([a-z][a-z']*)")
_VERBS_IN_S = frozenset(
    "is was has does needs looks seems sits belongs gets costs sells floods leaks stays lives takes "
    "goes runs shows".split()
)
_ADDRESS_CONTEXT = re.compile(
    r"(?i)(?:\b(?:live|lives|living|lived|stay|stays|staying|moved|move|moving|ship|shipped|deliver|delivered"
    r"|send|sent|mail|post|located|based|office|home|house|flat|apartment|place|address|addressed|pick\s+me\s+up"
    r"|drop\s+(?:me|it)\s+off|come|visit|return|bought|rent|rented|renting|own|sold)\b[^.!?\n]{0,24}|:\s*)$"
)
# Where an address ends: punctuation or the end of the text.
_ADDRESS_ENDS = re.compile(r"\s*(?:$|[,;:!?)\n]|\.(?:\s|$))")
# Capitalised words of products and companies, which no street or person is named after; both
# the address and the name detectors skip them ("3 Google Drive", "met Microsoft Azure people").
_BRANDS = frozenset(
    """
    google microsoft apple amazon meta facebook instagram twitter tiktok netflix spotify uber lyft airbnb
    tesla nvidia intel amd ibm oracle samsung sony nintendo disney paypal stripe shopify slack zoom
    discord reddit github gitlab youtube linkedin whatsapp telegram dropbox notion figma adobe
    salesforce openai anthropic azure aws gcp cloud studio visual office teams excel outlook
    powerpoint onedrive windows linux ubuntu debian fedora android ios macos chrome firefox safari
    docker kubernetes react angular vue django flask node rails postgres mysql redis kafka jira
    confluence trello asana hubspot zendesk twilio ikea walmart starbucks mcdonalds costco target
    """.split()
)


def _street_number_first(match: re.Match[str]) -> str | None:
    text = match.string
    words = (match.group("words") or "").split()
    if any(w.lower() in _BRANDS for w in words):
        return None
    following = _FOLLOWING_WORD.match(text, match.end())
    if following is None or match.group("romance"):
        return PiiType.ADDRESS.placeholder
    word = following.group(1)
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss") and word not in _VERBS_IN_S:
        if not _ADDRESS_CONTEXT.search(text, max(0, match.start() - 40), match.start()):
            return None
    return PiiType.ADDRESS.placeholder


def _lowercase_street(match: re.Match[str]) -> str | None:
    if _ADDRESS_CONTEXT.search(match.string, max(0, match.start() - 40), match.start()):
        return PiiType.ADDRESS.placeholder
    return None


def _street_name_first(match: re.Match[str]) -> str | None:
    prefix = match.group("prefix")
    if prefix and prefix.startswith(("Via ", "Boulevard ", "Avenue ", "Rue ", "Plaza ")):
        # English words too ("Via Python 3", "Avenue Q 2"): only with a postcode, or where the
        # address ends.
        text = match.string
        if not (_CONTINENTAL_TAIL.match(text, match.end()) or _ADDRESS_ENDS.match(text, match.end())):
            return None
    return PiiType.ADDRESS.placeholder


def _address_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for pattern, accept, tails in _address_patterns(text):
        matches = _matches_at_numbers(pattern, text) if pattern in _NUMBER_LED else pattern.finditer(text)
        for match in matches:
            if accept is not None and accept(match) is None:
                continue
            end = match.end()
            for tail in tails:
                extended = tail.match(text, end)
                if extended:
                    end = extended.end()
                    break
            spans.append((match.start(), end))
    return spans


_DIGIT_RUN = re.compile(r"\d+")


def _matches_at_numbers(pattern: re.Pattern[str], text: str) -> Iterable[re.Match[str]]:
    """Matches of a pattern that starts with a house number, tried only where numbers start."""
    for run in _DIGIT_RUN.finditer(text):
        match = pattern.match(text, run.start())
        if match:
            yield match


def _scrub_addresses(text: str) -> tuple[str, int]:
    spans = _address_spans(text)
    if not spans:
        return text, 0
    return _replace_spans(text, spans, PiiType.ADDRESS.placeholder)


_AddressPattern = tuple[re.Pattern[str], Callable[[re.Match[str]], str | None] | None, tuple[re.Pattern[str], ...]]
_NUMBER_FIRST: _AddressPattern = (_STREET_NUMBER_FIRST, _street_number_first, (_ADDRESS_TAIL, _CONTINENTAL_TAIL))
_NAME_FIRST: _AddressPattern = (_STREET_NAME_FIRST, _street_name_first, (_CONTINENTAL_TAIL, _ADDRESS_TAIL))
_LOWERCASE: _AddressPattern = (_STREET_LOWERCASE, _lowercase_street, (_ADDRESS_TAIL,))
_BOX: _AddressPattern = (_PO_BOX, None, (_ADDRESS_TAIL,))
_PREFIXED_NUMBER: _AddressPattern = (_HOUSE_NUMBER_PREFIX, None, (_PIN_TAIL,))
_NUMBER_LED = (_STREET_NUMBER_FIRST, _STREET_LOWERCASE)

# Words (lowercased, punctuation attached) one of which each address pattern needs.
_WORD_ENDS = ("", ",", ".", ".,", "!", "?", ";", ":", ")")
_STREET_TYPE_WORDS = frozenset(
    f"{word.lower()}{end}" for word in _STREET_TYPES.split("|") + ["Broadway"] for end in _WORD_ENDS
)
_ROMANCE_TYPES = frozenset("rue avenue av. bd boulevard place chemin allée impasse quai cours route square".split())
_COMPOUND_SUFFIXES = tuple(_COMPOUND_STREET_TYPES.replace("\\", "").split("|"))
# Street types inside a word: "63 Kingsway", "12 Moorgate".
_STREET_TYPE_SUBSTRINGS = ("way", "gate")
_PO_BOX_HINT = "box"
_HOUSE_NUMBER_HINTS = ("No", "Num", "#")  # what _HOUSE_NUMBER_PREFIX's number word holds
_STREET_PREFIXES = frozenset(
    "calle c/ carrer avenida avda avda. rua rúa viale via piazza piazzale corso largo paseo plaza praça travessa "
    "camino strada ul. ulica boulevard avenue rue".split()
)


def _address_patterns(text: str) -> list[_AddressPattern]:
    """The address patterns that could match `text`, found by word-set and substring tests."""
    words = _words(text)
    lower = _lower(text)
    patterns = []
    if not _STREET_TYPE_WORDS.isdisjoint(words) or _has_any(lower, _STREET_TYPE_SUBSTRINGS):
        shape = _case_shape(text)
        if "9 A" in shape or "9A A" in shape or "9, A" in shape or "9a A" in shape:
            patterns.append(_NUMBER_FIRST)  # a house number and a capitalised street name
        if "9 a" in shape:
            patterns.append(_LOWERCASE)
    elif not _ROMANCE_TYPES.isdisjoint(words):  # 12 rue de la Paix
        patterns.append(_NUMBER_FIRST)
    if _PO_BOX_HINT in lower:
        patterns.append(_BOX)
    if _has_any(text, _HOUSE_NUMBER_HINTS) and _HOUSE_NUMBER_PREFIX.search(text):
        patterns.append(_PREFIXED_NUMBER)
    if not _STREET_PREFIXES.isdisjoint(words) or _compound_street_before_number(text):
        patterns.append(_NAME_FIRST)
    return patterns


def _compound_street_before_number(text: str) -> bool:
    """"Hauptstraße 12": a capitalised word that ends like a street, then a number."""
    if text.islower():  # no capital at all
        return False
    shape = _shape(text)
    position = shape.find(" 9")
    while position >= 0:
        word_start = text.rfind(" ", 0, position) + 1
        first = text[word_start]
        if (first.isupper() or not first.isascii()) and text[word_start:position].lower().rstrip(",").endswith(
            _COMPOUND_SUFFIXES
        ):
            return True
        position = shape.find(" 9", position + 2)
    return False


# --- person names --------------------------------------------------------------------------------
# No offline NER ships in a PyPI wheel (see docs/privacy.md), so names are only taken where the
# context says a name follows: introductions, greetings, sign-offs, headers and titles, and (only
# capitalised, name-shaped words) after "met", "talked to", "my sister", "a guy named". A model
# can be added as a second pass (SecondPass, below).

_NAME_TRIGGER = re.compile(
    r"""
      (?P<introduction>\bmy\s+(?:full\s+|first\s+|last\s+|real\s+)?(?:name|surname)(?:\s+is|'s|’s)\s+)
    | (?P<self>\b(?:I'm|I’m|I\s+am|call\s+me)\s+)
    | (?P<this_is>\bthis\s+is\s+)
    | (?P<greeting>(?:^|(?<=[\s(]))(?:dear|hi|hello|hey)[ \t]+)
    | (?P<signoff>(?:^|(?<=[.!?]))[ \t]*
        (?:(?:best|kind|warm|warmest)\s+regards|regards|best(?:\s+wishes)?|cheers|thanks
          |thank\s+you|many\s+thanks|sincerely|signed|yours(?:\s+truly|\s+sincerely)?)
        [ \t]*[,:.!-]?(?:[ \t]*\n){0,2}[ \t]*)
    | (?P<signature>^[ \t]*(?:--|—|–)[ \t]*\n?[ \t]*)  # "-- \n" is the email signature marker
    | (?P<header>^[ \t]*(?-i:From|To|Cc|Name|Full\s+name|Contact):[ \t]*)
    | (?P<title>(?-i:\b(?:Mr|Mrs|Ms|Mx|Miss|Dr|Prof)\b)\.?\s+)
    """,
    re.I | re.M | re.X,
)
# Weaker contexts, where only capitalised names that are no common, place or product word are
# taken: "met Tobias Fennimore", "talked to Marcus Whitley", "my sister Imogen", "a guy named
# Desmond Achebe". After "talked to" and the like two names are needed ("talked to Support").
_CONVERSATION_VERBS = frozenset(
    "talked talking talk spoke speaking spoken chatted chatting emailed texted messaged phoned lunch dinner "
    "coffee drinks call interview appointment session date".split()
)
_MEETING_VERBS = frozenset("met meet meeting meets".split())
_POSSESSIVES = frozenset("my our his her their".split())
_RELATIVE_WORDS = frozenset(
    """
    friend colleague coworker co-worker boss manager supervisor wife husband partner girlfriend boyfriend
    fiance fiancee fiancé fiancée son daughter kid child mom mum mother dad father brother sister cousin
    aunt uncle nephew niece grandma grandmother grandpa grandfather grandson granddaughter neighbor
    neighbour landlord landlady roommate flatmate housemate teacher tutor student doctor therapist dentist
    lawyer accountant tenant nanny babysitter mentor classmate teammate intern stepson stepdaughter
    stepmother stepfather
    """.split()
)
_RELATIVE_ADJECTIVES = frozenset("best old new little big older younger elder late".split())
_NAMED_NOUNS = frozenset(
    "guy man woman girl boy lady person someone somebody gentleman kid child friend colleague student customer "
    "patient employee candidate applicant teacher doctor nurse officer agent tenant baby son daughter".split()
)
# Someone else's name: "their name is", "the patient's name is", "my son's name is". Whose
# name it is decides (see _PEOPLE): "our cat's name is Pepper" stays.
_OTHER_NAME_TRIGGER = re.compile(
    r"\b(?:his|her|their|your|our|(?P<owner>[a-z]+(?:-[a-z]+)?)['’]s?)\s+"
    r"(?:(?:full|first|last|real|middle|maiden|given|legal|nick)\s*)?(?:name|surname)(?:\s+is|['’]s)\s+",
    re.I,
)
# The word right before a name in a loose context is one of these.
_LOOSE_LAST_WORDS = (
    _MEETING_VERBS
    | _RELATIVE_WORDS
    | frozenset(w + "s" for w in _RELATIVE_WORDS)
    | frozenset("with to named called".split())
)
# One set test on the text's words rules out most texts: every loose context holds one of these
# (the verb before "to"/"with", the noun before "named", the relative).
_LOOSE_GATE = frozenset(
    f"{prefix}{word}{comma}"
    for word in _MEETING_VERBS | _CONVERSATION_VERBS | _RELATIVE_WORDS | {w + "s" for w in _RELATIVE_WORDS}
    | {"named", "called"}
    for prefix in ("", "ex-")
    for comma in ("", ",")
)
# Whose name "X's name is" introduces: people, not pets, files or ships.
_PEOPLE = _RELATIVE_WORDS | _NAMED_NOUNS | frozenset(
    "user client caller sender recipient owner driver author victim suspect witness".split()
)
# A capitalised word after a lowercase one (and maybe a comma): where a name in the loose
# contexts starts. Most texts have few, and the word before rules most of those out.
_MID_SENTENCE_CAPITAL = re.compile(r"\b(?P<previous>[a-z][a-z-]*),? (?=[A-Z][a-zà-ÿ])")


def _loose_name_starts(text: str) -> Iterable[int]:
    """Where a capitalised word follows a word that a loose context ends with."""
    if not text.isascii():
        for capital in _MID_SENTENCE_CAPITAL.finditer(text):
            previous = capital.group("previous")
            if previous in _LOOSE_LAST_WORDS or previous.startswith("ex-"):
                yield capital.end()
        return
    shape = _case_shape(text)  # "a A": a lowercase letter, a space, a capital (and "a, A")
    for pattern, gap in (("a A", 2), ("a, A", 3)):
        position = shape.find(pattern)
        while position >= 0:
            word_start = text.rfind(" ", 0, position) + 1
            previous = text[word_start : position + 1].lower()
            if previous in _LOOSE_LAST_WORDS or previous.startswith("ex-"):
                yield position + gap
            position = shape.find(pattern, position + gap)


def _loose_trigger(text: str, start: int) -> str | None:
    """Which loose context (met, spoke, relative, named) the words before `start` make, if any."""
    words = text[max(0, start - 48) : start].lower().split()[-3:]
    if not words:
        return None
    words = [w.rstrip(",") for w in words]
    w1 = words[-1]
    w2 = words[-2] if len(words) > 1 else ""
    w3 = words[-3] if len(words) > 2 else ""
    if w1 in _MEETING_VERBS:
        return "met" if w1 == "met" else "meet"
    if w1 == "with" and (w2 in _MEETING_VERBS or (w2 == "up" and w3 in _MEETING_VERBS)):
        return "met" if "met" in (w2, w3) else "meet"
    if w1 in ("to", "with") and w2 in _CONVERSATION_VERBS:
        return "spoke"
    if w1 in ("named", "called") and w2 in _NAMED_NOUNS:
        return "named"
    relative = w1[3:] if w1.startswith("ex-") else w1
    if relative.endswith("s") and relative[:-1] in _RELATIVE_WORDS:
        relative = relative[:-1]
    if relative in _RELATIVE_WORDS and (w2 in _POSSESSIVES or (w2 in _RELATIVE_ADJECTIVES and w3 in _POSSESSIVES)):
        return "relative"
    return None


# "I met Anna" is a person, "Meet Jasper, our new bot" a product launch as often; after "talked
# to" one capitalised word is as often a team ("talked to Support").
_LOOSE_MIN_TOKENS = {"met": 1, "meet": 2, "spoke": 2, "relative": 1, "named": 1}
# The trigger scan costs ~30us per short text; these substrings (lowercased text, then titles
# in the original) are implied by every trigger and rule most texts out in ~2us.
_NAME_TRIGGER_HINTS = (
    "name", "i'm", "i’m", "i am", "call me", "this is", "dear", "hi ", "hi\t", "hello", "hey",
    "regards", "best", "cheers", "thank", "sincerely", "signed", "yours", "--", "—", "–",
    "from:", "to:", "cc:", "contact:",
)  # fmt: skip
_TITLE_HINTS = ("Mr", "Ms", "Mx", "Miss", "Dr", "Prof")
# One regex scan instead of a substring test per hint: the pre-check runs on every text.
_NAME_HINTS = re.compile("|".join(map(re.escape, _NAME_TRIGGER_HINTS)))
_TITLE_HINT = re.compile("|".join(_TITLE_HINTS))
_NAME_TOKEN = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")
_TITLES = frozenset("mr mrs ms mx miss dr prof professor".split())
_NAME_PARTICLES = frozenset("van von de der den del della da di du la le bin ibn al dos das".split())
# Words that follow the triggers above but are not names ("I'm Sorry", "Hi Team,").
_NOT_NAMES = frozenset(
    """
    a an the this that these those it its i me my mine you your we our us they them their he him
    his she her and or but nor so yet for of in on at to from by with about as into onto over under
    up down out off again also just only even still already always never ever now then here there
    today tonight tomorrow yesterday soon later not no yes ok okay sure fine good great well bad
    sorry happy glad sad afraid aware able unable ready done back home busy free new old sick tired
    stuck lost confused curious interested excited worried concerned pleased thankful grateful
    trying using going getting looking having working running building writing asking wondering
    thinking planning learning making doing taking reading hoping seeing coming leaving testing
    currently actually really very quite pretty totally kind sort bit little big super somewhat
    almost fairly rather too all any each every both either neither some many much more most few
    several everyone everybody anyone someone nobody team folks guys friends friend world sir madam
    colleagues customer customers client support admin user users sales hiring manager recruiter
    committee board human humans assistant bot ai claude chatgpt gpt gemini copilot siri alexa
    llama mistral model python java javascript rust english french german spanish italian dutch
    polish russian chinese japanese korean indian american british canadian australian brazilian
    mexican irish swedish european asian african monday tuesday wednesday thursday friday saturday
    sunday january february march april june july august september october november december
    morning afternoon evening night regards best cheers thanks thank sincerely please help
    question quick
    """.split()
)
# Month and weekday names that are also given names ("I'm April Castellanos"): a name when a
# second name follows.
_CALENDAR_NAMES = frozenset("january april june july august sunday monday".split())
# Capitalised words that the loose contexts meet but are no person's name.
_NOT_NAMES_LOOSE = _BRANDS | frozenset(
    """
    new york san los las santa claus north south east west central united states kingdom street
    road avenue university college school hospital clinic bank airport station hotel museum park
    lake river mount saint st city county state republic national international global general
    public royal legal marketing sales engineering finance hr it product design research operations
    security tech service services department office support customer government ministry council
    police army navy court god jesus christ allah buddha christmas easter thanksgiving halloween
    team group company corp inc ltd llc mom mum dad mother father grandma grandpa uncle aunt the
    prime minister president king queen prince princess pope chancellor senator governor mayor
    professor doctor director chief ceo cto cfo vp
    """.split()
)
# Lowercase words after "her name is" that describe the name ("spelled", "required").
_NOT_LOWERCASE_NAMES = frozenset(
    "wrong right correct incorrect missing long short weird unusual common rare unique different same "
    "similar there hard easy difficult funny strange simple beautiful important unknown misspelled "
    "spelt".split()
)
_ED_NAMES = frozenset("mohammed muhammed mohamed ahmed jared alfred wilfred winifred manfred siegfried".split())
_DESCRIPTIVE_NAME_SUFFIXES = ("ed", "ing", "ly", "ous", "able", "ible", "ful", "less", "ness", "ment", "tion")
_NAME_FOLLOWERS_GREETING = re.compile(r"[ \t]*(?:[,!:;\n]|$)")
_NAME_FOLLOWERS_LINE_END = re.compile(r"[ \t]*[.!]?[ \t]*(?:\n|$)")
_NAME_FOLLOWERS_HEADER = re.compile(r"[ \t]*(?:[,<(\n]|$)")
_NAME_FOLLOWERS_THIS_IS = re.compile(r",?\s+(?:from|speaking|here)\b", re.I)
_NAME_FOLLOWERS: dict[str, re.Pattern[str] | None] = {
    "introduction": None,
    "self": None,
    "title": None,
    "greeting": _NAME_FOLLOWERS_GREETING,
    "signoff": _NAME_FOLLOWERS_LINE_END,
    "signature": _NAME_FOLLOWERS_LINE_END,
    "header": _NAME_FOLLOWERS_HEADER,
    "this_is": _NAME_FOLLOWERS_THIS_IS,
}
_MAX_NAME_TOKENS = 4  # "Maria José García López"
_AFTER_TITLE = re.compile(r"\.?[ \t]+")
_NAME_GAP = re.compile(r"[ \t]+")
# Inner capitals in a name: McAllister, MacDonald, DeShawn, LaToya, O'Brien, Jean-Luc.
_NAME_INNER_CAPITAL = re.compile(r"^(?:Mc|Mac|De|Di|Da|La|Le|Van|Von|Du)[A-Z][a-z]+$")


def _lowercase_name(word: str) -> bool:
    lower = word.lower()
    if lower in _NOT_LOWERCASE_NAMES:
        return False
    return not (len(lower) >= 6 and lower.endswith(_DESCRIPTIVE_NAME_SUFFIXES) and lower not in _ED_NAMES)


def _strict_name(word: str) -> bool:
    """A capitalised word shaped like a name: Titlecase, or an inner capital names have."""
    if not word[0].isupper() or word.lower() in _NOT_NAMES_LOOSE:
        return False
    if word.endswith(("'s", "’s")):
        return False  # "met Google's CEO", "met Anna's mother": the person is someone else
    for part in re.split(r"['’-]", word):
        rest = part[1:]
        if rest and not rest.islower() and not _NAME_INNER_CAPITAL.match(part):
            return False  # GitHub, AWS, iPhone
    return True


def _name_span(text: str, start: int, allow_lowercase: bool, strict: bool = False) -> tuple[int, int, int] | None:
    """Span and count of up to four name tokens at `start` (after an optional title), or None."""
    position = start
    title = _NAME_TOKEN.match(text, position)
    if title and title.group().lower() in _TITLES:
        after_title = _AFTER_TITLE.match(text, title.end())
        if after_title:
            position = after_title.end()
    name_start = position
    name_end = None
    names = 0
    while names < _MAX_NAME_TOKENS:
        token = _NAME_TOKEN.match(text, position)
        if token is None:
            break
        word = token.group()
        lower = word.lower()
        if lower in _NAME_PARTICLES and name_end is not None:
            position = token.end()
        elif lower in _NOT_NAMES and not (names == 0 and _calendar_first_name(text, token)):
            break
        elif strict and not _strict_name(word):
            break
        elif not word[0].isupper() and not (allow_lowercase and _lowercase_name(word)):
            break
        else:
            names += 1
            name_end = position = token.end()
        gap = _NAME_GAP.match(text, position)
        if gap is None:
            break
        position = gap.end()
    if name_end is None:
        return None
    return name_start, name_end, names


def _calendar_first_name(text: str, token: re.Match[str]) -> bool:
    """'April' in "I'm April Castellanos": a month or weekday name followed by a surname."""
    word = token.group()
    if not (word[0].isupper() and word.lower() in _CALENDAR_NAMES):
        return False
    gap = _NAME_GAP.match(text, token.end())
    following = _NAME_TOKEN.match(text, gap.end()) if gap else None
    if following is None:
        return False
    return following.group().lower() not in _NOT_NAMES and _strict_name(following.group())


def _scrub_person_names(text: str) -> tuple[str, int]:
    spans: list[tuple[int, int]] = []
    if _NAME_HINTS.search(_lower(text)) or _TITLE_HINT.search(text):
        last_end = 0
        for trigger in _NAME_TRIGGER.finditer(text):
            if trigger.start() < last_end:
                continue
            kind = trigger.lastgroup
            assert kind is not None
            span = _name_span(text, trigger.end(), allow_lowercase=kind == "introduction")
            if span is None:
                continue
            follower = _NAME_FOLLOWERS[kind]
            if follower is not None and follower.match(text, span[1]) is None:
                continue
            spans.append(span[:2])
            last_end = span[1]
    lower = _lower(text)
    if "name" in lower and ("name is" in lower or "name's" in lower or "name’s" in lower):
        for trigger in _OTHER_NAME_TRIGGER.finditer(text):
            owner = trigger.group("owner")
            if owner is not None and owner.lower() not in _PEOPLE:
                continue
            span = _name_span(text, trigger.end(), allow_lowercase=True)
            if span is not None:
                spans.append(span[:2])
    if not _LOOSE_GATE.isdisjoint(_words(text)):
        for start in _loose_name_starts(text):
            kind = _loose_trigger(text, start)
            if kind is None:
                continue
            span = _name_span(text, start, allow_lowercase=False, strict=True)
            if span is not None and span[2] >= _LOOSE_MIN_TOKENS[kind]:
                spans.append(span[:2])
    if not spans:
        return text, 0
    return _replace_spans(text, spans, PiiType.PERSON.placeholder)


# --- scrubber ------------------------------------------------------------------------------------

# Each detector's cue, made of the constants its pre-checks test (tests/streams/test_pii.py holds
# every corpus and canary hit to its detector's cue).
_URL_SECRET_CUE = _Cue(text=("/", *_URL_HINTS))  # "://" and a scheme-less URL's path hold "/"
_SECRET_CUE = _Cue(
    text=(_PRIVATE_KEY_HINT, *_SECRET_TOKEN_HINTS, *_AUTH_HEADER_HINTS),
    lower=_SECRET_KEY_HINTS,
    words=_PROSE_KEYWORDS,
)
_EMAIL_CUE = _Cue(text=("@",), lower=(*_SPELLED_AT_BRACKETS, " at "))
_HANDLE_CUE = _Cue(text=("u/", "@"), words=_PLATFORM_GATE)
# Country code and check digits.
_IBAN_CUE = _Cue(shape=("aa99",), digit=True)
# 13+ digits, or a group of 4 and the next.
_CARD_CUE = _Cue(shape=("9" * 13, "9999 99", "9999-99"), digit=True)
_SSN_CUE = _Cue(lower=_SSN_ROOTS, shape=(_SSN_SHAPE,), digit=True)
_PASSPORT_CUE = _Cue(lower=("passport",), digit=True)
_BIRTH_DATE_CUE = _Cue(lower=_BIRTH_ROOTS, digit=True)
_IP_CUE = _Cue(text=(":",), shape=("9.9",), digit=True)  # IPv6 holds ":", IPv4 a digit, dot, digit
_PHONE_CUE = _Cue(
    text=(_INTERNATIONAL_PREFIX,),
    lower=(*_PHONE_KEYWORD_HINTS, *_NUMBER_WORD_HINTS),
    shape=("+9", *_NANP_SHAPES, *_TRUNK_SHAPES, "99999"),
    digit=True,
)
_ADDRESS_CUE = _Cue(
    text=_HOUSE_NUMBER_HINTS,
    lower=(*_STREET_TYPE_SUBSTRINGS, _PO_BOX_HINT, *_COMPOUND_SUFFIXES),
    words=_STREET_TYPE_WORDS | _ROMANCE_TYPES | _STREET_PREFIXES,
    digit=True,
)
_PERSON_CUE = _Cue(text=_TITLE_HINTS, lower=_NAME_TRIGGER_HINTS, words=_LOOSE_GATE)

# Order matters: a URL with user:pass@host must go before emails, secrets before the numeric
# detectors (keys contain digit runs), emails before handles (the "@"), IBANs before cards (an
# IBAN's tail can pass Luhn), cards, SSNs, passports, birth dates and IPs before phones, phones
# before addresses (a house number is no phone, but a phone after "at" is no house number).
# Placeholders hold no digits or '@', so later detectors skip them.
_DETECTORS: tuple[tuple[PiiType, Callable[[str], tuple[str, int]], _Cue], ...] = (
    (PiiType.URL_SECRET, _scrub_url_secrets, _URL_SECRET_CUE),
    (PiiType.SECRET, _scrub_secrets, _SECRET_CUE),
    (PiiType.EMAIL, _scrub_emails, _EMAIL_CUE),
    (PiiType.HANDLE, _scrub_handles, _HANDLE_CUE),
    (PiiType.IBAN, _scrub_ibans, _IBAN_CUE),
    (PiiType.CARD, _scrub_cards, _CARD_CUE),
    (PiiType.SSN, _scrub_ssns, _SSN_CUE),
    (PiiType.PASSPORT, _scrub_passports, _PASSPORT_CUE),
    (PiiType.DATE_OF_BIRTH, _scrub_birth_dates, _BIRTH_DATE_CUE),
    (PiiType.IP, _scrub_ips, _IP_CUE),
    (PiiType.PHONE, _scrub_phones, _PHONE_CUE),
    (PiiType.ADDRESS, _scrub_addresses, _ADDRESS_CUE),
    (PiiType.PERSON, _scrub_person_names, _PERSON_CUE),
)
_CUE_SCAN = _CueScan([cue for _, _, cue in _DETECTORS])


# --- optional second pass ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of a text that a second pass found to be `pii_type`."""

    start: int
    end: int
    pii_type: PiiType


class SecondPass(Protocol):
    """A detector run after the built-in ones, on their output (placeholders already in place).

    It returns the spans it finds, as `Span`s or `(start, end, type)` tuples where the type is a
    `PiiType` or its name; each span is replaced by its type's placeholder. A model-based
    detector (an NER model such as Presidio with a spaCy model) fits here where the image has
    one; see docs/privacy.md for an adapter.
    """

    def __call__(self, text: str, /) -> Iterable[Span | tuple[int, int, PiiType | str]]: ...


_PLACEHOLDER = re.compile("|".join(re.escape(t.placeholder) for t in PiiType))


def _apply_second_pass(
    text: str, second_pass: SecondPass, enabled: frozenset[PiiType]
) -> tuple[str, Counter[PiiType]]:
    spans = []
    for found in second_pass(text):
        span = found if isinstance(found, Span) else Span(found[0], found[1], PiiType(found[2]))
        if not 0 <= span.start < span.end <= len(text):
            raise ValueError(f"second pass returned {span} outside a text of {len(text)} characters")
        if span.pii_type in enabled:
            spans.append(span)
    # Placeholders stay as they are: a span that touches one is dropped, as is one overlapping
    # an earlier (or at the same start, longer) span.
    taken = [(m.start(), m.end()) for m in _PLACEHOLDER.finditer(text)]
    counts: Counter[PiiType] = Counter()
    pieces = []
    previous = 0
    for span in sorted(spans, key=lambda s: (s.start, -s.end)):
        if span.start < previous or any(span.start < end and start < span.end for start, end in taken):
            continue
        pieces.append(text[previous : span.start])
        pieces.append(span.pii_type.placeholder)
        previous = span.end
        counts[span.pii_type] += 1
    pieces.append(text[previous:])
    return "".join(pieces), counts


class Scrubber:
    """Replaces PII with typed placeholders; `enabled` selects the detectors (default: all).

    `second_pass`, off by default, runs after the built-in detectors (see `SecondPass`); its
    spans of types not in `enabled` are ignored.
    """

    def __init__(self, enabled: Iterable[PiiType] = tuple(PiiType), second_pass: SecondPass | None = None) -> None:
        self.enabled = frozenset(PiiType(t) for t in enabled)
        self.second_pass = second_pass
        self._detectors = [(1 << i, t, scrub) for i, (t, scrub, _) in enumerate(_DETECTORS) if t in self.enabled]

    def scrub(self, text: str) -> ScrubResult:
        counts: dict[PiiType, int] = {}
        cues = _CUE_SCAN(text)
        for bit, pii_type, scrub in self._detectors:
            if not cues & bit:
                if cues < bit:  # no cue of a later detector either
                    break
                continue
            text, count = scrub(text)
            if count:
                counts[pii_type] = count
                cues = _CUE_SCAN(text)  # values out, placeholders in
        if self.second_pass is not None:
            text, extra = _apply_second_pass(text, self.second_pass, self.enabled)
            for pii_type, count in extra.items():
                counts[pii_type] = counts.get(pii_type, 0) + count
        return ScrubResult(text=text, counts=counts)

    def scrub_messages(self, messages: Sequence[Mapping[str, Any]]) -> MessagesScrubResult:
        """Scrub OpenAI-style messages; returns copies, the input is left untouched.

        `content` may be a string or a list of parts; only `text` parts are scrubbed.
        Other fields (role, name, tool_calls) are copied as they are.
        """
        totals: Counter[PiiType] = Counter()
        scrubbed = []
        for message in messages:
            copy = dict(message)
            content = message.get("content")
            if isinstance(content, str):
                result = self.scrub(content)
                copy["content"] = result.text
                totals.update(result.counts)
            elif isinstance(content, list):
                parts = []
                for part in content:
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                        result = self.scrub(part["text"])
                        part = {**part, "text": result.text}
                        totals.update(result.counts)
                    parts.append(part)
                copy["content"] = parts
            scrubbed.append(copy)
        return MessagesScrubResult(messages=scrubbed, counts=dict(totals))
