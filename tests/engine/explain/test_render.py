"""Renderings of an explanation: self-contained, escaped HTML; terminal colour or plain markers;
a Markdown preview that survives table-breaking characters."""

import re

from attribution_assets.engine.explain.render import (
    explanation_html,
    explanation_markdown,
    explanation_terminal,
)
from attribution_assets.engine.explain.tokens import DocumentExplanation, Explanation


def _explanation():
    docs = [
        DocumentExplanation(1, "d<1>", "shard-00000", 0.5, 0.5, True,
                            ["<script>", " alert", "(1)", " Lisbon", "."], [0.0, 0.1, -0.05, 0.4, 0.05]),
        DocumentExplanation(2, "d2", "shard-00001", 0.2, 0.2, False,
                            ["a|b", " *c*", " `d`"], [0.0, 0.15, 0.05]),
    ]
    return Explanation("demo", "q&1", "Where was <b>Mara</b> born? Lisbon", "cosine", ["d<1>"], docs)


def test_html_is_self_contained_and_escapes_every_text():
    page = explanation_html([_explanation()])
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page.lower() and "&lt;script&gt;" in page
    assert "<b>Mara</b>" not in page and "&lt;b&gt;Mara&lt;/b&gt;" in page
    assert "q&amp;1" in page and "d&lt;1&gt;" in page
    assert not re.search(r"(src|href)=|https?://|@import|url\(", page)  # nothing fetched at view time
    assert page.count('class="tok"') == 8
    assert "rgba(34,170,85,1.000)" in page  # the largest share has full intensity
    assert "rgba(140,80,200," in page  # a negative share is purple
    assert "&#10003; gold" in page


def test_terminal_marks_the_top_tokens_plainly_or_in_colour():
    plain = explanation_terminal(_explanation(), colour=False)
    assert "\x1b[" not in plain
    assert "[[ Lisbon]]" in plain and "[[ alert]]" in plain and "[[.]]" in plain and "[[(1)]]" not in plain
    assert "GOLD" in plain.splitlines()[3]
    coloured = explanation_terminal(_explanation(), colour=True)
    assert "\x1b[48;5;" in coloured and "[[" not in coloured


def test_markdown_preview_bolds_top_token_runs_and_escapes_table_characters():
    md = explanation_markdown([_explanation()], "/x/explanations.html")
    assert "`/x/explanations.html`" in md
    rows = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2
    # top 3 of doc 1: " alert", " Lisbon", "." -> runs " **alert**" and " **Lisbon.**"; "(1)" follows
    # "alert" directly, so no space is needed, but a run ending in "." before a letter gets one
    assert rows[0].endswith("| \\<script\\> **alert**(1) **Lisbon.** |") and "✓" in rows[0]
    assert rows[1].endswith("| **a\\|b \\*c\\* \\`d\\`** |"), rows[1]
    assert rows[1].count("|") - rows[1].count("\\|") == 5


def test_markdown_bold_stays_bold_next_to_letters():
    doc = DocumentExplanation(1, "d", "s", 1.0, 1.0, None, ["cold", ".", "x", "y", "z"], [0, 1, 0, 0.5, 0.4])
    md = explanation_markdown([Explanation("demo", "q", "t", "cosine", None, [doc])])
    assert md.splitlines()[-1] == "| 1 | +1.0000 | ? | cold\u2009**.**\u2009x**yz** |"
