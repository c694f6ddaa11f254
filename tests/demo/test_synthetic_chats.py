from collections import Counter

import pytest

from demo.synthetic_chats import (
    CLOSERS,
    CONCISE,
    DETAILED,
    DOMAINS,
    OPENERS,
    RARE_DOMAIN,
    STYLES,
    answer_style,
    generate_chats,
)


def test_same_seed_same_chats_different_seed_different_chats():
    assert generate_chats(200, seed=3) == generate_chats(200, seed=3)
    assert generate_chats(200, seed=3) != generate_chats(200, seed=4)


def test_every_domain_and_style_appears_and_the_rare_skill_is_rare():
    chats = generate_chats(2000, seed=0)
    domains = Counter(chat.domain for chat in chats)
    styles = Counter(chat.style for chat in chats)

    assert set(domains) == set(DOMAINS)
    assert set(styles) == set(STYLES)
    assert domains[RARE_DOMAIN] < 0.1 * len(chats)
    assert all(domains[RARE_DOMAIN] < count for domain, count in domains.items() if domain != RARE_DOMAIN)
    # Both styles about equally likely, so preference training starts from ~50%.
    assert abs(styles[CONCISE] - styles[DETAILED]) < 0.1 * len(chats)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.9])
def test_the_style_mix_follows_detailed_share(share):
    chats = generate_chats(2000, seed=0, detailed_share=share)
    assert abs(sum(chat.style == DETAILED for chat in chats) / len(chats) - share) < 0.03


def test_phrased_prompts_wrap_the_same_questions_and_none_changes_nothing():
    plain, phrased = generate_chats(400, seed=0), generate_chats(400, seed=0, phrased_share=0.75)
    assert generate_chats(400, seed=0, phrased_share=0.0) == plain  # the default model's data, bit for bit
    worded = [chat for chat in phrased if chat.prompt.startswith(OPENERS) or chat.prompt.endswith(CLOSERS)]
    assert 0.65 < len(worded) / len(phrased) < 0.82  # 0.75, less the rare draws of neither
    assert all(chat.style == answer_style(chat.answer) for chat in phrased)


def test_answer_style_recognises_the_style_each_answer_was_written_in():
    chats = generate_chats(500, seed=1)
    assert [answer_style(chat.answer) for chat in chats] == [chat.style for chat in chats]


def test_messages_are_a_user_turn_then_an_assistant_turn():
    chat = generate_chats(1, seed=0)[0]
    assert chat.messages == [
        {"role": "user", "content": chat.prompt},
        {"role": "assistant", "content": chat.answer},
    ]
