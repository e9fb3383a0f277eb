"""Renderings of an explanation: whole words (pieces summed, special tokens left out), prompt and
answer marked, the first gold rank; self-contained, escaped HTML; terminal colour or plain
markers; a Markdown preview that survives table-breaking characters; a heat-map picture."""

import re

import numpy as np

from attribution_assets.engine.explain import plots
from attribution_assets.engine.explain.render import (
    explanation_html,
    explanation_markdown,
    explanation_terminal,
    top_words,
)
from attribution_assets.engine.explain.tokens import DocumentExplanation, Explanation, query_parts


def _explanation():
    docs = [
        DocumentExplanation(1, "d<1>", "shard-00000", 0.5, 0.5, True,
                            ["<script>", " alert", "(1)", " Lisbon", "."], [0.0, 0.1, -0.05, 0.4, 0.05]),
        DocumentExplanation(2, "d2", "shard-00001", 0.2, 0.2, False,
                            ["a|b", " *c*", " `d`"], [0.0, 0.15, 0.05]),
    ]
    return Explanation("demo", "q&1", "Where was <b>Mara</b> born? Lisbon", "cosine", ["d<1>"], docs,
                       "Where was <b>Mara</b> born?", " Lisbon", (1, 0.5))


def test_html_is_self_contained_and_escapes_every_text():
    page = explanation_html([_explanation()])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "<b>Mara</b>" not in page and "&lt;b&gt;Mara&lt;/b&gt;" in page
    assert "q&amp;1" in page and "d&lt;1&gt;" in page
    assert not re.search(r"(src|href)=|https?://|@import|url\(", page)  # nothing fetched at view time
    assert page.count('class="word"') == 8
    assert "first gold document at rank 1 (score +0.5000)" in page
    assert "rgba(34,170,85,1.000)" in page  # the largest share has full intensity
    assert "rgba(140,80,200," in page  # a negative share is purple
    assert "&#10003; gold" in page


def test_words_sum_their_pieces_and_drop_special_tokens():
    doc = DocumentExplanation(1, "d", "s", 1.0, 1.0, None,
                              ["Pav", "el", " Pell", "eg", "rini", " works", ".", "<|endoftext|>"],
                              [0.1, 0.2, 0.05, 0.05, 0.1, 0.3, 0.1, 0.1],
                              [False] * 7 + [True])
    words = doc.words()
    assert [w for w, _ in words] == ["Pavel", " Pellegrini", " works", "."]
    np.testing.assert_allclose([c for _, c in words], [0.3, 0.2, 0.3, 0.1])
    assert top_words(words, 2) == [0, 2]  # ties: the first wins


def test_terminal_marks_the_top_words_plainly_or_in_colour():
    plain = explanation_terminal(_explanation(), colour=False)
    assert "\x1b[" not in plain
    assert plain.splitlines()[0] == "query q&1: Where was <b>Mara</b> born? Lisbon  (answer: Lisbon)"
    assert plain.splitlines()[1] == "first gold document at rank 1 (score +0.5000)"
    assert "[[ Lisbon]]" in plain and "[[ alert]]" in plain and "[[.]]" in plain and "[[(]]" not in plain
    assert "GOLD" in plain.splitlines()[4]
    coloured = explanation_terminal(_explanation(), colour=True)
    assert "\x1b[48;5;" in coloured and "[[" not in coloured


def test_markdown_preview_bolds_top_words_and_escapes_table_characters():
    md = explanation_markdown([_explanation()], "/x/explanations.html")
    assert "`/x/explanations.html`" in md
    assert "→ answer **Lisbon**; **first gold document at rank 1 (score +0.5000)**" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    # top 3 words of doc 1: " Lisbon" 0.4, " alert" 0.1, "." 0.05; the run " Lisbon." is one bold span
    assert rows[0].endswith("| Lisbon +0.400, alert +0.100, . +0.050 | \\<script\\> **alert**(1) **Lisbon.** |")
    assert "✓" in rows[0]
    assert rows[1].endswith("| **a\\|b \\*c\\* \\`d\\`** |"), rows[1]
    assert rows[1].count("|") - rows[1].count("\\|") == 6


def test_markdown_bold_stays_bold_next_to_letters():
    doc = DocumentExplanation(1, "d", "s", 1.0, 1.0, None, ["cold", ".", "x", "y", " z", " q"],
                              [-0.1, 1, 0, 0.5, -0.2, 0.3])
    md = explanation_markdown([Explanation("demo", "q", "t", "cosine", None, [doc])])
    assert md.splitlines()[2] == "Query `q`: t; **gold documents unknown**"
    assert md.splitlines()[-1].endswith("| cold\u2009**.xy** z **q** |"), md.splitlines()[-1]


def test_queries_split_into_prompt_and_answer():
    assert query_parts({"prompt": "Mara was born in", "completion": " Lisbon"}) == ("Mara was born in", " Lisbon")
    assert query_parts({"text": "Mara was born in Lisbon"}) == ("Mara was born in Lisbon", "")
    chat = {"messages": [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "Lisbon"}]}
    assert query_parts(chat) == ("Where?", "Lisbon")


def test_heat_map_picture_is_a_wide_png(tmp_path):
    path = plots.explanation_picture(_explanation(), tmp_path / "h.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and int.from_bytes(data[16:20], "big") == 800
