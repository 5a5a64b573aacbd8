"""Offline teacher caches: the top-k encoding, the sharded store, building, verifying, training from one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cache import topk
from distill.cache.store import ShardedReader, ShardedWriter, StoreError
from distill.cache.teacher import TeacherCache, build_teacher_cache, split_fingerprint
from distill.config import load_experiment
from distill.data import load_data
from distill.engine.lm import trim_padding
from distill.engine.runner import run_experiment
from distill.models.build import build_model
from tests.conftest import ROOT, write_yaml
from tests.lm_fixtures import tiny_lm_experiment

# -- the record encoding ---------------------------------------------------------------------------


def _zipf_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Logits shaped like a language model's: a few likely tokens, a long tail."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.rand(rows, vocab, generator=generator).argsort(dim=1).float() + 1
    return -1.1 * ranks.log() * 3 + torch.randn(rows, vocab, generator=generator) * 0.3


def test_record_size_at_k128_of_a_49152_token_vocabulary_is_300_bytes() -> None:
    assert topk.record_bytes(128, 49152, 8) == 300  # 168 (ids) + 128 (values) + 4 (header)
    assert topk.record_bytes(128, 49152, 16) == 428
    assert topk.record_bytes(1, 49152, 8) == 8
    # Elias-Fano ids beat plain 16-bit ids whenever k is much smaller than the vocabulary
    for k in (8, 32, 128):
        assert topk.record_bytes(k, 49152, 8) - 4 - k < 2 * k


@pytest.mark.parametrize("k,vocab,bits", [(128, 49152, 8), (32, 49152, 16), (7, 300, 8), (300, 300, 8), (1, 1000, 8)])
def test_records_round_trip_ids_exactly_and_values_within_the_quantization_bound(k: int, vocab: int, bits: int) -> None:
    logits = _zipf_logits(40, vocab)
    values, ids, tail = topk.top_k(logits, k)
    records = topk.encode(values, ids, tail, vocab, bits)
    assert records.shape == (40, topk.record_bytes(k, vocab, bits)) and records.dtype == np.uint8
    decoded, decoded_ids, decoded_tail = topk.decode(records, k, vocab, bits)
    order = ids.argsort(dim=1)
    assert torch.equal(decoded_ids, ids.gather(1, order))  # ids exact, ascending
    exact = values.gather(1, order).double()
    d = exact.max(dim=1, keepdim=True).values - exact
    span = d.max(dim=1, keepdim=True).values
    levels = (1 << bits) - 1
    # the quantization bound on each d, plus the error normalization carries to every entry (the
    # probability-weighted mean of those bounds), plus the float16 header's (span, tail) rounding
    per_entry = (d * span).sqrt() / levels + span / (4 * levels**2)
    carried = (torch.softmax(-d, dim=1) * per_entry).sum(dim=1, keepdim=True)
    bound = per_entry + carried + 1e-3
    assert bool(((decoded.double() - exact).abs() <= bound).all())
    if k < vocab:
        torch.testing.assert_close(decoded_tail, tail, atol=2e-3 * tail.abs().max().item(), rtol=0)
        # the decoded top-k mass is exactly 1 - tail
        mass = decoded.double().exp().sum(dim=1) + decoded_tail.double().exp()
        torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-6, rtol=0)
    else:
        assert bool(torch.isinf(decoded_tail).all())


def test_tail_mass_is_computed_without_cancellation() -> None:
    logits = torch.full((1, 1000), -40.0)
    logits[0, :3] = torch.tensor([10.0, 9.0, 8.0])
    _, _, tail = topk.top_k(logits, 3)
    expected = math.log(997) - 40 - torch.logsumexp(torch.tensor([10.0, 9.0, 8.0]), 0).item()
    assert tail.item() == pytest.approx(expected, abs=1e-4)  # about exp(-50): float32 1 - sum would give -inf


def test_a_record_with_a_damaged_id_bitmap_is_refused() -> None:
    values, ids, tail = topk.top_k(_zipf_logits(2, 500), 16)
    records = topk.encode(values, ids, tail, 500, 8)
    records[0, topk.low_bits(16, 500) * 16 // 8] ^= 0xFF
    with pytest.raises(ValueError, match="bitmap"):
        topk.decode(records, 16, 500, 8)


def test_encoding_refuses_bad_ids() -> None:
    values = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="distinct"):
        topk.encode(values, torch.tensor([[1, 1, 2]]), torch.zeros(1), 10, 8)
    with pytest.raises(ValueError, match="0..9"):
        topk.encode(values, torch.tensor([[1, 2, 10]]), torch.zeros(1), 10, 8)


# -- the sharded store -----------------------------------------------------------------------------


def _rows(start: int, end: int, width: int = 4) -> list[np.ndarray]:
    return [np.full((row % 3, width), row % 251, dtype=np.uint8) for row in range(start, end)]


def _write_store(path: Path, rows: int = 10, shard_rows: int = 4, meta: dict | None = None, stop_after: int | None = None) -> ShardedWriter:
    writer = ShardedWriter(path, "test", meta or {"source": "a"}, num_rows=rows, shard_rows=shard_rows, record_bytes=4)
    for count, (index, start, end) in enumerate(writer.pending()):
        if stop_after is not None and count == stop_after:
            return writer
        writer.write_shard(index, _rows(start, end))
    writer.finish()
    return writer


def test_store_reads_back_rows_in_any_order(tmp_path: Path) -> None:
    _write_store(tmp_path / "s")
    reader = ShardedReader(tmp_path / "s", kind="test", verify=True)
    assert reader.rows == 10 and len(reader.entries) == 3
    records, counts = reader.read(np.array([7, 0, 5, 2]))
    assert counts.tolist() == [1, 0, 2, 2]
    expected = np.concatenate([_rows(r, r + 1)[0] for r in (7, 0, 5, 2)])
    assert np.array_equal(records, expected)
    with pytest.raises(IndexError, match="row 10 out of range"):
        reader.read(np.array([10]))


def test_an_interrupted_store_is_refused_then_finished_without_recomputing(tmp_path: Path) -> None:
    _write_store(tmp_path / "s", stop_after=2)
    with pytest.raises(StoreError, match="incomplete"):
        ShardedReader(tmp_path / "s")
    writer = ShardedWriter(tmp_path / "s", "test", {"source": "a"}, num_rows=10, shard_rows=4, record_bytes=4)
    assert [index for index, _, _ in writer.pending()] == [2]
    index, start, end = writer.pending()[0]
    writer.write_shard(index, _rows(start, end))
    writer.finish()
    assert ShardedReader(tmp_path / "s").verify() == []


def test_continuing_a_store_with_other_settings_names_the_field(tmp_path: Path) -> None:
    _write_store(tmp_path / "s", stop_after=1)
    with pytest.raises(StoreError, match=r"meta\.source differs"):
        ShardedWriter(tmp_path / "s", "test", {"source": "b"}, num_rows=10, shard_rows=4, record_bytes=4)
    with pytest.raises(StoreError, match="shard_rows differs"):
        ShardedWriter(tmp_path / "s", "test", {"source": "a"}, num_rows=10, shard_rows=5, record_bytes=4)


def test_a_truncated_shard_is_a_clear_error(tmp_path: Path) -> None:
    _write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(StoreError, match="shard-00001.bin.*(truncated|bytes)"):
        ShardedReader(tmp_path / "s")


def test_a_flipped_byte_is_found_by_verify(tmp_path: Path) -> None:
    _write_store(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00002.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    reader = ShardedReader(tmp_path / "s")  # size and header still fine: only the checksum sees it
    problems = reader.verify()
    assert len(problems) == 1 and "shard-00002.bin" in problems[0] and "checksum" in problems[0]
    with pytest.raises(StoreError, match="checksum"):
        ShardedReader(tmp_path / "s", verify=True)
    # a writer continuing the folder drops the damaged shard and rewrites it
    writer = ShardedWriter(tmp_path / "s", "test", {"source": "a"}, num_rows=10, shard_rows=4, record_bytes=4)
    assert [index for index, _, _ in writer.pending()] == [2]


def test_a_manifest_that_is_not_json_or_lists_wrong_shards_is_refused(tmp_path: Path) -> None:
    _write_store(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["shards"] = data["shards"][:2]
    manifest.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="lists shards"):
        ShardedReader(tmp_path / "s")
    manifest.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ShardedReader(tmp_path / "s")


def test_cli_cache_verify_reports_a_damaged_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from distill.cli import main

    _write_store(tmp_path / "s")
    assert main(["cache", "verify", str(tmp_path / "s")]) == 0
    shard = tmp_path / "s" / "shard-00000.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x80
    shard.write_bytes(bytes(data))
    assert main(["cache", "verify", str(tmp_path / "s")]) == 1
    assert "shard-00000.bin" in capsys.readouterr().err


# -- building a teacher cache ----------------------------------------------------------------------


def _experiment(tiny_lm: dict, folder: Path, **changes) -> dict:
    experiment = tiny_lm_experiment(tiny_lm, folder, **changes)
    experiment["data"]["params"]["samples"] = 80
    return experiment


def test_the_cache_holds_the_teachers_top_k_at_every_target_token(tiny_lm, tmp_path: Path) -> None:
    experiment = load_experiment(_experiment(tiny_lm, tmp_path))
    manifest = build_teacher_cache(experiment, tmp_path / "cache", teacher="teacher", k=20, value_bits=16, shard_rows=16)
    data = load_data(experiment.data)
    assert manifest["complete"] and manifest["rows"] == len(data.train)
    assert manifest["stats"]["tokens"] == int((data.train.labels != -100).sum())
    assert manifest["meta"]["data"] == split_fingerprint(data.train)
    cache = TeacherCache(tmp_path / "cache")
    cache.check(data)
    rows = torch.tensor([5, 0, 11])
    ids, labels = trim_padding(data.train.inputs[rows], data.train.labels[rows])
    sources = cache.sources(rows, labels)
    assert sources["teacher.topk_logprobs"].shape == (*labels.shape, 20)
    teacher = build_model(experiment.models["teacher"], num_classes=data.num_classes, input_shape=data.input_shape).eval()
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(ids).float(), dim=-1)
    mask = labels != -100
    expected = logprobs[mask].topk(20, dim=-1)
    got_ids = sources["teacher.topk_ids"][mask]
    assert torch.equal(got_ids, expected.indices.sort(dim=-1).values)
    torch.testing.assert_close(sources["teacher.topk_logprobs"][mask], logprobs[mask].gather(1, got_ids), atol=2e-3, rtol=0)
    tail = torch.logsumexp(logprobs[mask].scatter(1, got_ids, float("-inf")), dim=-1)
    torch.testing.assert_close(sources["teacher.tail_logmass"][mask], tail, atol=2e-3, rtol=0)


def test_the_cache_refuses_other_data_and_another_teacher(tiny_lm, tmp_path: Path) -> None:
    from distill.cache.teacher import open_for_stage

    experiment = load_experiment(_experiment(tiny_lm, tmp_path))
    build_teacher_cache(experiment, tmp_path / "cache", teacher="teacher", k=8)
    other = _experiment(tiny_lm, tmp_path)
    other["data"]["train_subset"] = 20
    other = load_experiment(other)
    with pytest.raises(StoreError, match=r"data: .*training split differs"):
        open_for_stage(tmp_path / "cache", load_data(other.data), other, None)
    changed = _experiment(tiny_lm, tmp_path)
    changed["models"]["teacher"]["params"]["keep_layers"] = 1
    changed = load_experiment(changed)
    with pytest.raises(StoreError, match="teacher: "):
        open_for_stage(tmp_path / "cache", load_data(changed.data), changed, "teacher")
    # the same teacher, named: spec and weight hash both match
    open_for_stage(tmp_path / "cache", load_data(experiment.data), experiment, "teacher")
    # a row whose target count differs from the cache's (data changed under the same fingerprint)
    cache = TeacherCache(tmp_path / "cache")
    data = load_data(experiment.data)
    labels = data.train.labels[:2].clone()
    labels[0, (labels[0] != -100).nonzero()[0]] = -100
    with pytest.raises(StoreError, match="training row 0 has"):
        cache.sources(torch.tensor([0, 1]), labels)


def _distill(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_cache_run_killed_partway_finishes_without_duplicated_or_missing_rows(tiny_lm, tmp_path: Path) -> None:
    experiment = _experiment(tiny_lm, tmp_path)
    experiment["data"]["params"]["samples"] = 600
    experiment["cache"] = {"teacher": "teacher", "path": str(tmp_path / "killed"), "k": 16, "shard_rows": 3, "batch_size": 3}
    config = write_yaml(tmp_path / "exp.yaml", experiment)
    reference = _distill("cache-teacher", str(config), "--out", str(tmp_path / "reference"), "--no-progress")
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output

    process = _distill("cache-teacher", str(config), "--no-progress")
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert process.poll() is None, "the cache run finished before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    written = len(json.loads(manifest.read_text())["shards"])
    with pytest.raises(StoreError, match="incomplete"):
        TeacherCache(tmp_path / "killed")

    resumed = _distill("cache-teacher", str(config), "--no-progress")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "already cached" in output
    finished = json.loads(manifest.read_text())
    expected = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    assert len(finished["shards"]) == len(expected["shards"]) > written
    # every shard byte-identical to the uninterrupted run's: no row twice, none missing
    assert [(s["rows"], s["sha256"]) for s in finished["shards"]] == [(s["rows"], s["sha256"]) for s in expected["shards"]]
    assert finished["stats"]["tokens"] == expected["stats"]["tokens"]
    assert not list((tmp_path / "killed").glob(".*tmp*"))


# -- training from a cache -------------------------------------------------------------------------


def _cached_experiment(tiny_lm: dict, folder: Path, cache: Path, *, terms: list | None = None, **changes) -> dict:
    experiment = _experiment(tiny_lm, folder, **changes)
    stage = experiment["stages"][0]
    stage["teacher"] = {"cache": str(cache), "model": "teacher"}
    stage["objective"] = {"terms": terms or [{"name": "kd", "loss": "sparse_kd", "params": {"tail": "bucket"}}]}
    return experiment


def _final(run_dir: Path, stage: str = "kd") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "stages" / stage / "model.safetensors"))


@pytest.fixture
def full_cache(tiny_lm, tmp_path: Path) -> Path:
    """A cache of the whole vocabulary (k = V = 300) with 16-bit values: nearly the dense teacher."""
    experiment = load_experiment(_experiment(tiny_lm, tmp_path / "build"))
    build_teacher_cache(experiment, tmp_path / "cache", teacher="teacher", k=300, value_bits=16, shard_rows=16)
    return tmp_path / "cache"


def test_training_from_a_full_cache_matches_the_live_teacher(tiny_lm, tmp_path: Path, full_cache: Path) -> None:
    """k = V: sparse_kd from the cache takes the step forward KL with the live teacher takes."""
    settings = {"optimizer": {"name": "sgd", "lr": 0.5}, "training": {"epochs": 1, "max_steps": 2}}
    live = _experiment(tiny_lm, tmp_path / "live", terms=[{"name": "kd", "loss": "forward_kl"}], **settings)
    cached = _cached_experiment(tiny_lm, tmp_path / "cached", full_cache, **settings)
    live_weights = _final(run_experiment(load_experiment(live)).run_dir)
    cached_weights = _final(run_experiment(load_experiment(cached)).run_dir)
    for name in live_weights:
        torch.testing.assert_close(cached_weights[name], live_weights[name], atol=2e-4, rtol=1e-3)


def test_accumulation_from_a_cache_normalizes_by_the_whole_step(tiny_lm, tmp_path: Path, full_cache: Path) -> None:
    def run(folder: str, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        experiment = _cached_experiment(
            tiny_lm, tmp_path / folder, full_cache,
            optimizer={"name": "sgd", "lr": 0.5}, training={"epochs": 1, "max_steps": 1, "grad_accum_steps": accumulation},
        )
        experiment["data"]["batch_size"] = batch
        return _final(run_experiment(load_experiment(experiment)).run_dir)

    reference = run("a", 8, 1)
    other = run("b", 4, 2)
    for name in reference:
        torch.testing.assert_close(other[name], reference[name], atol=1e-6, rtol=1e-5)


def test_a_stopped_run_from_a_cache_resumes_to_the_same_weights(tiny_lm, tmp_path: Path, full_cache: Path) -> None:
    from distill.engine.callbacks import Callback

    class StopAt(Callback):
        def on_step(self, stage: str, step: int, total_steps: int, values: dict) -> None:
            if step == 3:
                raise KeyboardInterrupt

    def experiment(folder: str) -> dict:
        return _cached_experiment(
            tiny_lm, tmp_path / folder, full_cache, training={"epochs": 2}, checkpoint={"every_steps": 2, "keep_last": 2}
        )

    reference = _final(run_experiment(load_experiment(experiment("reference"))).run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(experiment("stopped")), callbacks=[StopAt()])
    [run_dir] = (tmp_path / "stopped" / "tiny_lm").iterdir()
    resumed = _final(run_experiment(load_experiment(run_dir / "config.yaml"), run_dir=run_dir).run_dir)
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name


def test_a_damaged_cache_stops_the_run_before_training(tiny_lm, tmp_path: Path, full_cache: Path) -> None:
    shard = full_cache / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    experiment = _cached_experiment(tiny_lm, tmp_path / "run", full_cache)  # verify: true is the default
    with pytest.raises(StoreError, match="shard-00001.bin: checksum mismatch"):
        run_experiment(load_experiment(experiment))
    [run_dir] = (tmp_path / "run" / "tiny_lm").iterdir()
    assert not (run_dir / "stages" / "kd").exists() and not list((run_dir / "checkpoints").rglob("step-*"))
    # truncated: found when the cache is opened, verify or not
    shard.write_bytes(bytes(data[:-10]))
    experiment["stages"][0]["teacher"]["verify"] = False
    with pytest.raises(StoreError, match="shard-00001.bin"):
        run_experiment(load_experiment(experiment))
    # a manifest that lists another record size than its shards hold
    build_teacher_cache(load_experiment(_experiment(tiny_lm, tmp_path / "b")), tmp_path / "other", teacher="teacher", k=8)
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["record_bytes"] += 1
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="the manifest says"):
        run_experiment(load_experiment(_cached_experiment(tiny_lm, tmp_path / "run2", tmp_path / "other")))
    assert not list((tmp_path / "run2").rglob("model.safetensors"))


def test_config_errors_name_what_a_cached_teacher_cannot_do(tiny_lm, tmp_path: Path) -> None:
    from distill.config import ConfigError

    with_cache = _cached_experiment(tiny_lm, tmp_path, tmp_path / "cache", terms=[{"loss": "forward_kl"}])
    with pytest.raises(ConfigError, match="reads teacher.logits, but stage 'kd' reads its teacher from a cache"):
        load_experiment(with_cache)
    without = _experiment(tiny_lm, tmp_path, terms=[{"loss": "sparse_kd"}])
    with pytest.raises(ConfigError, match="only a cached teacher provides"):
        load_experiment(without)
    generating = _cached_experiment(tiny_lm, tmp_path, tmp_path / "cache")
    generating["stages"][0]["generate"] = {"model": "student"}
    with pytest.raises(ConfigError, match="generated completions need a live teacher"):
        load_experiment(generating)
    unknown = _cached_experiment(tiny_lm, tmp_path, tmp_path / "cache")
    unknown["stages"][0]["teacher"]["model"] = "teachr"
    with pytest.raises(ConfigError, match="no model 'teachr'"):
        load_experiment(unknown)


def test_two_processes_from_a_cache_match_one(tiny_lm, tmp_path: Path, full_cache: Path) -> None:
    from tests.test_distributed import _free_port, _run

    def config(name: str) -> Path:
        # SGD: Adam's normalization would magnify the float rounding of near-zero gradients. Three
        # steps of 2 x 8 rows: the 51-row split's last partial batch is kept by one process and
        # dropped by two (each process needs 2 rows), so the comparison stops before it.
        experiment = _cached_experiment(
            tiny_lm, tmp_path / name, full_cache, optimizer={"name": "sgd", "lr": 0.5},
            training={"epochs": 1, "max_steps": 3, "grad_accum_steps": 2},
        )
        experiment["device"] = "cpu"
        return write_yaml(tmp_path / f"{name}.yaml", experiment)

    _run([sys.executable, "-m", "distill", "run", str(config("single")), "--no-progress"], tmp_path)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "distill", "run", str(config("double")), "--no-progress"],
        tmp_path,
    )
    [single] = (tmp_path / "single" / "tiny_lm").iterdir()
    [double] = (tmp_path / "double" / "tiny_lm").iterdir()
    assert json.loads((double / "run.json").read_text())["processes"] == 2
    expected, actual = _final(single), _final(double)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4)


def test_several_caches_from_one_teacher_pass_equal_separate_ones(tiny_lm, tmp_path: Path) -> None:
    from distill.cache.teacher import build_teacher_caches

    experiment = load_experiment(_experiment(tiny_lm, tmp_path))
    build_teacher_caches(experiment, {tmp_path / "k8": (8, 8), tmp_path / "k32": (32, 16)}, teacher="teacher", shard_rows=16)
    for name, k, bits in (("k8", 8, 8), ("k32", 32, 16)):
        build_teacher_cache(experiment, tmp_path / f"alone-{name}", teacher="teacher", k=k, value_bits=bits, shard_rows=16)
        together = json.loads((tmp_path / name / "manifest.json").read_text())
        alone = json.loads((tmp_path / f"alone-{name}" / "manifest.json").read_text())
        assert together["meta"] == alone["meta"]
        # the top 8 taken from the top 32 (the rest joining the tail) is the same cache, up to
        # float32 rounding of the tail's sum; compare decoded rows
        a, b = TeacherCache(tmp_path / name), TeacherCache(tmp_path / f"alone-{name}")
        records_a, counts_a = a.reader.read(np.arange(a.reader.rows))
        records_b, counts_b = b.reader.read(np.arange(b.reader.rows))
        assert np.array_equal(counts_a, counts_b)
        decoded_a, decoded_b = topk.decode(records_a, k, a.vocab, bits), topk.decode(records_b, k, b.vocab, bits)
        assert torch.equal(decoded_a[1], decoded_b[1])
        torch.testing.assert_close(decoded_a[0], decoded_b[0], atol=1e-3, rtol=0)
