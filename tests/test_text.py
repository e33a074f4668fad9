from actors.text import normalize_text, split_sentences


def test_normalize_text_plain_quotes_dashes_and_spaces():
    assert normalize_text("  “Hi”\u00a0there—friend…\x07 ") == '"Hi" there - friend...'


def test_split_sentences_keeps_abbreviations_and_initials():
    text = "Dr. Smith met J. R. R. Tolkien. They talked! Did they? Yes."
    assert split_sentences(text, 200) == ["Dr. Smith met J. R. R. Tolkien.", "They talked!", "Did they?", "Yes."]


def test_split_sentences_cuts_long_sentences_without_losing_words():
    words = [f"w{i}" for i in range(300)]
    text = "Intro, " + " ".join(words) + "."
    parts = split_sentences(text, 50)
    assert all(len(p) <= 50 for p in parts)
    assert " ".join(parts).split() == text.split()


def test_split_sentences_cuts_a_single_giant_word():
    parts = split_sentences("a" * 120, 50)
    assert parts == ["a" * 50, "a" * 50, "a" * 20]
