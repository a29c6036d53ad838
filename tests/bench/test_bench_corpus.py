"""The stdlib text corpus is real, deterministic, and split by file."""

import pytest

from effcompile.bench import corpus


def test_corpus_is_deterministic_and_distinct():
    a = corpus.stdlib_corpus(50, seed=3)
    assert a == corpus.stdlib_corpus(50, seed=3)
    assert a != corpus.stdlib_corpus(50, seed=4)
    assert len(set(a)) == 50
    assert all(40 <= len(s) <= 400 and "\n" not in s for s in a)


def test_corpus_errors_name_the_field():
    with pytest.raises(ValueError, match="n=0"):
        corpus.stdlib_corpus(0)
    with pytest.raises(ValueError, match="exceeds"):
        corpus.stdlib_corpus(10**7)
    with pytest.raises(ValueError, match="split='dev'"):
        corpus.stdlib_corpus(1, split="dev")


def test_split_is_by_file_and_disjoint():
    train, held = corpus.stdlib_sources("train"), corpus.stdlib_sources("heldout")
    assert held and len(train) > 10 * len(held)
    assert not {r for r, _ in train} & {r for r, _ in held}
    assert all(corpus.is_heldout(r) for r, _ in held)
    assert [r for r, _ in corpus.stdlib_sources()] == sorted(r for r, _ in train + held)
    assert not any("/test/" in f"/{r}" for r, _ in train)
    held_docs = set(corpus.stdlib_docstrings("heldout"))
    assert held_docs and set(corpus.stdlib_corpus(20, split="heldout")) <= held_docs


def test_data_hash_sees_any_change():
    src = corpus.stdlib_sources("heldout")
    h = corpus.data_hash(src)
    assert h == corpus.data_hash(list(src))
    assert h != corpus.data_hash(src[:-1])
    assert h != corpus.data_hash([(src[0][0], src[0][1] + " ")] + src[1:])


def test_retrieval_set_queries_open_their_documents():
    queries, docs, answers = corpus.retrieval_set(10, 40, seed=1)
    assert len(queries) == 10 and len(docs) == 40 and len(set(answers)) == 10
    assert not any(q in docs[i] for q, i in zip(queries, answers, strict=True))  # not a string-match task
    assert len(set(docs)) == 40 and queries == corpus.retrieval_set(10, 40, seed=1)[0]
    with pytest.raises(ValueError, match="n_queries=5"):
        corpus.retrieval_set(5, 4)
