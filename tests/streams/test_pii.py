import copy
import json
from collections import Counter
from pathlib import Path

import pytest

from streams import pii
from streams.pii import PiiType, Scrubber, Span
from tests.streams.pii_canaries import CANARIES, NEAR_MISSES, Canary

SCRUBBER = Scrubber()


def _luhn_ok(number: str) -> bool:
    # Independent of streams.pii: double every second digit from the right via divmod.
    digits = [int(c) for c in number if c.isdigit()][::-1]
    return sum(d if i % 2 == 0 else sum(divmod(d * 2, 10)) for i, d in enumerate(digits)) % 10 == 0


def _iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "").upper()
    numeric = "".join(str(ord(c) - 55) if c.isalpha() else c for c in compact[4:] + compact[:4])
    return int(numeric) % 97 == 1


# --- the corpus itself ---------------------------------------------------------------------------


def test_corpus_seeds_every_type_with_at_least_ten_distinct_canaries():
    per_type = Counter(canary.pii_type for canary in CANARIES)
    assert set(per_type) == set(PiiType)
    assert min(per_type.values()) >= 10, per_type
    secrets = [canary.secret for canary in CANARIES]
    assert len(secrets) == len(set(secrets))


@pytest.mark.parametrize("canary", CANARIES, ids=lambda c: f"{c.pii_type}:{c.secret[:24]}")
def test_canary_secret_occurs_exactly_once_in_its_text(canary: Canary):
    assert canary.text.count(canary.secret) == 1


def test_card_and_iban_canaries_are_valid_numbers():
    for canary in CANARIES:
        if canary.pii_type is PiiType.CARD:
            assert _luhn_ok(canary.secret), canary.secret
        if canary.pii_type is PiiType.IBAN:
            assert _iban_ok(canary.secret), canary.secret


# --- detection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("canary", CANARIES, ids=lambda c: f"{c.pii_type}:{c.secret[:24]}")
def test_canary_is_replaced_by_its_typed_placeholder(canary: Canary):
    result = SCRUBBER.scrub(canary.text)
    assert result.text == canary.expected
    assert result.counts == {canary.pii_type: 1}


def test_scrub_rate_over_whole_corpus_is_total():
    leaked = [c.secret for c in CANARIES if c.secret in SCRUBBER.scrub(c.text).text]
    scrub_rate = 1 - len(leaked) / len(CANARIES)
    assert scrub_rate == 1.0, f"scrub rate {scrub_rate:.3f}, leaked: {leaked}"


def test_no_canary_survives_in_one_long_conversation():
    conversation = "\n\n".join(canary.text for canary in CANARIES)
    result = SCRUBBER.scrub(conversation)
    assert [c.secret for c in CANARIES if c.secret in result.text] == []
    assert result.counts == Counter(canary.pii_type for canary in CANARIES)


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_miss_is_left_alone(text: str):
    result = SCRUBBER.scrub(text)
    assert result.text == text
    assert result.counts == {}


def test_near_miss_false_positive_rate_is_zero():
    changed = [text for text in NEAR_MISSES if SCRUBBER.scrub(text).text != text]
    assert changed == [], f"false-positive rate {len(changed) / len(NEAR_MISSES):.3f}"


@pytest.mark.parametrize(
    ("valid", "invalid"),
    [
        ("card 4111 1111 1111 1111 ok", "card 4111 1111 1111 1112 ok"),  # Luhn
        ("iban DE89 3704 0044 0532 0130 00 ok", "iban DE88 3704 0044 0532 0130 00 ok"),  # mod-97
        ("host 203.0.113.255 ok", "host 203.0.113.256 ok"),  # octet range
        ("host 2001:db8::8a2e:370:7334 ok", "host 2001:db8::8a2e::7334 ok"),  # two '::'
    ],
)
def test_checksums_and_ranges_decide(valid: str, invalid: str):
    assert SCRUBBER.scrub(valid).total == 1
    assert SCRUBBER.scrub(invalid).text == invalid


def test_number_after_a_card_is_kept_and_the_card_still_removed():
    assert SCRUBBER.scrub("4111 1111 1111 1111 737 exp").text == "<CARD> 737 exp"


def test_counts_per_type_for_mixed_text():
    text = (
        "I'm Wilhelmina Ashcroft. Mail a.one@example.com or b.two@example.org, "
        "call +44 20 7946 0011 or (415) 555-0150, card 5555 5555 5555 4444, "
        "server 198.51.100.23, token sk-abc123def456ghi789jkl012mno."
    )
    result = SCRUBBER.scrub(text)
    assert result.counts == {
        PiiType.PERSON: 1,
        PiiType.EMAIL: 2,
        PiiType.PHONE: 2,
        PiiType.CARD: 1,
        PiiType.IP: 1,
        PiiType.SECRET: 1,
    }
    assert result.total == 8
    assert result.text == (
        "I'm <PERSON>. Mail <EMAIL> or <EMAIL>, call <PHONE> or <PHONE>, card <CARD>, "
        "server <IP>, token <SECRET>."
    )


def test_scrubbing_scrubbed_text_changes_nothing():
    for canary in CANARIES:
        once = SCRUBBER.scrub(canary.text).text
        again = SCRUBBER.scrub(once)
        assert (again.text, again.counts) == (once, {}), canary.text


def test_only_enabled_detectors_run():
    emails_only = Scrubber(enabled=[PiiType.EMAIL])
    text = "mail x.y@example.com or call +44 20 7946 0958, I'm Ottoline"
    assert emails_only.scrub(text).text == "mail <EMAIL> or call +44 20 7946 0958, I'm Ottoline"
    assert Scrubber(enabled=[]).scrub(text).text == text
    no_names = Scrubber(enabled=set(PiiType) - {PiiType.PERSON})
    assert no_names.scrub(text).text == "mail <EMAIL> or call <PHONE>, I'm Ottoline"


# --- messages helper -----------------------------------------------------------------------------


def test_scrub_messages_scrubs_string_and_text_part_content_and_sums_counts():
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Ottoline Frey, email o.frey@example.com"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "call me at +33 1 42 68 53 00"},
                {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}},
            ],
        },
    ]
    original = copy.deepcopy(messages)

    result = SCRUBBER.scrub_messages(messages)

    assert messages == original  # input untouched
    assert result.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is <PERSON>, email <EMAIL>"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1"}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "call me at <PHONE>"},
                {"type": "image_url", "image_url": {"url": "https://img.example.com/a.png"}},
            ],
        },
    ]
    assert result.counts == {PiiType.PERSON: 1, PiiType.EMAIL: 1, PiiType.PHONE: 1}
    assert result.total == 3


def test_scrub_messages_over_canary_conversation_leaks_nothing():
    messages = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": canary.text}
        for i, canary in enumerate(CANARIES)
    ]
    result = SCRUBBER.scrub_messages(messages)
    contents = "\n".join(message["content"] for message in result.messages)
    assert [c.secret for c in CANARIES if c.secret in contents] == []
    assert result.counts == Counter(canary.pii_type for canary in CANARIES)


# --- the sentence corpus (tests/streams/pii_corpus) ------------------------------------------------

CORPUS = Path(__file__).parent / "pii_corpus"


def _jsonl(name: str) -> list[dict]:
    with open(CORPUS / name, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


PII_SENTENCES = _jsonl("pii.jsonl")
ORDINARY_SENTENCES = [row["text"] for row in _jsonl("ordinary.jsonl")]


def _values(row: dict) -> list[str]:
    return [row["pii"]] if isinstance(row["pii"], str) else row["pii"]


def _removed(row: dict, scrubbed: str) -> bool:
    """Every PII value of the sentence is gone and its class's placeholder is there."""
    return all(value not in scrubbed for value in _values(row)) and PiiType(row["type"]).placeholder in scrubbed


def test_sentence_corpus_is_well_formed_and_covers_every_class():
    assert len(PII_SENTENCES) >= 150 and len(ORDINARY_SENTENCES) >= 300
    assert {PiiType(row["type"]) for row in PII_SENTENCES} == set(PiiType)
    for row in PII_SENTENCES:
        assert all(value and value in row["text"] for value in _values(row)), row
    texts = [row["text"] for row in PII_SENTENCES] + ORDINARY_SENTENCES
    assert len(texts) == len(set(texts))


def test_recall_on_the_sentence_corpus_is_at_least_95_percent_per_class():
    totals: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    missed = []
    for row in PII_SENTENCES:
        scrubbed = SCRUBBER.scrub(row["text"]).text
        totals[row["type"]] += 1
        if _removed(row, scrubbed):
            removed[row["type"]] += 1
        else:
            missed.append(scrubbed)
    recall = {kind: removed[kind] / totals[kind] for kind in totals}
    report = ", ".join(f"{kind} {removed[kind]}/{totals[kind]}" for kind in sorted(totals))
    assert min(recall.values()) >= 0.95, f"{report}; missed: {missed}"


def test_ordinary_sentences_of_the_corpus_are_left_unchanged():
    changed = {text: SCRUBBER.scrub(text).text for text in ORDINARY_SENTENCES}
    assert {text: out for text, out in changed.items() if out != text} == {}


def test_scrubbing_the_scrubbed_corpus_changes_nothing():
    for row in PII_SENTENCES:
        once = SCRUBBER.scrub(row["text"]).text
        assert SCRUBBER.scrub(once).text == once, row["text"]


# --- validation of the new classes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("valid", "invalid"),
    [
        ("SSN 219-09-9999 ok", "SSN 000-09-9999 ok"),  # area 000
        ("SSN 665-12-3456 ok", "SSN 666-12-3456 ok"),  # area 666
        ("the W-2 shows 412-58-3307 ok", "the W-2 shows 912-58-3307 ok"),  # area 9xx (ITINs)
        ("ssn 412-58-3307 ok", "ssn 412-00-3307 ok"),  # group 00
        ("ssn 412-58-3307 ok", "ssn 412-58-0000 ok"),  # serial 0000
        ("born on 29 February 1984", "born on 29 February 1985"),  # leap years only
        ("born on 30 April 1990", "born on 31 April 1990"),
        ("DOB: 1985-03-12", "DOB: 1985-13-12"),  # no 13th month
        ("date of birth 12/25/1990", "date of birth 25/25/1990"),  # day-first or month-first
        ("my number is 555-0199", "my number is 555-019"),  # 7 digits at least
        ("passport number X1234567", "passport number X1234"),  # too short
        ("passport number P4401876", "passport number PASSWORD"),  # needs digits
        ("the pin is 4821", "the pin is 48"),
    ],
)
def test_new_classes_validate_what_they_replace(valid: str, invalid: str):
    counts = SCRUBBER.scrub(valid).counts
    assert sum(counts.values()) == 1, valid
    (pii_type,) = counts
    # Not taken for that class (000-09-9999 is still a trunk-0 phone number to the phone detector).
    assert pii_type not in SCRUBBER.scrub(invalid).counts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SSN 341-22-7810", "SSN <SSN>"),
        ("passport no. 533912847 expires", "passport no. <PASSPORT> expires"),
        ("born on 12 March 1985 in Lyon", "born on <DATE_OF_BIRTH> in Lyon"),
        ("follow me on twitter @jess_codes_22", "follow me on twitter <HANDLE>"),
        ("my insta is lena.travels, I post there", "my insta is <HANDLE>, I post there"),
        ("maria dot lopez at gmail dot com", "<EMAIL>"),
        ("mail j.harrow [at] fastmail [dot] com", "mail <EMAIL>"),
        ("my password is hunter2, why", "my password is <SECRET>, why"),
        ("I met Tobias Fennimore there", "I met <PERSON> there"),
        ("their name is Harriet Quinlan", "their name is <PERSON>"),
        ("Ship to 27 Oak Avenue, Denver, CO 80203 today", "Ship to <ADDRESS> today"),
        ("webhook https://hooks.slack.com/services/T0/B0/AbCdEf123456", "webhook <URL_SECRET>"),
        ("my mobile is 9876543210", "my mobile is <PHONE>"),
    ],
)
def test_new_detectors_replace_only_the_value(text: str, expected: str):
    assert SCRUBBER.scrub(text).text == expected


@pytest.mark.parametrize(
    "text",
    [
        "@dataclass(frozen=True) and @property on a class",  # decorators without a platform
        "my insta is private",  # describes the account
        "look at example.com for a sample",  # a website, not an address
        "download it at python dot org",
        "the password is wrong, it says invalid",
        "the password must be 12 characters",
        "I have 3 Google Drive accounts",
        "I met Google's CEO at the booth",
        "Our cat's name is Pepper.",
        "Compute 9876543210 divided by 7.",  # ten digits, no phone word
        "My order number is 5829301174.",
        "The subnet mask is 255.255.255.0.",
    ],
)
def test_near_misses_of_the_new_classes_are_left_alone(text: str):
    assert SCRUBBER.scrub(text).text == text


def test_ten_digits_are_a_phone_only_with_a_phone_word_in_the_sentence():
    assert SCRUBBER.scrub("it's 6505550178, text me").text == "it's <PHONE>, text me"
    assert SCRUBBER.scrub("it's 6505550178, thanks").text == "it's 6505550178, thanks"


# --- optional second pass --------------------------------------------------------------------------


def _find(word: str, pii_type: PiiType | str):
    def second_pass(text: str):
        start = text.find(word)
        return [] if start < 0 else [(start, start + len(word), pii_type)]

    return second_pass


def test_second_pass_is_off_by_default():
    assert Scrubber().second_pass is None
    text = "I talked to Zorblax yesterday."
    assert SCRUBBER.scrub(text).text == text


def test_second_pass_spans_are_replaced_and_counted_after_the_built_in_detectors():
    scrubber = Scrubber(second_pass=_find("Zorblax", "PERSON"))
    result = scrubber.scrub("I talked to Zorblax, mail z@example.com")
    assert result.text == "I talked to <PERSON>, mail <EMAIL>"
    assert result.counts == {PiiType.PERSON: 1, PiiType.EMAIL: 1}

    spans = Scrubber(second_pass=lambda text: [Span(0, 3, PiiType.ADDRESS)])
    assert spans.scrub("Elm Road").text == "<ADDRESS> Road"


def test_second_pass_cannot_break_placeholders_or_add_disabled_types():
    over_placeholder = Scrubber(second_pass=_find("EMAIL", PiiType.PERSON))
    assert over_placeholder.scrub("mail z@example.com").text == "mail <EMAIL>"
    emails_only = Scrubber(enabled=[PiiType.EMAIL], second_pass=_find("Zorblax", PiiType.PERSON))
    assert emails_only.scrub("I talked to Zorblax").text == "I talked to Zorblax"
    overlapping = Scrubber(second_pass=lambda text: [(0, 7, "PERSON"), (4, 11, "PERSON")])
    assert overlapping.scrub("Zorblax Quinn").text == "<PERSON> Quinn"


def test_second_pass_span_outside_the_text_is_an_error():
    with pytest.raises(ValueError, match="outside"):
        Scrubber(second_pass=lambda text: [(0, len(text) + 1, "PERSON")]).scrub("short")


# --- the cue scan ----------------------------------------------------------------------------------
# Scrubber skips a detector whose cue a text lacks (streams.pii._CueScan). These tests run every
# detector on every text regardless and hold the scan to it.

_ALL_TEXTS = [c.text for c in CANARIES] + list(NEAR_MISSES) + [r["text"] for r in PII_SENTENCES]
_ALL_TEXTS += ORDINARY_SENTENCES
_CASINGS = {"as written": str, "lower": str.lower, "upper": str.upper, "title": str.title, "swapcase": str.swapcase}


def _every_detector(text: str) -> tuple[str, dict[PiiType, int]]:
    counts = {}
    for pii_type, detector, _cue in pii._DETECTORS:
        text, count = detector(text)
        if count:
            counts[pii_type] = count
    return text, counts


@pytest.mark.parametrize("casing", _CASINGS.values(), ids=_CASINGS.keys())
def test_skipping_detectors_without_their_cue_changes_no_result(casing):
    differ = {}
    for text in map(casing, _ALL_TEXTS):
        result = SCRUBBER.scrub(text)
        expected = _every_detector(text)
        if (result.text, result.counts) != expected:
            differ[text] = (result.text, expected[0])
    assert differ == {}


@pytest.mark.parametrize("casing", _CASINGS.values(), ids=_CASINGS.keys())
def test_every_detector_that_finds_something_has_its_cue_in_the_text(casing):
    missing = []
    for text in map(casing, _ALL_TEXTS):
        cues = pii._CUE_SCAN(text)
        for index, (pii_type, detector, _cue) in enumerate(pii._DETECTORS):
            if detector(text)[1] and not cues >> index & 1:
                missing.append((pii_type, text))
    assert missing == []
    assert len(_ALL_TEXTS) > 900


def test_a_cue_is_found_in_the_text_its_lowercased_form_or_its_shape_and_in_words():
    scan = pii._CueScan(
        [pii._Cue(text=("Dr",)), pii._Cue(lower=("born",)), pii._Cue(shape=("9.9",)), pii._Cue(words=frozenset({"met"}))]
    )
    assert scan("Dr Who") == 0b0001 and scan("dr who") == 0
    assert scan("BORN in May") == 0b0010
    assert scan("version 1.2") == 0b0100 and scan("1. 2") == 0
    assert scan("I MET him") == 0b1000 and scan("metal") == 0
    assert scan("Dr, born 1.2, met") == 0b1111
