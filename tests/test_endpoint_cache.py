"""Teacher caches from a black-box endpoint: the tiny teacher served by ``distill serve`` on localhost."""

from __future__ import annotations

import argparse
import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rich.console import Console

from distill.blackbox import EndpointSpec, TeacherAPIError, TeacherClient
from distill.cache import topk
from distill.cache.endpoint import (
    EndpointCacheError,
    build_endpoint_cache,
    command_cache_endpoint,
    row_prompt,
    row_request,
    row_top_k,
    tail_logmass,
)
from distill.cache.store import StoreError
from distill.cache.teacher import TeacherCache, build_teacher_caches, open_for_stage
from distill.config import load_experiment
from distill.data import load_data
from distill.engine.runner import run_experiment
from distill.serve.server import TeacherServer
from tests.conftest import write_yaml
from tests.lm_fixtures import build_tokenizer, tiny_lm_experiment

KEY = "sk-endpoint-cache-91c3f0aa"
K = 20


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, no_proxy: None) -> None:
    monkeypatch.setenv("TEACHER_KEY", KEY)


@pytest.fixture(scope="module")
def served(served_lm) -> Iterator[TeacherServer]:
    """The teacher behind a key, answering up to the whole vocabulary's logprobs per position."""
    model, tokenizer, name = served_lm
    with TeacherServer(model, tokenizer, name=name, api_key=KEY, max_batch_size=8, batch_wait_ms=5, max_logprobs=300) as server:
        yield server


def _experiment_dict(tiny_lm: dict, folder: Path) -> dict:
    experiment = tiny_lm_experiment(tiny_lm, folder)
    experiment["data"]["params"]["samples"] = 80
    return experiment


@pytest.fixture(scope="module")
def setting(tiny_lm, tmp_path_factory) -> tuple[Any, Any]:
    experiment = load_experiment(_experiment_dict(tiny_lm, tmp_path_factory.mktemp("runs")))
    return experiment, load_data(experiment.data)


def spec(server: TeacherServer, **fields: Any) -> EndpointSpec:
    return EndpointSpec(base_url=server.url, model=server.name, api_key_env="TEACHER_KEY", **fields)


def decoded(path: Path, data: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(logprobs, ids, tails, per-row counts) of every record of a cache, in row order."""
    cache = TeacherCache(path)
    records, counts = cache.reader.read(np.arange(len(data.train)))
    values, ids, tails = topk.decode(records, cache.k, cache.vocab, cache.value_bits)
    return values, ids, tails, counts


def targets(data: Any, rows: range) -> int:
    """Rows with at least one target among ``rows``: those the endpoint is asked about."""
    return int((data.train.labels[rows.start : rows.stop] != -100).any(dim=1).sum())


def distinct_prompts(data: Any) -> int:
    """Different prompts among the training rows (the tiny data set repeats its rows)."""
    return len({tuple(row_prompt(data.train.inputs[i], data.train.labels[i])[0]) for i in range(len(data.train))} - {()})


# -- the cache equals the local one -----------------------------------------------------------------


def test_the_endpoint_cache_equals_the_cache_of_the_same_model_run_locally(setting, served, tmp_path: Path) -> None:
    experiment, data = setting
    local = build_teacher_caches(
        experiment, {tmp_path / "local8": (K, 8), tmp_path / "local16": (K, 16)}, teacher="teacher", data=data, shard_rows=16
    )
    responses = tmp_path / "responses"
    exact = build_endpoint_cache(experiment, tmp_path / "ep16", endpoint=spec(served, cache_dir=responses), k=K,
                                 value_bits=16, shard_rows=16, data=data)
    rows, distinct = targets(data, range(len(data.train))), distinct_prompts(data)
    assert distinct < rows
    # one request per distinct row prompt (repeated rows are answered once) and two probes
    assert exact["stats"]["last_run_requests"] == distinct + 2
    assert exact["stats"]["last_run_cache_hits"] == rows - distinct
    # the 8-bit cache asks nothing again: every row's answer is in the response cache
    coarse = build_endpoint_cache(experiment, tmp_path / "ep8", endpoint=spec(served, cache_dir=responses), k=K,
                                  value_bits=8, shard_rows=16, data=data)
    assert coarse["stats"]["last_run_requests"] == 2 and coarse["stats"]["last_run_cache_hits"] == rows

    # the same store: kind, rows, record size, meta (but the teacher), tokens
    reference = local[str(tmp_path / "local16")]
    for key in ("kind", "rows", "shard_rows", "record_bytes", "complete"):
        assert exact[key] == reference[key], key
    assert exact["meta"]["teacher"] == {"endpoint": "teacher", "base_url": served.url}
    assert exact["meta"]["teacher_weights_sha256"] is None
    assert {k: v for k, v in exact["meta"].items() if not k.startswith("teacher")} == {
        k: v for k, v in reference["meta"].items() if not k.startswith("teacher")
    }
    assert exact["stats"]["tokens"] == reference["stats"]["tokens"] == int((data.train.labels != -100).sum())
    # the key reaches neither the manifests nor the response cache
    for file in [*tmp_path.glob("ep*/manifest.json"), *responses.rglob("*.json")]:
        assert KEY not in file.read_text()

    for bits in (16, 8):
        values, ids, tails, counts = decoded(tmp_path / f"ep{bits}", data)
        local_values, local_ids, local_tails, local_counts = decoded(tmp_path / f"local{bits}", data)
        assert np.array_equal(counts, local_counts)  # every row holds its own targets: no shift, none lost
        assert torch.equal(ids, local_ids)  # the same top-k at every target token: no off-by-one
        d = local_values.max(dim=1, keepdim=True).values - local_values
        span = d.max(dim=1, keepdim=True).values
        # one float16 step of the stored tail moves every value by up to ~1e-3 here (the tail is
        # log(1 - 0.07); d log(top mass) / d tail = -14); 8 bits add two quantization levels
        bound = 2e-3 + (0 if bits == 16 else 2 * (d * span).sqrt() / 255)
        assert bool(((values - local_values).abs() <= bound).all()), (values - local_values).abs().max()
        torch.testing.assert_close(tails, local_tails, atol=2e-4, rtol=0)

    cache = TeacherCache(tmp_path / "ep16")
    cache.check(data)  # no model named: the tokenizer and the split are what is checked
    assert cache.summary()["teacher"] == f"endpoint 'teacher' at {served.url}"


# -- training from it --------------------------------------------------------------------------------


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stages" / "kd" / "model.safetensors"))


def test_a_stage_trains_from_an_endpoint_cache_as_from_the_live_teacher(tiny_lm, setting, served, tmp_path: Path) -> None:
    """k = V: sparse_kd from the endpoint's cache takes the step forward KL with the live teacher takes."""
    experiment, data = setting
    build_endpoint_cache(experiment, tmp_path / "full", endpoint=spec(served), k=300, value_bits=16, shard_rows=32, data=data)
    settings = {"optimizer": {"name": "sgd", "lr": 0.5}, "training": {"epochs": 1, "max_steps": 2}}
    live = _experiment_dict(tiny_lm, tmp_path / "live")
    live.update(copy.deepcopy(settings))
    live["stages"][0]["objective"] = {"terms": [{"name": "kd", "loss": "forward_kl"}]}
    cached = _experiment_dict(tiny_lm, tmp_path / "cached")
    cached.update(copy.deepcopy(settings))
    cached["stages"][0]["teacher"] = {"cache": str(tmp_path / "full")}
    cached["stages"][0]["objective"] = {"terms": [{"name": "kd", "loss": "sparse_kd", "params": {"tail": "bucket"}}]}
    live_weights = _final(run_experiment(load_experiment(live)).run_dir)
    cached_weights = _final(run_experiment(load_experiment(cached)).run_dir)
    for name in live_weights:
        torch.testing.assert_close(cached_weights[name], live_weights[name], atol=2e-4, rtol=1e-3)

    # a stage cannot also name a teacher model: no weight hash can be checked over HTTP
    with pytest.raises(StoreError, match=r"made from the endpoint 'teacher' at http://127\.0\.0\.1:\d+/v1.*remove `model`"):
        open_for_stage(tmp_path / "full", data, experiment, "teacher")
    cached["stages"][0]["teacher"]["model"] = "teacher"
    cached["output_dir"] = str(tmp_path / "named")
    with pytest.raises(StoreError, match="cannot be checked against models.teacher"):
        run_experiment(load_experiment(cached))
    assert not list((tmp_path / "named").rglob("model.safetensors"))


# -- resuming ----------------------------------------------------------------------------------------


class Interrupt(Exception):
    """Stands for the process being killed."""


def test_an_interrupted_cache_run_resumes_without_asking_twice(served_lm, setting, tmp_path: Path) -> None:
    experiment, data = setting
    model, tokenizer, name = served_lm
    shard_rows, stop_at = 8, 20  # stopped partway through the third shard
    # batches of one: each answer depends on its prompt alone, so runs can be compared byte for byte
    with TeacherServer(model, tokenizer, name=name, api_key=KEY, max_batch_size=1, batch_wait_ms=0) as server:
        reference = build_endpoint_cache(experiment, tmp_path / "reference", endpoint=spec(server), k=K,
                                         shard_rows=shard_rows, data=data)
        seen: list[int] = []

        def progress(done: int, total: int) -> None:
            seen.append(done)
            if done >= stop_at:
                raise Interrupt

        client = TeacherClient(spec(server, cache_dir=tmp_path / "responses", max_concurrency=1))
        with pytest.raises(Interrupt):
            build_endpoint_cache(experiment, tmp_path / "cache", endpoint=client, k=K, shard_rows=shard_rows, data=data,
                                 progress=progress)
        answered = seen[-1] - 2 * shard_rows  # rows of the third shard answered (and cached) before the stop
        assert answered >= 1
        written = json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"]
        assert [s["index"] for s in written] == [0, 1]
        with pytest.raises(StoreError, match="incomplete"):
            TeacherCache(tmp_path / "cache")

        lines: list[str] = []
        resumed = build_endpoint_cache(experiment, tmp_path / "cache", endpoint=spec(server, cache_dir=tmp_path / "responses"),
                                       k=K, shard_rows=shard_rows, data=data, log=lines.append)
    assert f"{2 * shard_rows} of {len(data.train)} rows already cached; asking the endpoint for the other" in " ".join(lines)
    asked = targets(data, range(2 * shard_rows, len(data.train)))  # the first two shards are not asked again
    stats = resumed["stats"]
    assert stats["last_run_requests"] + stats["last_run_cache_hits"] == asked + 2
    assert stats["last_run_cache_hits"] >= answered
    # the same shards, byte for byte, as the uninterrupted run's: no row twice, none missing
    assert [(s["rows"], s["sha256"]) for s in resumed["shards"]] == [(s["rows"], s["sha256"]) for s in reference["shards"]]
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    # started again on a finished cache, it asks nothing, not even the probes
    again = build_endpoint_cache(experiment, tmp_path / "cache", endpoint=spec(server), k=K, shard_rows=shard_rows, data=data)
    assert again["stats"]["last_run_requests"] == 0
    # other settings on the same folder are refused, naming the field
    with pytest.raises(StoreError, match=r"made with other settings \(record_bytes differs: 40 there, 33 now\)"):
        build_endpoint_cache(experiment, tmp_path / "cache", endpoint=spec(server), k=16, shard_rows=shard_rows, data=data)


# -- refusals ----------------------------------------------------------------------------------------


def test_an_endpoint_with_another_tokenizer_is_refused_before_anything_is_written(served_lm, setting, tmp_path: Path) -> None:
    experiment, data = setting
    model, _, name = served_lm
    other = build_tokenizer(tmp_path / "other-tokenizer", vocab_size=280)
    refused = pytest.raises(EndpointCacheError, match=r"does not use the data's tokenizer .*first different at token")
    with TeacherServer(model, other, name=name, api_key=KEY) as server, refused as caught:
        build_endpoint_cache(experiment, tmp_path / "cache", endpoint=spec(server), k=K, data=data)
    assert "tokenize the data with the served model's" in str(caught.value)
    assert not (tmp_path / "cache").exists()


def test_an_endpoint_that_cannot_return_k_logprobs_is_refused(served_lm, setting, tmp_path: Path) -> None:
    experiment, data = setting
    model, tokenizer, name = served_lm
    with TeacherServer(model, tokenizer, name=name, api_key=KEY) as server:  # the usual limit: 20
        with pytest.raises(TeacherAPIError, match=r"refuses logprobs=32: lower k or raise its limit.*--max-logprobs 32") as caught:
            build_endpoint_cache(experiment, tmp_path / "cache", endpoint=spec(server), k=32, data=data)
        assert caught.value.status == 400
        # a server that answers with fewer than k tokens per position (silently capped) is refused too
        prompt, positions = row_prompt(data.train.inputs[0], data.train.labels[0])
        response = TeacherClient(spec(server)).complete(**row_request(prompt, 5))
    with pytest.raises(EndpointCacheError, match="returned [56] most likely tokens at position .*fewer than k=8"):
        row_top_k(response, prompt, positions, 8, data.num_classes, where="training row 0")
    assert not (tmp_path / "cache").exists()


def test_responses_that_break_the_conventions_are_refused(served, setting) -> None:
    _, data = setting
    prompt, positions = row_prompt(data.train.inputs[3], data.train.labels[3])
    response = TeacherClient(spec(served)).complete(**row_request(prompt, 4))
    values, ids = row_top_k(response, prompt, positions, 4, data.num_classes)
    assert values.shape == ids.shape == (len(positions), 4)
    assert (np.diff(values, axis=1) <= 0).all()  # most likely first
    # position t reads echoed entry t + 1, which ranks the token that follows
    entries = response["choices"][0]["logprobs"]
    for row, position in enumerate(positions.tolist()):
        top = entries["top_logprobs"][position + 1]
        assert top[f"token_id:{ids[row, 0]}"] == max(top.values())

    def broken(change: Any) -> dict:
        copied = copy.deepcopy(response)
        change(copied["choices"][0]["logprobs"])
        return copied

    def text_tokens(block: dict) -> None:
        block["tokens"] = [token.replace("token_id:", "") for token in block["tokens"]]

    def shifted(block: dict) -> None:  # a first token with a logprob: another alignment
        block["token_logprobs"][0] = -1.0
        block["top_logprobs"][0] = {"token_id:5": -1.0}

    def with_bos(block: dict) -> None:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            block[key] = block[key][:1] + block[key]

    def foreign_id(block: dict) -> None:
        block["top_logprobs"][int(positions[0]) + 1] = {f"token_id:{300 + i}": -0.1 * (i + 3) for i in range(4)}

    with pytest.raises(EndpointCacheError, match="ignores return_tokens_as_token_ids"):
        row_top_k(broken(text_tokens), prompt, positions, 4, data.num_classes)
    with pytest.raises(EndpointCacheError, match="does not follow OpenAI's echo convention"):
        row_top_k(broken(shifted), prompt, positions, 4, data.num_classes)
    with pytest.raises(EndpointCacheError, match="changed the token-id prompt"):
        row_top_k(broken(with_bos), prompt, positions, 4, data.num_classes)
    with pytest.raises(EndpointCacheError, match="token id 300 among the most likely, outside the data's vocabulary 0..299"):
        row_top_k(broken(foreign_id), prompt, positions, 4, data.num_classes)


def test_the_tail_is_the_mass_outside_the_top_k_clamped_to_float32_resolution() -> None:
    values = np.log(np.array([[0.5, 0.25], [0.6, 0.4], [0.7, 0.3000001]]))
    tails = tail_logmass(values, 2, 300)
    assert tails[0] == pytest.approx(np.log(0.25))
    assert tails[1] == tails[2] == pytest.approx(np.log(2 * 2.0**-23))  # nothing left, or rounding below zero
    assert np.isneginf(tail_logmass(values, 300, 300)).all()


def test_the_command_writes_the_cache_from_flags(tiny_lm, served, tmp_path: Path) -> None:
    experiment = _experiment_dict(tiny_lm, tmp_path / "runs")
    experiment["cache"] = {"teacher": "teacher", "path": str(tmp_path / "from-section"), "shard_rows": 32}
    config = write_yaml(tmp_path / "exp.yaml", experiment)
    args = argparse.Namespace(
        config=str(config), overrides=[], endpoint=served.url, endpoint_model=None, api_key_env="TEACHER_KEY",
        out=None, k=None, value_bits=None, shard_rows=None, no_progress=True, teacher=None,
    )
    output = io.StringIO()
    assert command_cache_endpoint(args, Console(file=output, width=200)) == 0
    manifest = json.loads((tmp_path / "from-section" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["meta"]["k"] == 20 and manifest["shard_rows"] == 32  # k: the API default
    assert manifest["meta"]["teacher"] == {"endpoint": "teacher", "base_url": served.url}  # the name from /models
    assert KEY not in output.getvalue()
    args.teacher = "teacher"
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match="give one of them"):
        command_cache_endpoint(args, Console(file=io.StringIO()))
    args.teacher, args.endpoint = None, "ftp://example.org/v1"
    with pytest.raises(ConfigError, match="--endpoint: must be an http:// or https:// URL"):
        command_cache_endpoint(args, Console(file=io.StringIO()))
