"""The character-level corpus: split, vocabulary and checksum against hand computations.

The expected split is written out here block by block (every tenth block of ``block_len``
characters is validation), the vocabulary is ``sorted(set(text))`` and the checksum is
``hashlib.sha256(text.encode())``, all without the corpus code.
"""

import hashlib
import platform

import numpy as np
import pytest

from minititans.tasks import CorpusTask, load_text_file, python_corpus
from minititans.tasks.corpus import (
    STDLIB_MODULES,
    builtin_sources,
    from_text_pieces,
    min_chars_for,
    read_text_pieces,
)

# 50 lines of varied text with some non-ASCII characters: 1,700-odd characters
TEXT = "".join(f"line {i}: the memory reads {'ab' * (i % 5)} é → {i * i}\n" for i in range(50))


def naive_split(text, block_len, valid_every):
    """(train text, valid pieces) by hand: block i is validation iff i % k == k - 1."""
    blocks = [text[s:s + block_len] for s in range(0, len(text), block_len)]
    train = "".join(b for i, b in enumerate(blocks) if i % valid_every != valid_every - 1)
    valid = [b for i, b in enumerate(blocks) if i % valid_every == valid_every - 1]
    return train, valid


def test_corpus_vocab_is_sorted_characters_and_ids_decode_back():
    c = from_text_pieces([TEXT[:700], TEXT[700:]], name="t", block_len=100, valid_every=4)
    assert c.vocab == tuple(sorted(set(TEXT)))
    assert c.vocab_size == len(set(TEXT))
    assert c.n_chars == len(TEXT)
    assert c.decode(c.ids) == TEXT
    np.testing.assert_array_equal(c.encode(TEXT), c.ids)
    assert c.ids[TEXT.index("é")] == c.vocab.index("é")


def test_corpus_checksum_is_sha256_of_the_utf8_bytes_whatever_the_pieces():
    want = hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    one = from_text_pieces([TEXT], name="t")
    three = from_text_pieces([TEXT[:5], TEXT[5:999], TEXT[999:]], name="t")
    assert one.checksum == three.checksum == want
    other = from_text_pieces([TEXT[:-1] + "!"], name="t")
    assert other.checksum != want
    assert one.info() == {"name": "t", "checksum": want, "n_chars": len(TEXT),
                          "python_version": platform.python_version()}


@pytest.mark.parametrize("block_len, valid_every", [(100, 4), (64, 10), (333, 2)])
def test_corpus_split_every_kth_block_is_validation(block_len, valid_every):
    c = from_text_pieces([TEXT], name="t", block_len=block_len, valid_every=valid_every)
    train, valid = naive_split(TEXT, block_len, valid_every)
    assert "".join(c.decode(r) for r in c.runs("train")) == train
    assert [c.decode(r) for r in c.runs("valid")] == valid
    # neighbouring training blocks are one run: as many runs as gaps between them + 1
    n_blocks = -(-len(TEXT) // block_len)
    assert len(c.runs("train")) == len(range(0, n_blocks, valid_every))
    # the split is a function of the text only
    again = from_text_pieces([TEXT], name="t", block_len=block_len, valid_every=valid_every)
    np.testing.assert_array_equal(np.concatenate(again.runs("valid")),
                                  np.concatenate(c.runs("valid")))


def test_validation_windows_lie_inside_validation_blocks():
    c = from_text_pieces([TEXT], name="t", block_len=100, valid_every=4)
    _, valid = naive_split(TEXT, 100, 4)
    w = c.validation_windows(30)
    # by hand: non-overlapping windows of 31 characters from each validation block
    want = [b[i:i + 31] for b in valid for i in range(0, len(b) - 30, 31)]
    assert [c.decode(row) for row in w] == want
    few = c.validation_windows(30, max_windows=3)
    assert [c.decode(row) for row in few] == [want[0], want[len(want) // 2], want[-1]]
    with pytest.raises(ValueError, match="no window of 101"):
        c.validation_windows(100)


def test_corpus_task_samples_training_windows_with_every_position_scored():
    c = from_text_pieces([TEXT], name="t", block_len=100, valid_every=4)
    train, valid = naive_split(TEXT, 100, 4)
    task = CorpusTask(c, 20)
    b = task.sample(np.random.default_rng(3), 64)
    assert b.mask.all() and b.mask.shape == (64, 20)
    np.testing.assert_array_equal(b.inputs[:, 1:], b.targets[:, :-1])
    for inp, tgt in zip(b.inputs, b.targets):
        window = c.decode(inp) + c.decode(tgt[-1:])
        # inside one run of training blocks: a substring of the training text that
        # does not cross into validation text
        assert any(window in TEXT[s:s + 300] for s in range(0, len(TEXT), 400))
        assert window in train
    again = task.sample(np.random.default_rng(3), 64)
    np.testing.assert_array_equal(again.inputs, b.inputs)
    assert task.chance == pytest.approx(1 / c.vocab_size, abs=1e-15)
    v = CorpusTask(c, 20, split="valid").sample(np.random.default_rng(0), 16)
    for inp in v.inputs:
        assert any(c.decode(inp) in blk for blk in valid)


def test_python_corpus_is_the_topics_and_the_listed_modules():
    from pydoc_data.topics import topics

    sources = builtin_sources()
    labels = [label for label, _ in sources]
    assert labels[:len(topics)] == [f"pydoc topic {k}" for k in sorted(topics)]
    assert labels[len(topics):] == [f"{m}.py" for m in STDLIB_MODULES]
    c = python_corpus()
    text = "".join(t for _, t in sources)
    assert c.n_chars == len(text) > 400_000
    assert c.checksum == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert c.info()["python_version"] == platform.python_version()


def test_read_text_pieces_splits_multibyte_characters_across_pieces(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    pieces = list(read_text_pieces(path, piece_bytes=7))  # cuts through é and →
    assert len(pieces) > 100 and "".join(pieces) == TEXT
    assert "".join(read_text_pieces(path, piece_bytes=7, max_chars=50)) == TEXT[:50]
    c = load_text_file(path)
    assert c.checksum == hashlib.sha256(TEXT.encode()).hexdigest() and c.name == "t.txt"
    # shorter than ten blocks of 4096: the blocks shrink so there is a validation split
    assert c.block_len == len(TEXT) // 10 and len(c.runs("valid")) >= 1


def test_load_text_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        load_text_file(empty)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ValueError, match=r"blob\.bin .*(NUL|not UTF-8)"):
        load_text_file(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"latin\.txt is not UTF-8"):
        load_text_file(latin)
    short = tmp_path / "short.txt"
    short.write_text("hello world\n" * 10, encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.txt has 120 characters, too short: need "
                                         r"at least 2570"):
        load_text_file(short, min_chars=min_chars_for(256))
    with pytest.raises(ValueError, match=r"nothere\.txt does not exist"):
        load_text_file(tmp_path / "nothere.txt")
    assert min_chars_for(256) == 2570
