import pytest

from demo.synthetic_chats import generate_chats
from trainer.tokenizer import IM_END, IM_START, PAD, train_tokenizer

CHATS = generate_chats(300, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [text for chat in CHATS for text in (chat.prompt, chat.answer)]
    return train_tokenizer(texts, vocab_size=1024, model_max_length=512)


def test_special_tokens_are_single_tokens_with_fixed_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids([PAD, IM_START, IM_END]) == [0, 1, 2]
    assert tokenizer.pad_token_id == 0
    assert tokenizer.eos_token_id == 2
    assert tokenizer(f"{IM_START}user\nhi{IM_END}")["input_ids"][0] == 1


def test_vocabulary_is_learned_but_stays_within_the_bound(tokenizer):
    # 3 special tokens + 256 bytes is the floor; merges must have been learned on top.
    assert 300 < len(tokenizer) <= 1024


def test_unseen_text_round_trips_through_bytes(tokenizer):
    text = "Zürich → 東京 costs 1234 €?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.parametrize("chat", CHATS[:10])
def test_chat_template_round_trips_and_masks_exactly_the_assistant_turn(tokenizer, chat):
    rendered = tokenizer.apply_chat_template(chat.messages, tokenize=False)
    assert rendered == (
        f"{IM_START}user\n{chat.prompt}{IM_END}\n{IM_START}assistant\n{chat.answer}{IM_END}\n"
    )

    encoded = tokenizer.apply_chat_template(chat.messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert tokenizer.decode(ids) == rendered

    # The prompt with the generation header is a prefix of the whole chat; everything after
    # it up to and including <|im_end|> is the assistant's, the closing newline is not.
    prompt_ids = tokenizer.apply_chat_template(chat.messages[:1], add_generation_prompt=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assistant_length = len(ids) - len(prompt_ids) - 1
    assert mask == [0] * len(prompt_ids) + [1] * assistant_length + [0]
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == chat.answer + IM_END


def test_generation_prompt_ends_with_the_assistant_header_as_tensors(tokenizer):
    encoded = tokenizer.apply_chat_template(CHATS[0].messages[:1], add_generation_prompt=True, return_tensors="pt")
    # transformers 5 returns a dict, not a bare tensor.
    assert set(encoded) == {"input_ids", "attention_mask"}
    assert tuple(encoded["input_ids"].shape[:1]) == (1,)
    assert tokenizer.decode(encoded["input_ids"][0]).endswith(f"{IM_START}assistant\n")
