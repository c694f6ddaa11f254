import json
import random
import re
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from demo.synthetic_chats import DOMAINS, STYLES, generate_chats, make_chat
from trainer import rehearsal
from trainer.base_model import METADATA_FILE, BaseModelConfig, build_base_model, weights_sha256
from trainer.tokenizer import CHAT_TEMPLATE, IM_END

# The builder takes any chats; the toy world's are at hand.
CHATS = [chat.messages for chat in generate_chats(800, seed=7)]
# Enough pretraining to learn the chat format (~10-20 s on 2 shared cores).
SMALL = BaseModelConfig(seed=7, train_steps=120)
# Only for weight-hash checks: a few steps suffice for the hash to depend on everything.
TINY = BaseModelConfig(train_steps=3)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The SMALL model, built once, with the loss of every pretraining step."""
    losses = []
    path = build_base_model(tmp_path_factory.mktemp("base"), CHATS, SMALL, rehearsal_chats=CHATS[:3],
                            data={"source": "test"}, on_step=lambda step, loss: losses.append(loss))  # fmt: skip
    return path, losses


@pytest.fixture(scope="module")
def loaded(built):
    path, _ = built
    # Offline by conftest and by local_files_only: a hub lookup would fail the test.
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return tokenizer, model


def test_loads_back_as_a_standard_servable_llama(built, loaded):
    path, _ = built
    tokenizer, model = loaded
    im_end = tokenizer.convert_tokens_to_ids(IM_END)

    assert isinstance(model, LlamaForCausalLM)
    assert 500_000 < model.num_parameters() < 3_000_000
    assert model.config.max_position_embeddings >= 512
    assert not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == im_end == tokenizer.eos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATE

    metadata = json.loads((path / METADATA_FILE).read_text())
    assert metadata["seed"] == SMALL.seed
    assert BaseModelConfig(**metadata["config"]) == SMALL and metadata["data"] == {"source": "test"}
    assert metadata["weights_sha256"] == weights_sha256(path)
    assert metadata["parameters"] == model.num_parameters()
    assert rehearsal.load(path) == CHATS[:3]


def test_saved_weights_are_the_trained_ones(loaded):
    tokenizer, model = loaded
    held_out = generate_chats(32, seed=12345)
    batch = tokenizer.apply_chat_template(
        [chat.messages for chat in held_out], padding=True, return_tensors="pt", return_dict=True
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        loss = model(**batch, labels=labels).loss.item()
    # An untrained model sits at ~ln(vocab) ~ 6.8.
    assert loss < 1.5


def test_training_loss_decreased(built):
    path, losses = built
    assert len(losses) == SMALL.train_steps
    assert statistics.mean(losses[-10:]) < 0.25 * statistics.mean(losses[:10])
    metadata = json.loads((path / METADATA_FILE).read_text())
    assert (metadata["first_loss"], metadata["final_loss"]) == (losses[0], losses[-1])


def test_generation_is_well_formed_and_on_topic(loaded):
    tokenizer, model = loaded
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    rng = random.Random(99)
    on_topic_fractions = []
    for domain in DOMAINS:
        # Every word the generator ever uses for this domain, in either style.
        vocabulary = {w for _ in range(300) for w in words(make_chat(domain, rng.choice(STYLES), rng).answer)}
        prompt = make_chat(domain, STYLES[0], rng).prompt
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = model.generate(**encoded, max_new_tokens=80, do_sample=False)
        answer_ids = output[0, encoded["input_ids"].shape[1] :].tolist()

        assert answer_ids[-1] == im_end, f"{domain}: {tokenizer.decode(answer_ids)!r} does not end with {IM_END}"
        assert im_end not in answer_ids[:-1]
        answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
        answer_words = words(answer)
        assert answer_words, f"{domain}: empty answer"
        on_topic_fractions.append(sum(w in vocabulary for w in answer_words) / len(answer_words))
    assert statistics.mean(on_topic_fractions) >= 0.8, on_topic_fractions


def test_same_chats_and_seed_same_weights_different_seed_or_chats_different_weights(tmp_path):
    chats = CHATS[:100]
    first = weights_sha256(build_base_model(tmp_path / "first", chats, TINY))
    again = weights_sha256(build_base_model(tmp_path / "again", chats, TINY))
    other = weights_sha256(build_base_model(tmp_path / "other", chats, TINY.model_copy(update={"seed": TINY.seed + 1})))
    others = weights_sha256(build_base_model(tmp_path / "others", CHATS[100:200], TINY))
    assert first == again
    assert first != other and first != others


def test_determinism_flag_is_restored(tmp_path):
    torch.use_deterministic_algorithms(False)
    build_base_model(tmp_path / "model", CHATS[:100], TINY)
    assert not torch.are_deterministic_algorithms_enabled()
