"""The parts of distill generate: answer extraction, the arithmetic task, documents, the spec, each filter."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from distill.answers import answers_match, extract_answer, normalize_answer
from distill.synth.filters import (
    CorrectFilter,
    CriticFilter,
    ExactDedupFilter,
    FormatFilter,
    GroundedFilter,
    LengthFilter,
    MinHasher,
    NearDedupFilter,
    Sample,
    SelfConsistencyFilter,
    first_token_top_logprobs,
    jaccard,
    majority_vote,
    word_shingles,
    yes_probability,
)
from distill.synth.sources import (
    arithmetic_problems,
    chunk_document,
    document_items,
    parse_qa_pairs,
    read_seed_prompts,
)
from distill.synth.spec import GenerateSpecError, load_generate_spec


def sample(completion: str, prompt_id: str = "p", *, answer: str | None = None, reference: str | None = None,
           prompt: str = "question", document: str | None = None, index: int = 0) -> Sample:
    return Sample(f"{prompt_id}/{index}", prompt_id, prompt, completion, answer=answer, reference=reference,
                  document=document)


# ----------------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7 + 5 = 12.\nAnswer: 12", "12"),
        ("Answer: 3\nWait, recount.\nAnswer: 4", "4"),  # the last answer counts
        ("Answer: 1,234 apples", "1234"),
        ("Answer: -17", "-17"),
        ("Answer: 12.50", "12.5"),
        ("Answer: 7.0.", "7"),
        ("Answer:12", "12"),
        ("The answer is 12", None),
        ("Answer: twelve", None),
        ("", None),
    ],
)
def test_extract_answer_number(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_text_answers_and_custom_patterns() -> None:
    assert extract_answer("Final: The Eiffel Tower.", r"Final:\s*(.+)", "text") == "the eiffel tower"
    assert extract_answer("#### 42", r"####\s*(\d+)") == "42"
    assert normalize_answer("  New   York!  ", "text") == "new york"
    assert answers_match("12.0", "12") and answers_match("1,000", "1000") and not answers_match(None, "1")
    assert not answers_match("12", "13")
    with pytest.raises(ValueError, match="exactly one capturing group"):
        extract_answer("a", r"(a)(b)")


# ----------------------------------------------------------------------------------- arithmetic


def test_arithmetic_problems_are_deterministic_and_correct() -> None:
    problems = arithmetic_problems(200, seed=3)
    assert problems == arithmetic_problems(200, seed=3)
    assert [p["question"] for p in problems] != [p["question"] for p in arithmetic_problems(200, seed=4)]
    assert arithmetic_problems(20, seed=3) == problems[:20]  # a problem does not depend on the count
    assert len({p["question"] for p in problems}) == 200
    assert {p["operation"] for p in problems} == {"+", "-", "*"}
    for problem in problems:
        a, b = problem["operands"]
        expected = {"+": a + b, "-": a - b, "*": a * b}[problem["operation"]]
        assert problem["reference"] == str(expected) and expected >= 0
        assert str(a) in problem["question"] and str(b) in problem["question"]
        assert extract_answer(problem["rationale"]) == problem["reference"]
        assert problem["rationale"].endswith(f"Answer: {expected}")


def test_arithmetic_options_and_held_out_problems() -> None:
    only_sums = arithmetic_problems(30, seed=0, operations=["+"], operand_range=(100, 200))
    assert all(p["operation"] == "+" and all(100 <= x <= 200 for x in p["operands"]) for p in only_sums)
    train = arithmetic_problems(50, seed=0)
    test = arithmetic_problems(50, seed=0, exclude=[p["question"] for p in train])
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    with pytest.raises(ValueError, match="distinct arithmetic problems"):
        arithmetic_problems(450, seed=0, operations=["+"], operand_range=(1, 1))  # 444 distinct questions


# ----------------------------------------------------------------------------------- documents, seed prompts

DOCUMENT = """Spider silk is a protein fibre spun by spiders. Its strength comes from stacked beta-sheet nanocrystals.

Dragline silk combines high tensile strength with extensibility, which makes it tougher than steel by weight.

Researchers model silk with molecular dynamics. The simulations show that small crystals fail gracefully.

Hierarchical structure, from amino acid sequence to fibre, decides how silk responds to load."""


def test_chunks_are_paragraphs_with_overlap_and_exact_offsets() -> None:
    chunks = chunk_document(DOCUMENT, chunk_chars=260, overlap_chars=120)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert DOCUMENT[chunk.start : chunk.end] == chunk.text
        assert len(chunk.text) <= 260
    for before, after in zip(chunks, chunks[1:]):
        assert after.start > before.start
        overlap = max(0, before.end - after.start)
        assert overlap <= 120
    assert any(before.end > after.start for before, after in zip(chunks, chunks[1:]))  # some overlap
    paragraphs = [p for p in DOCUMENT.split("\n\n")]
    for paragraph in paragraphs:  # every paragraph lies whole inside some chunk
        assert any(paragraph in chunk.text for chunk in chunks)
    assert chunk_document(DOCUMENT, chunk_chars=5000, overlap_chars=0)[0].text == DOCUMENT


def test_long_paragraphs_are_cut_at_sentences() -> None:
    long = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_document(long, chunk_chars=100, overlap_chars=30)
    assert all(len(c.text) <= 100 and long[c.start : c.end] == c.text for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)
    assert chunks[-1].end == len(long)
    with pytest.raises(ValueError, match="overlap_chars"):
        chunk_document(long, chunk_chars=100, overlap_chars=100)


def test_document_items_record_provenance(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(DOCUMENT, encoding="utf-8")
    items = document_items(str(tmp_path / "*.txt"), chunk_chars=260, overlap_chars=0)
    assert [i.source["chunk"] for i in items] == list(range(len(items)))
    assert all(DOCUMENT[i.source["start"] : i.source["end"]] == i.document for i in items)
    assert items[0].id == f"{tmp_path / 'a.txt'}#0"
    with pytest.raises(FileNotFoundError, match="source.documents.files"):
        document_items(str(tmp_path / "*.md"), chunk_chars=100, overlap_chars=0)


def test_qa_parsing_is_robust() -> None:
    text = """Here are the pairs.
Q: What is spider silk?
A: A protein fibre
spun by spiders.

**Q2:** Why is dragline silk tough?
**A2:** It combines strength and extensibility.
A: an orphan answer
Q: A question without an answer
Question 3: What do simulations show?
Answer 3: Small crystals fail gracefully.
1. Q: Empty answer?
A:
"""
    assert parse_qa_pairs(text) == [
        ("What is spider silk?", "A protein fibre spun by spiders."),
        ("Why is dragline silk tough?", "It combines strength and extensibility."),
        ("What do simulations show?", "Small crystals fail gracefully."),
    ]
    assert parse_qa_pairs(text, limit=1) == [("What is spider silk?", "A protein fibre spun by spiders.")]
    assert parse_qa_pairs("A dog is an animal.\nNo pairs here.") == []


def test_seed_prompts_read_fields_and_name_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"q": "What is 2+2?", "gold": 4, "key": "a"}\n\n{"q": "And 3+3?", "gold": "6", "key": "b"}\n')
    items = read_seed_prompts(str(path), field="q", reference_field="gold", id_field="key")
    assert [(i.id, i.question, i.reference, i.source["line"]) for i in items] == [
        ("a", "What is 2+2?", "4", 1), ("b", "And 3+3?", "6", 3)
    ]
    path.write_text('{"q": "x"}\n{"prompt": "y"}\n')
    with pytest.raises(ValueError, match=r"seeds.jsonl:2: no field 'q'"):
        read_seed_prompts(str(path), field="q")


# ----------------------------------------------------------------------------------- the spec


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gen.yaml"
    path.write_text(text)
    return path


BASE = """name: g
output: {out}
teacher: {{base_url: "http://127.0.0.1:9/v1"}}
source:
  task: {{name: arithmetic, count: 4}}
"""


def test_spec_errors_name_file_line_and_key(tmp_path: Path) -> None:
    text = BASE.format(out=tmp_path / "o.jsonl") + "generation:\n  temperatur: 0.5\nfilters:\n  - {type: lenght}\n"
    path = write_spec(tmp_path, text)
    with pytest.raises(GenerateSpecError) as error:
        load_generate_spec(path)
    message = str(error.value)
    assert str(path) in message
    assert "line 7: generation.temperatur: unknown key (did you mean 'temperature'?)" in message
    assert "line 9: filters[0]: unknown filter type 'lenght' (did you mean 'length'?)" in message


def test_spec_cross_checks(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    text = f"""name: g
output: {out}
teacher: {{base_url: "http://x/v1"}}
source:
  prompts: {{files: seeds.jsonl}}
prompt: "Solve: {{qestion}}"
answer: {{pattern: "(a)(b)"}}
filters: [correct, grounded, {{type: format, must_match: "("}}]
"""
    with pytest.raises(GenerateSpecError) as error:
        load_generate_spec(write_spec(tmp_path, text))
    message = str(error.value)
    assert "answer.pattern: must have exactly one capturing group" in message
    assert "filters[2].must_match: not a valid regular expression" in message
    fixed = text.replace('answer: {pattern: "(a)(b)"}\n', "").replace(', {type: format, must_match: "("}', "")
    with pytest.raises(GenerateSpecError) as error:
        load_generate_spec(write_spec(tmp_path, fixed))
    problems = error.value.problems
    assert any("prompt.template: unknown placeholder {qestion} (did you mean 'question'?)" in p for p in problems)
    assert any("filters[0]: the correct filter needs reference answers" in p for p in problems)
    assert any("filters[1]: the grounded filter checks answers against their document chunk" in p for p in problems)


def test_endpoints_are_checked_like_the_client_does(tmp_path: Path) -> None:
    from distill.synth.pipeline import public_url

    text = BASE.format(out=tmp_path / "o.jsonl").replace(
        'teacher: {base_url: "http://127.0.0.1:9/v1"}',
        'teacher: {base_url: "http://user:pw@127.0.0.1:9/v1", api_key_env: "sk-123 secret"}',
    ) + "filters:\n  - {type: critic, judge: {base_url: 'http://127.0.0.1:9/v1?key=1'}}\n"
    with pytest.raises(GenerateSpecError) as error:
        load_generate_spec(write_spec(tmp_path, text))
    message = str(error.value)
    assert "line 3: teacher.base_url: must not hold credentials" in message
    assert "line 3: teacher.api_key_env: must be the name of an environment variable" in message
    assert "line 7: filters[0].judge.base_url: must not have a query string" in message
    assert "sk-123" not in message and "pw@" not in message
    assert public_url("https://me:pw@host:8443/v1?key=1#x") == "https://host:8443/v1"


def test_spec_overrides_and_shorthands(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BASE.format(out=tmp_path / "o.jsonl") + "filters: [correct]\n")
    spec = load_generate_spec(path, ["generation.n=8", "limit=2"])
    assert spec.generation.n == 8 and spec.limit == 2 and spec.filters[0].type == "correct"
    assert load_generate_spec(path, {"source.task.count": 9}).source.task.count == 9
    with pytest.raises(GenerateSpecError, match="--set generation.nn=3: line|generation.nn: unknown key"):
        load_generate_spec(path, ["generation.nn=3"])
    with pytest.raises(GenerateSpecError, match="give exactly one of base_url"):
        load_generate_spec(path, ["teacher.serve.model=tiny"])


# ----------------------------------------------------------------------------------- filters


def verdicts(filter_, samples):
    return filter_.evaluate([s for s in samples if s.alive], samples)


def test_length_and_format() -> None:
    samples = [sample("short"), sample("a much longer completion here"), sample("Answer: 3")]
    assert [p for _, p in verdicts(LengthFilter(min=6, max=40), samples)] == [False, True, True]
    assert [s for s, _ in verdicts(LengthFilter(unit="words", max=2), samples)] == [1.0, 5.0, 2.0]
    checks = FormatFilter(must_match=r"Answer:\s*\d", must_not_match="longer")
    assert [p for _, p in verdicts(checks, samples)] == [False, False, True]


def test_exact_dedup_normalises_and_remembers_only_committed() -> None:
    dedup = ExactDedupFilter(field="completion")
    first = [sample("Answer: 12", index=0), sample("answer:   12 ", index=1), sample("Answer: 13", index=2)]
    assert [p for _, p in verdicts(dedup, first)] == [True, False, True]
    assert [p for _, p in verdicts(dedup, first)] == [True, False, True]  # evaluate changes no state
    dedup.commit([first[0]])
    later = [sample("ANSWER: 12", "q"), sample("Answer: 13", "q", index=1)]
    assert [p for _, p in verdicts(dedup, later)] == [False, True]  # 13 was never committed


PARAGRAPH = (
    "The tensile strength of dragline silk comes from beta sheet crystals embedded in an amorphous matrix of "
    "protein chains that stretch under load and dissipate energy before the fibre breaks"
)
REWORDED = PARAGRAPH.replace("dissipate", "absorb")
DIFFERENT = (
    "Molecular dynamics simulations of silk show that smaller crystals fail gracefully while larger ones "
    "crack suddenly which explains why spiders control crystal size during spinning"
)


@pytest.mark.parametrize("method", ["minhash", "exact"])
def test_near_dedup_catches_a_reworded_duplicate_and_keeps_a_different_text(method: str) -> None:
    exact = jaccard(word_shingles(PARAGRAPH), word_shingles(REWORDED))
    assert 0.75 < exact < 0.95
    dedup = NearDedupFilter(field="completion", threshold=0.7, method=method)
    dedup.remember({"prompt": "a", "completion": PARAGRAPH})
    results = verdicts(dedup, [sample(REWORDED, index=0), sample(DIFFERENT, index=1)])
    (similar, dropped), (other, kept) = results
    assert not dropped and kept
    assert abs(similar - exact) < 0.12 and other < 0.2
    strict = NearDedupFilter(field="completion", threshold=0.95, method=method)
    strict.remember({"prompt": "a", "completion": PARAGRAPH})
    assert verdicts(strict, [sample(REWORDED)])[0][1]  # below a stricter threshold: kept


def test_near_dedup_within_a_chunk_and_determinism() -> None:
    dedup = NearDedupFilter(field="completion", threshold=0.7)
    results = verdicts(dedup, [sample(PARAGRAPH, index=0), sample(REWORDED, index=1), sample(DIFFERENT, index=2)])
    assert [p for _, p in results] == [True, False, True]
    assert len(dedup.index) == 0  # only commit() fills the index
    words = word_shingles(PARAGRAPH)
    assert (MinHasher(64, seed=1).signature(words) == MinHasher(64, seed=1).signature(words)).all()
    assert not (MinHasher(64, seed=1).signature(words) == MinHasher(64, seed=2).signature(words)).all()


def test_majority_vote() -> None:
    assert majority_vote(["12", "12", "13", None]) == ("12", 0.5)
    assert majority_vote(["12", "13"]) == (None, 0.5)
    assert majority_vote([None, None]) == (None, 0.0)


def test_self_consistency_keeps_the_majority_counting_dropped_samples() -> None:
    chunk = [sample(f"s{i}", "p", answer=a, index=i) for i, a in enumerate(["12", "12", "12", "13"])]
    chunk += [sample(f"t{i}", "q", answer=a, index=i) for i, a in enumerate(["5", "6", "5", "6"])]
    chunk[0].rejected_by = "exact_dedup"  # dropped earlier, still votes
    consistency = SelfConsistencyFilter(min_agreement=0.6)
    results = verdicts(consistency, chunk)
    assert [p for _, p in results] == [True, True, False, False, False, False, False]
    assert results[0][0] == 0.75 and results[-1][0] == 0.5
    strict = SelfConsistencyFilter(min_agreement=0.8)
    assert not any(p for _, p in verdicts(strict, chunk))


def test_correct_compares_with_the_reference() -> None:
    chunk = [sample("a", answer="12", reference="12"), sample("b", answer="13", reference="12", index=1),
             sample("c", answer=None, reference="12", index=2), sample("d", answer="4", reference=None, index=3)]
    assert verdicts(CorrectFilter(), chunk) == [(1.0, True), (0.0, False), (0.0, False), (0.0, False)]


class Judge:
    """Answers every judge request with fixed first-token alternatives (chat or completion format)."""

    def __init__(self, alternatives: dict[str, float], chat: bool = True) -> None:
        self.alternatives, self.chat, self.requests = alternatives, chat, []

    def map(self, method, requests, progress=None):
        self.requests.extend((method, r) for r in requests)
        if self.chat:
            tops = [{"token": t, "logprob": lp} for t, lp in self.alternatives.items()]
            first = max(tops, key=lambda t: t["logprob"])
            logprobs = {"content": [{**first, "top_logprobs": tops}]}
            choice = {"index": 0, "message": {"role": "assistant", "content": first["token"]}, "logprobs": logprobs}
        else:
            first = max(self.alternatives, key=self.alternatives.get)
            logprobs = {"tokens": [first], "token_logprobs": [self.alternatives[first]], "top_logprobs": [self.alternatives]}
            choice = {"index": 0, "text": first, "logprobs": logprobs}
        return [{"choices": [choice]} for _ in requests]


def test_yes_probability_normalises_over_yes_and_no() -> None:
    alternatives = {"Yes": math.log(0.6), " yes": math.log(0.1), "No": math.log(0.2), "Maybe": math.log(0.1)}
    assert yes_probability(alternatives) == pytest.approx(0.7 / 0.9)
    assert yes_probability({"\u0120YES.": -1.0, "\u2581no": -1.0}) == pytest.approx(0.5)
    assert yes_probability({"Sure": -0.1}) is None


@pytest.mark.parametrize("chat", [True, False])
def test_critic_thresholds_p_yes_from_logprobs(chat: bool) -> None:
    judge = Judge({"Yes": -0.1, "No": -2.5, "The": -3.0}, chat=chat)
    expected = math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.5))
    chunk = [sample("Answer: 12", prompt="What is 6+6?")]
    lenient = CriticFilter(judge, template="Q: {prompt}\nA: {completion}\nCorrect?", threshold=0.9, chat=chat)
    score, passed = verdicts(lenient, chunk)[0]
    assert score == pytest.approx(expected, abs=1e-6) and passed
    strict = CriticFilter(judge, template="{prompt} {completion}", threshold=0.95, chat=chat)
    assert verdicts(strict, chunk) == [(pytest.approx(expected, abs=1e-6), False)]
    method, request = judge.requests[0]
    assert method == ("chat" if chat else "complete") and request["max_tokens"] == 1 and request["temperature"] == 0.0
    if chat:
        assert request["messages"][-1]["content"] == "Q: What is 6+6?\nA: Answer: 12\nCorrect?"
        assert request["logprobs"] is True and request["top_logprobs"] == 5
    else:
        assert request["logprobs"] == 5


def test_critic_number_mode_and_missing_logprobs() -> None:
    class Rater:
        def map(self, method, requests, progress=None):
            return [{"choices": [{"index": 0, "message": {"content": text}}]} for text in ("Score: 8/10", "7", "great")]

    chunk = [sample(f"c{i}", index=i) for i in range(3)]
    rater = CriticFilter(Rater(), template="{completion}", mode="number", threshold=7.5, max_tokens=8)
    assert verdicts(rater, chunk) == [(8.0, True), (7.0, False), (None, False)]
    no_logprobs = CriticFilter(Rater(), template="{completion}", threshold=0.5)
    with pytest.raises(ValueError, match="no logprobs"):
        verdicts(no_logprobs, chunk)
    assert first_token_top_logprobs({"message": {"content": "x"}}) is None


def test_grounded_measures_lexical_support() -> None:
    chunk = [
        sample("Beta-sheet nanocrystals give spider silk its strength.", document=DOCUMENT),
        sample("Bananas turn purple under moonlight in Peru.", document=DOCUMENT, index=1),
        sample("It is.", document=DOCUMENT, index=2),
    ]
    results = verdicts(GroundedFilter(threshold=0.6), chunk)
    assert [p for _, p in results] == [True, False, False]
    assert results[0][0] > 0.8 and results[1][0] < 0.2 and results[2][0] == 0.0


def test_filters_give_one_verdict_per_alive_sample() -> None:
    rng = random.Random(0)
    chunk = [sample(f"Answer: {rng.randint(1, 3)}", "p", answer=str(rng.randint(1, 3)), index=i) for i in range(6)]
    chunk[1].rejected_by = "x"
    alive = [s for s in chunk if s.alive]
    for filter_ in (LengthFilter(min=1), ExactDedupFilter(), NearDedupFilter(), SelfConsistencyFilter(), CorrectFilter()):
        assert len(filter_.evaluate(alive, chunk)) == len(alive)
