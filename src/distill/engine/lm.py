"""The language-model parts of the engine: tokenizer checks, token-level evaluation, and
completions generated during training (on-policy and sequence-level distillation).

Token batches follow :class:`distill.data.base.ArraySplit`'s convention: right-padded ids and
shifted labels (``IGNORE_INDEX`` where a position is not a target), so the same objective terms
as for classifiers run on ``[B, T, V]`` logits with ``batch.mask`` saying which positions count.
The training loop sums each term over the valid tokens and divides by the number of valid
tokens in the whole optimizer step (all micro-batches, all processes), so gradient accumulation
and padding do not change the gradient (normalizing per micro-batch would weight a token of a
short micro-batch more than one of a long one).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from distill.data.base import IGNORE_INDEX, ArraySplit
from distill.engine.batches import local_slice

#: Elements of one evaluation chunk of logits (float32): 2^26 = 256 MB.
EVAL_CHUNK_ELEMENTS = 1 << 26

_tokenizer_hashes: dict[str, str] = {}


def _model_tokenizer_hash(source: str) -> str:
    from distill.models.causal_lm import load_tokenizer, tokenizer_hash

    if source not in _tokenizer_hashes:
        _tokenizer_hashes[source] = tokenizer_hash(load_tokenizer(source))
    return _tokenizer_hashes[source]


def check_language_models(data: Any, models: dict[str, torch.nn.Module], log: Any = None) -> int | None:
    """Check that every model reads the data's tokens; returns the shared vocabulary limit (or None).

    * every model must be a :class:`~distill.models.causal_lm.CausalLM`;
    * a model loaded from a ``source`` must use the data's tokenizer (same token -> id map and
      special tokens): a different tokenizer is an error (cross-tokenizer distillation needs a
      token alignment this version does not provide);
    * every output matrix needs at least as many rows as the tokenizer has tokens; when models pad
      their matrices differently (e.g. 151936 vs 152064 rows for one tokenizer), logits are cut to
      the shared range, which holds every real token, so the extra rows are never targets (the
      data's labels were checked to lie below the tokenizer's size).
    """
    from distill.models.causal_lm import CausalLM

    vocab = int(data.num_classes)
    data_hash = data.meta.get("tokenizer_hash")
    sizes = {}
    for role, model in models.items():
        if not isinstance(model, CausalLM):
            raise ValueError(
                f"the data set '{data.name}' holds token sequences, but the {role} is a {type(model).__name__}; "
                "language-model data needs `arch: hf_causal_lm` models"
            )
        if model.source is not None and data_hash is not None:
            model_hash = _model_tokenizer_hash(model.source)
            if model_hash != data_hash:
                raise ValueError(
                    f"the {role} (source '{model.source}') uses a different tokenizer from the data "
                    f"(tokenizer '{data.meta.get('tokenizer')}'): their vocabularies or special tokens differ. "
                    "Distilling across tokenizers is not supported; tokenize the data with the teacher's tokenizer "
                    "and give the student the same vocabulary"
                )
        sizes[role] = model.vocab_size
        if model.vocab_size < vocab:
            raise ValueError(
                f"the {role} has {model.vocab_size} output rows but the tokenizer has {vocab} tokens; "
                f"build it with vocab_size >= {vocab}"
            )
    limit = None
    if len(set(sizes.values())) > 1:
        limit = min(sizes.values())
        for model in models.values():
            model.vocab_limit = limit if model.vocab_size != limit else None
        if log is not None:
            listing = ", ".join(f"{role} {size}" for role, size in sizes.items())
            log(f"output matrices differ in size ({listing}) for one tokenizer of {vocab} tokens: logits use the shared {limit} rows")
    return limit


def valid_token_count(labels: torch.Tensor) -> int:
    return int((labels != IGNORE_INDEX).sum())


def sequence_count(labels: torch.Tensor) -> int:
    """Sequences with at least one target: rows of ``[B, T]``, pairs (or groups) of ``[B, K, T]``.

    Sequence-level terms (a loss whose ``unit`` is ``"sequence"``, e.g. REDI) are divided by this
    count over the whole optimizer step instead of the number of tokens."""
    valid = (labels != IGNORE_INDEX).reshape(labels.shape[0], -1)
    return int(valid.any(dim=1).sum())


def trim_padding(input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the trailing columns where no row has a target (right padding shared by the batch).

    Works on ``[B, T]`` and on preference pairs ``[B, 2, T]`` (any leading dims)."""
    valid = (labels != IGNORE_INDEX).reshape(-1, labels.shape[-1]).any(dim=0)
    if not bool(valid.any()):
        return input_ids[..., :1], labels[..., :1]
    last = int(valid.nonzero().max()) + 2  # the last target's position, plus the token it predicts
    return input_ids[..., :last], labels[..., :last]


@torch.inference_mode()
def lm_metrics(
    model: torch.nn.Module,
    split: ArraySplit,
    context: Any,
    *,
    reference: torch.nn.Module | None = None,
    autocast_dtype: Any = None,
) -> dict[str, float]:
    """Token-level metrics of ``model`` on ``split``, over its valid (target) tokens.

    ``nll`` (mean negative log-likelihood, nats/token), ``perplexity`` (``exp(nll)``), ``accuracy``
    (top-1 next-token), ``tokens``; with a ``reference`` (the teacher): ``kl_to_teacher``, the
    forward KL(teacher || model) per token at temperature 1, and ``agreement``, the share of tokens
    where both predict the same top-1 token. Sums are in float64 and reduced over processes.
    """
    device = context.device
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # nll, correct, tokens, kl, agree
    indices = local_slice(torch.arange(len(split)), context.world_size, context.rank)
    tokens_per_row = int(split.inputs[0].numel()) if len(split) else 1  # T, or 2T for preference pairs
    vocab = int(context.data.num_classes)
    rows_per_chunk = max(1, EVAL_CHUNK_ELEMENTS // max(1, tokens_per_row * vocab))
    autocast = dict(device_type=device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    try:
        for chunk in torch.split(indices, rows_per_chunk):
            input_ids, labels = trim_padding(split.inputs[chunk], split.labels[chunk])
            mask = labels != IGNORE_INDEX
            if not bool(mask.any()):
                continue
            # preference pairs [B, 2, T] are scored as 2B sequences
            input_ids, labels = input_ids.reshape(-1, input_ids.shape[-1]), labels.reshape(-1, labels.shape[-1])
            mask = labels != IGNORE_INDEX
            input_ids, labels, mask = input_ids.to(device), labels.to(device), mask.to(device)
            with torch.autocast(**autocast):
                logits = model(input_ids)
            log_q = F.log_softmax(logits[mask].float(), dim=-1)
            targets = labels[mask]
            sums[0] += float(-log_q.gather(1, targets[:, None]).sum())
            predictions = log_q.argmax(-1)
            sums[1] += float((predictions == targets).sum())
            sums[2] += float(targets.numel())
            if reference is not None:
                with torch.autocast(**autocast):
                    teacher_logits = reference(input_ids)
                log_p = F.log_softmax(teacher_logits[mask].float(), dim=-1)
                sums[3] += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
                sums[4] += float((log_p.argmax(-1) == predictions).sum())
            del logits, log_q
    finally:
        model.train(was_training)
    if context.world_size > 1:
        sums = context.accelerator.reduce(sums.to(device), reduction="sum").cpu()
    tokens = max(float(sums[2]), 1.0)
    nll = float(sums[0]) / tokens
    metrics = {
        "nll": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "accuracy": float(sums[1]) / tokens,
        "tokens": int(sums[2]),
    }
    if reference is not None:
        metrics["kl_to_teacher"] = float(sums[3]) / tokens
        metrics["agreement"] = float(sums[4]) / tokens
    return metrics


# -- completions generated during training --------------------------------------------------------


def prompt_lengths(labels: torch.Tensor, prompt_tokens: int | None) -> torch.Tensor:
    """Per row, how many leading tokens form the prompt: up to and including the position that
    predicts the first target (chat/instruction data), or ``prompt_tokens`` for plain text where
    every token is a target."""
    targets = labels != IGNORE_INDEX
    first = torch.where(targets.any(1), targets.int().argmax(1), torch.full_like(targets[:, 0], labels.shape[1], dtype=torch.long))
    lengths = first + 1
    if prompt_tokens is not None:
        return torch.full_like(lengths, prompt_tokens)
    if bool((first == 0).any()):
        raise ValueError(
            "generate: the batch has rows whose first token is already a target (plain text), so there is no "
            "prompt to complete; set generate.prompt_tokens to use the first tokens of each row as its prompt"
        )
    return lengths


@torch.no_grad()
def generate_completions(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    spec: Any,
    *,
    pad_token_id: int,
    eos_token_id: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each row's completion by one that ``model`` samples from the row's prompt.

    Prompts are left-padded for generation (with an attention mask) and decoded with the KV cache
    (``temperature`` 0 is greedy, otherwise sampling with ``top_p``), at most ``max_new_tokens``
    tokens, stopping at EOS. Returns right-padded ``input_ids`` and shifted ``labels`` whose targets
    are exactly the generated tokens (the EOS included when one was generated).
    """
    from distill.models.causal_lm import CausalLM

    hf_model = model.model if isinstance(model, CausalLM) else model
    lengths = prompt_lengths(labels, spec.prompt_tokens).tolist()
    rows = input_ids.shape[0]
    width = max(lengths)
    prompts = input_ids.new_full((rows, width), pad_token_id)
    attention = torch.zeros((rows, width), dtype=torch.long, device=input_ids.device)
    for row, length in enumerate(lengths):
        prompts[row, width - length :] = input_ids[row, :length]
        attention[row, width - length :] = 1
    was_training = hf_model.training
    hf_model.eval()
    try:
        sampling = spec.temperature > 0
        output = hf_model.generate(
            input_ids=prompts,
            attention_mask=attention,
            max_new_tokens=spec.max_new_tokens,
            do_sample=sampling,
            temperature=spec.temperature if sampling else None,
            top_p=spec.top_p if sampling else None,
            top_k=0 if sampling else None,
            use_cache=True,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        )
    finally:
        hf_model.train(was_training)
    generated = output[:, width:]
    sequences: list[torch.Tensor] = []
    completion_lengths: list[int] = []
    for row, length in enumerate(lengths):
        tokens = generated[row]
        if eos_token_id is not None:
            stops = (tokens == eos_token_id).nonzero()
            if stops.numel():
                tokens = tokens[: int(stops[0]) + 1]
        sequences.append(torch.cat([input_ids[row, :length], tokens]))
        completion_lengths.append(int(tokens.numel()))
    total = max(int(s.numel()) for s in sequences)
    new_ids = input_ids.new_full((rows, total), pad_token_id)
    new_labels = torch.full((rows, total), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for row, (sequence, length, completion) in enumerate(zip(sequences, lengths, completion_lengths)):
        new_ids[row, : sequence.numel()] = sequence
        if completion:
            # position t predicts token t + 1: the completion's tokens are targets of positions length-1 ...
            new_labels[row, length - 1 : length - 1 + completion] = sequence[length : length + completion]
    return new_ids, new_labels


def generation_draw(seed: int, stage: str, step: int) -> float:
    """The uniform draw that decides whether optimizer step ``step`` generates (a pure function of
    the seed, stage and step, so a resumed run makes the same choices)."""
    from distill.engine.batches import derive_seed

    generator = torch.Generator().manual_seed(derive_seed(seed, "generate", stage, step))
    return float(torch.rand((), generator=generator))


# -- task accuracy: greedy answers checked by a rule -----------------------------------------------


def decode_targets(tokenizer: Any, labels: torch.Tensor) -> list[str]:
    """Each row's target tokens (labels that are not ``IGNORE_INDEX``: its completion) decoded,
    special tokens skipped."""
    return [tokenizer.decode(row[row != IGNORE_INDEX].tolist(), skip_special_tokens=True) for row in labels]


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module,
    split: ArraySplit,
    context: Any,
    spec: Any,
    *,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Share of rows whose greedy completion states the reference answer (a rule-checked task).

    Each row's prompt (everything before its first target) is completed greedily by ``model``
    (at most ``spec.max_new_tokens`` tokens, stopping at EOS); the answer is read from the
    completion and from the row's reference completion with :func:`distill.rewards.extract_answer`
    (``spec.pattern``, ``spec.normalize``), and the row counts as right when both are found and
    equal. Returns ``answer_accuracy``, ``answer_format`` (share of completions where the pattern
    was found) and ``answer_rows``. The first ``spec.limit`` rows of the split are used (all when
    ``None``), in batches of ``spec.batch_size``.
    """
    from types import SimpleNamespace

    from distill.models.causal_lm import load_tokenizer
    from distill.rewards import extract_answer

    meta = context.data.meta
    if tokenizer is None:
        tokenizer = load_tokenizer(str(meta["tokenizer"]))
    rows = len(split) if spec.limit is None else min(len(split), int(spec.limit))
    indices = local_slice(torch.arange(rows), context.world_size, context.rank)
    decode = SimpleNamespace(temperature=0.0, top_p=1.0, max_new_tokens=int(spec.max_new_tokens), prompt_tokens=None)
    sums = torch.zeros(3, dtype=torch.float64)  # right, formatted, rows
    for chunk in torch.split(indices, max(1, int(spec.batch_size))):
        input_ids, labels = trim_padding(split.inputs[chunk], split.labels[chunk])
        references = decode_targets(tokenizer, labels)
        new_ids, new_labels = generate_completions(
            model, input_ids.to(context.device), labels.to(context.device), decode,
            pad_token_id=int(meta.get("pad_token_id", 0)), eos_token_id=meta.get("eos_token_id"),
        )
        completions = decode_targets(tokenizer, new_labels.cpu())
        for completion, reference in zip(completions, references):
            answer = extract_answer(completion, spec.pattern, normalize=spec.normalize)
            expected = extract_answer(reference, spec.pattern, normalize=spec.normalize)
            sums[0] += float(answer is not None and answer == expected)
            sums[1] += float(answer is not None)
            sums[2] += 1.0
    if context.world_size > 1:
        sums = context.accelerator.reduce(sums.to(context.device), reduction="sum").cpu()
    total = max(float(sums[2]), 1.0)
    return {"answer_accuracy": float(sums[0]) / total, "answer_format": float(sums[1]) / total, "answer_rows": int(sums[2])}
