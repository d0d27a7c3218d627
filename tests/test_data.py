"""Bytes in, batches out (chapter 0): tokenizer, corpus, the per-rank batch contract."""

import pytest
import torch

from course_lib.data import (
    decode,
    default_corpus,
    encode,
    get_batch,
    load_text,
    make_dataset,
    unigram_entropy_bits,
)

# Token i is i % 251: a window of the data is fixed by its first value.
DATA = torch.arange(1000, dtype=torch.int64).remainder(251).to(torch.uint8)


def test_encode_decode_round_trip_with_non_ascii():
    text = "def f(x):\n    return x  # héllo wörld, 日本語, 🐍 ✓"
    ids = encode(text)
    assert ids.dtype == torch.uint8
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert decode(ids) == text
    assert decode(ids.tolist()) == text


def test_invalid_utf8_decodes_to_replacement_character():
    assert decode([104, 255, 105]) == "h\ufffdi"


def test_default_corpus_is_the_embedded_docs_and_deterministic():
    text = default_corpus()
    assert 400_000 < len(text.encode("utf-8")) < 530_000  # ~465 KB
    assert text == default_corpus()
    assert "for" in text and load_text(None) == text


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_slices_stack_to_the_global_batch(world_size):
    x, y = get_batch(DATA, 12, 8, seed=3, step=5)
    parts = [get_batch(DATA, 12, 8, 3, 5, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(px.shape == (12 // world_size, 8) for px, _ in parts)
    assert torch.equal(torch.cat([px for px, _ in parts]), x)
    assert torch.equal(torch.cat([py for _, py in parts]), y)


def test_batches_depend_on_step_and_seed_only():
    a = get_batch(DATA, 4, 8, seed=0, step=0)
    assert torch.equal(a[0], get_batch(DATA, 4, 8, seed=0, step=0)[0])
    assert not torch.equal(a[0], get_batch(DATA, 4, 8, seed=0, step=1)[0])
    assert not torch.equal(a[0], get_batch(DATA, 4, 8, seed=1, step=0)[0])


def test_targets_are_inputs_shifted_by_one():
    x, y = get_batch(DATA, 6, 10, seed=0, step=2)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):  # each row is a window of the data
        start = int(row_x[0])
        assert torch.equal(row_x, DATA[start : start + 10].long())
        assert row_y[-1] == DATA[start + 10]


def test_missing_and_empty_corpus_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(empty)
    with pytest.raises(ValueError, match="empty"):
        make_dataset("")


def test_seq_len_longer_than_the_data_names_the_numbers():
    with pytest.raises(ValueError, match=r"seq_len=1000 needs 1001 tokens .* only 1000"):
        get_batch(DATA, 2, 1000, seed=0, step=0)


def test_batch_not_divisible_by_world_size_names_the_numbers():
    with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by world_size=4"):
        get_batch(DATA, 10, 8, seed=0, step=0, rank=0, world_size=4)


def test_unigram_entropy_of_uniform_and_constant_bytes():
    assert unigram_entropy_bits(torch.arange(256, dtype=torch.uint8)) == pytest.approx(8.0)
    assert unigram_entropy_bits(encode("aaaaaaaa")) == 0.0
    assert unigram_entropy_bits(encode("abab")) == pytest.approx(1.0)
