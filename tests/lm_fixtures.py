"""A tiny real tokenizer and tiny random causal LMs saved as local Hugging Face folders.

The tokenizer is a byte-level BPE trained on a few lines of text (vocabulary about 300) with a
ChatML chat template like SmolLM2's; the models are 2-layer Llamas. Everything is built in a
second and read through the same loaders as a real checkpoint (local folder), so the language
model paths run in the default test suite without the 135M teacher.
"""

from __future__ import annotations

import json
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
    vocab_size = changes.pop("vocab_size", len(tokenizer))
    config = llama_config(vocab_size, layers=layers, hidden=hidden, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **changes)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


WORDS = ["dog", "cat", "rose", "flame", "fuel", "heir", "eyes", "time", "beauty", "memory", "famine", "self"]


def write_preference_pairs(path: Path, count: int) -> Path:
    """``count`` preference pairs as ``preference_jsonl`` lines: ``Define <word>.``, chosen ``the <word>
    is a <word>``, rejected ``the <another word> burns with fuel``; the folder is created."""
    lines = []
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        lines.append(json.dumps({"prompt": f"Define {word}.", "chosen": f"the {word} is a {word}",
                                 "rejected": f"the {WORDS[(i + 5) % len(WORDS)]} burns with fuel"}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_chat_dataset(*, tokenizer: str, samples: int = 48, length: int = 40, plain: bool = False):
    """A small instruction data set ("Define <word>." -> a short answer) tokenized with the chat
    template of ``tokenizer`` (a folder), labels on the answer tokens only; ``plain=True`` gives
    packed plain-text blocks instead (every token a target). Import path for YAML:
    ``tests.lm_fixtures:tiny_chat_dataset``."""
    import torch
    from transformers import AutoTokenizer

    from distill.data.base import IGNORE_INDEX, ArraySplit, RawDataset
    from distill.models.causal_lm import tokenizer_hash

    tok = AutoTokenizer.from_pretrained(tokenizer)
    ids = torch.full((samples, length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((samples, length), IGNORE_INDEX, dtype=torch.long)
    stream = tok(TEXT * 8).input_ids
    for i in range(samples):
        if plain:
            block = stream[i % 50 : i % 50 + length]
            ids[i, : len(block)] = torch.tensor(block)
            labels[i, : len(block) - 1] = torch.tensor(block[1:])
            continue
        word = WORDS[i % len(WORDS)]
        answer = f"the {word} is {WORDS[(i * 7 + 3) % len(WORDS)]}"
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Define {word}."}], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        full = prompt + tok(answer).input_ids + [tok.eos_token_id]
        full = full[:length]
        ids[i, : len(full)] = torch.tensor(full)
        for t in range(len(prompt) - 1, len(full) - 1):
            labels[i, t] = full[t + 1]
    meta = {"tokenizer": str(tokenizer), "tokenizer_hash": tokenizer_hash(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    return RawDataset("tiny_chat", ArraySplit(ids, labels), None, len(tok), task="lm", meta=meta)


def tiny_lm_experiment(paths: dict, output_dir, *, terms=None, **changes):
    """A one-stage experiment distilling the tiny teacher folder into a 1-layer student from a config."""
    experiment = {
        "name": "tiny_lm",
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {
            "dataset": "tests.lm_fixtures:tiny_chat_dataset",
            "params": {"tokenizer": str(paths["tokenizer"])},
            "batch_size": 8,
            "eval_batch_size": 16,
            "val_fraction": 0.2,
            "test_fraction": 0.2,
        },
        "models": {
            "teacher": {"arch": "hf_causal_lm", "params": {"source": str(paths["teacher"])}},
            "student": {
                "arch": "hf_causal_lm",
                "params": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "max_position_embeddings": 128}},
            },
        },
        "optimizer": {"name": "adamw", "lr": 0.003},
        "training": {"epochs": 2},
        "evaluation": {"latency": False},
        "compare": {"metric": "perplexity"},
        "stages": [
            {
                "name": "kd",
                "model": "student",
                "teacher": "teacher",
                "objective": {"terms": terms or [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}]},
            }
        ],
    }
    experiment.update(changes)
    return experiment
