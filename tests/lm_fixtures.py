"""A tiny real tokenizer and tiny random causal LMs saved as local Hugging Face folders.

The tokenizer is a byte-level BPE trained on a few lines of text (vocabulary about 300) with a
ChatML chat template like SmolLM2's; the models are 2-layer Llamas. Everything is built in a
second and read through the same loaders as a real checkpoint (local folder), so the language
model paths run in the default test suite without the 135M teacher.
"""

from __future__ import annotations

from pathlib import Path

TEXT = """From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory:
But thou contracted to thine own bright eyes,
Feed'st thy light's flame with self-substantial fuel,
Making a famine where abundance lies,
Thy self thy foe, to thy sweet self too cruel.
A dog is a domesticated carnivorous mammal. A cat is a small feline. Define the word.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(folder: Path, vocab_size: int = 300):
    """Train a byte-level BPE tokenizer on :data:`TEXT` and save it to ``folder``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def llama_config(vocab_size: int, layers: int = 2, hidden: int = 32, **changes):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=2,
        bos_token_id=None,
    )
    fields.update(changes)
    return LlamaConfig(**fields)


def build_lm_folder(folder: Path, tokenizer_folder: Path, layers: int = 2, hidden: int = 32, seed: int = 0, **changes) -> Path:
    """A random Llama with the tokenizer of ``tokenizer_folder``, saved (with that tokenizer) to ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = llama_config(len(tokenizer), layers=layers, hidden=hidden, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **changes)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
