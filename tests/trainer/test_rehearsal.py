"""Rehearsal chats: written with the base model, drawn per batch, never the gate's items."""

from demo.suites import toy_suites
from demo.synthetic_chats import RARE_DOMAIN, generate_chats
from trainer import rehearsal


def test_the_base_model_keeps_its_rare_skill_chats_for_rehearsal(trained_base):
    chats = rehearsal.load(trained_base)
    expected = [c.messages for c in generate_chats(2000, 0) if c.domain == RARE_DOMAIN]
    assert chats == expected and len(chats) > 20


def test_a_batch_draws_the_same_chats_each_time_and_never_a_gate_item(trained_base):
    chats = rehearsal.load(trained_base)
    gate_prompts = {prompt for suite in toy_suites() for prompt in suite.prompts}
    assert any(chat[0]["content"] in gate_prompts for chat in chats), "the fact space is shared: exclusion matters"
    first = rehearsal.draw(chats, 20, "batch-p0-000001", exclude=gate_prompts)
    assert len(first) == 20 and first == rehearsal.draw(chats, 20, "batch-p0-000001", exclude=gate_prompts)
    assert not {r.messages[0].content for r in first} & gate_prompts
    assert first != rehearsal.draw(chats, 20, "batch-p0-000002", exclude=gate_prompts)
    assert {r.source for r in first} == {"rehearsal"}


def test_no_file_means_no_rehearsal(tmp_path):
    assert rehearsal.load(tmp_path) == [] and rehearsal.draw([], 20, "batch-1", exclude=set()) == []
