"""PII scrubber: replaces personal data and secrets in chat text with typed placeholders.

Pure, deterministic, no I/O. Runs on every event, so each detector is guarded by a cheap
substring pre-check and validated matches (Luhn, mod-97, octet ranges) keep precision up.
See docs/privacy.md for what is caught and what is missed.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any


class PiiType(StrEnum):
    URL_SECRET = "URL_SECRET"
    SECRET = "SECRET"
    EMAIL = "EMAIL"
    IBAN = "IBAN"
    CARD = "CARD"
    IP = "IP"
    PHONE = "PHONE"
    PERSON = "PERSON"

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


@lru_cache(maxsize=8)  # the detectors of one scrub() look at the same text in turn
def _shape(text: str) -> str:
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_SHAPE).decode("ascii")
    return _ASCII_LETTER.sub("a", _DIGIT.sub("9", text))


def _has_any(shape: str, pieces: tuple[str, ...]) -> bool:
    for piece in pieces:  # a plain loop: any() over a generator costs more than the tests
        if piece in shape:
            return True
    return False


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
_SECRET_TOKEN_HINT = re.compile(
    r"sk-|gh[pousr]_|github_pat_|glpat-|AKIA|ASIA|ABIA|ACCA|xox[abposr]-|AIza|k_live_|k_test_|eyJ"
)

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


def _scrub_secrets(text: str) -> tuple[str, int]:
    total = 0
    if "PRIVATE KEY-----" in text:
        text, count = _PRIVATE_KEY_BLOCK.subn(PiiType.SECRET.placeholder, text)
        total += count
    if _SECRET_TOKEN_HINT.search(text):
        text, count = _SECRET_TOKEN.subn(PiiType.SECRET.placeholder, text)
        total += count
    if "earer" in text or "uthorization:" in text:
        text, count = _substitute(_AUTH_HEADER, text, _auth_header)
        total += count
    lower = text.lower()
    if ("=" in text or ":" in text) and any(hint in lower for hint in _SECRET_KEY_HINTS):
        text, count = _substitute(_SECRET_ASSIGNMENT, text, _secret_assignment)
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
    if _URL_USER_PASSWORD.search(url) or _URL_SECRET_PARAM.search(url):
        return PiiType.URL_SECRET.placeholder + tail
    return None


def _scrub_url_secrets(text: str) -> tuple[str, int]:
    # "ww." also finds "Www." (phones capitalize a message's first word), "WW." finds "WWW.";
    # plain substring tests, as a case-blind regex search here costs several times more.
    if "://" not in text and "ww." not in text and "WW." not in text:
        return text, 0
    return _substitute(_URL, text, _url_secret)


# --- email -----------------------------------------------------------------------------------

# The lookbehind anchors the local part at a token start, keeping the scan linear.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[\w-]+\.)+[^\W\d_]{2,}(?![\w-]|\.[^\W\d_])")


def _scrub_emails(text: str) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    return _EMAIL.subn(PiiType.EMAIL.placeholder, text)


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


# --- IP addresses ------------------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:.]{3,45}(?![\w:])")


def _identifies_a_host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Loopback/unspecified/broadcast are in every code snippet and identify no one.
    return not (address.is_loopback or address.is_unspecified or str(address) == "255.255.255.255")


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
    r"|[1-9]\d{0,3}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,8}(?:[ .-]\d{1,8}){0,6})"
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
    r"(?i)\b(?:phone|ph|tel|telephone|mobile|cell|cellphone|call(?:\s+(?:me|us))?|text\s+me|whatsapp|fax|sms)\.?"
    r"(?:\s*(?:number|no\.?|#))?\s*(?:is|at|on|:|-)?\s*"
    r"(?P<phone>\+?\d[\d ().-]{5,17}\d)(?!\w|[.-]\d)"
)


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
_ZERO_PREFIXED = re.compile(r"00[1-9]|0\d{1,4}\)?[ ./-]\d\d")


def _may_be_phone_number(text: str) -> bool:
    shape = _shape(text)
    return "+9" in shape or _has_any(shape, _NANP_SHAPES) or (
        "0" in text and _ZERO_PREFIXED.search(text) is not None
    )


_PHONE_KEYWORD_HINTS = re.compile("ph|tel|mobile|cell|call|text|whatsapp|fax|sms")


def _scrub_phones(text: str) -> tuple[str, int]:
    total = 0
    if _may_be_phone_number(text):
        for pattern, replacement in _PHONE_PATTERNS:
            text, count = _substitute(pattern, text, replacement)
            total += count
    if _PHONE_KEYWORD_HINTS.search(text.lower()):
        text, count = _substitute(_PHONE_AFTER_KEYWORD, text, _phone_after_keyword)
        total += count
    return text, total


# --- person names --------------------------------------------------------------------------------
# No offline NER ships in a PyPI wheel (see docs/privacy.md), so names are only taken where the
# context says a name follows: introductions, greetings, sign-offs, headers and titles.

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


def _name_span(text: str, start: int, allow_lowercase: bool) -> tuple[int, int] | None:
    """Span of up to four name tokens at `start` (after an optional title), or None."""
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
        elif lower in _NOT_NAMES or not (word[0].isupper() or allow_lowercase):
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
    return name_start, name_end


def _scrub_person_names(text: str) -> tuple[str, int]:
    if not _NAME_HINTS.search(text.lower()) and not _TITLE_HINT.search(text):
        return text, 0
    spans: list[tuple[int, int]] = []
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
        spans.append(span)
        last_end = span[1]
    if not spans:
        return text, 0
    pieces = []
    previous = 0
    for start, end in spans:
        pieces.append(text[previous:start])
        pieces.append(PiiType.PERSON.placeholder)
        previous = end
    pieces.append(text[previous:])
    return "".join(pieces), len(spans)


# --- scrubber ------------------------------------------------------------------------------------

# Pieces of the shape (see _shape) one of which every match of a detector holds: most texts
# have none, and a detector that cannot match is skipped (the PII canary tests hold these to
# 100% recall).
_IBAN_SHAPES = ("aa99",)  # country code and check digits
_CARD_SHAPES = ("9" * 13, "9999 99", "9999-99")  # 13+ digits, or a group of 4 and the next
_DIGIT_SHAPES = ("9",)


def _needs(pieces: tuple[str, ...], scrub: Callable[[str], tuple[str, int]]) -> Callable[[str], tuple[str, int]]:
    def guarded(text: str) -> tuple[str, int]:
        return scrub(text) if _has_any(_shape(text), pieces) else (text, 0)

    return guarded


# Order matters: a URL with user:pass@host must go before emails, secrets before the numeric
# detectors (keys contain digit runs), IBANs before cards (an IBAN's tail can pass Luhn),
# cards and IPs before phones. Placeholders hold no digits or '@', so later detectors skip them.
_DETECTORS: tuple[tuple[PiiType, Callable[[str], tuple[str, int]]], ...] = (
    (PiiType.URL_SECRET, _scrub_url_secrets),
    (PiiType.SECRET, _scrub_secrets),
    (PiiType.EMAIL, _scrub_emails),
    (PiiType.IBAN, _needs(_IBAN_SHAPES, _scrub_ibans)),
    (PiiType.CARD, _needs(_CARD_SHAPES, _scrub_cards)),
    (PiiType.IP, _needs(_DIGIT_SHAPES, _scrub_ips)),
    (PiiType.PHONE, _needs(_DIGIT_SHAPES, _scrub_phones)),
    (PiiType.PERSON, _scrub_person_names),
)


class Scrubber:
    """Replaces PII with typed placeholders; `enabled` selects the detectors (default: all)."""

    def __init__(self, enabled: Iterable[PiiType] = tuple(PiiType)) -> None:
        self.enabled = frozenset(PiiType(t) for t in enabled)
        self._detectors = [(t, scrub) for t, scrub in _DETECTORS if t in self.enabled]

    def scrub(self, text: str) -> ScrubResult:
        counts: dict[PiiType, int] = {}
        for pii_type, scrub in self._detectors:
            text, count = scrub(text)
            if count:
                counts[pii_type] = count
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
