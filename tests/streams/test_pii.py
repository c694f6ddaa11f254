import copy
from collections import Counter

import pytest

from streams.pii import PiiType, Scrubber
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
