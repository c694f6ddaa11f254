"""A byte-level BPE chat tokenizer trained locally, with a ChatML chat template.

Byte-level BPE can encode any text, so users typing outside the synthetic domains never
hit unknown tokens. The chat template marks the assistant turn with
``{% generation %}`` so ``apply_chat_template(..., return_assistant_tokens_mask=True)``
yields assistant-only loss masks for SFT/DPO later.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Order fixes the ids: pad=0, im_start=1, im_end=2.
SPECIAL_TOKENS = (PAD, IM_START, IM_END)

# ChatML. The assistant's closing <|im_end|> sits inside the generation block: the model
# must learn to emit it, since it is the end-of-sequence token at serving time.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Role names appear in every rendered chat; the BPE should see them as ordinary words.
_ROLE_NAMES = ("system", "user", "assistant")


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it as a chat tokenizer.

    ``vocab_size`` is an upper bound: a small corpus may run out of merges before it.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front, so every string stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([*_ROLE_NAMES, *texts], trainer=trainer)

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
