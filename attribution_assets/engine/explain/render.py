"""Renderings of :class:`~attribution_assets.engine.explain.tokens.Explanation`: a
self-contained HTML heat map (inline CSS, no scripts, no network; every text escaped), a
terminal view (ANSI colours, or plain ``[[markers]]`` around the top words) and a Markdown
preview (Dagster metadata; the UI's picture of the heat map is ``plots.explanation_picture``).
Every view shows whole words (their pieces' shares summed, special tokens left out), the
query's prompt and answer, and the rank of its first gold document. Colours: green = the word
supports the query (positive share), purple = it opposes; intensity = ``|share| / max |share|``
within the document.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from attribution_assets.engine.explain.tokens import DocumentExplanation, Explanation

TOP_WORDS = 3  # words marked in the plain and Markdown views

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 60em; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; }
.query { background: #f4f4f4; padding: .6em; border-radius: 4px; }
.answer { font-weight: bold; border-bottom: 2px solid #2a7; }
.label { font-size: .8em; color: #777; text-transform: uppercase; margin-right: .3em; }
.doc { border: 1px solid #ddd; border-radius: 4px; padding: .6em; margin: .8em 0; }
.doc.gold { border-color: #2a7; border-width: 2px; }
.meta { font-size: .9em; color: #555; margin-bottom: .4em; }
.gold-mark { color: #2a7; font-weight: bold; }
.words { white-space: pre-wrap; line-height: 1.9; font-size: 1.05em; }
.word { border-radius: 3px; padding: 0 1px; }
.legend span { padding: 0 .4em; }
table { border-collapse: collapse; } td, th { padding: .1em .6em; text-align: right; }
"""


def share_colour(share: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(share) / scale)
    rgb = "34,170,85" if share >= 0 else "140,80,200"
    return f"rgba({rgb},{alpha:.3f})"


def share_scale(words: Sequence[tuple[str, float]]) -> float:
    return max((abs(c) for _, c in words), default=0.0)


def top_words(words: Sequence[tuple[str, float]], n: int = TOP_WORDS) -> list[int]:
    """Indices of the ``n`` words with the highest shares (ties: first wins), blank ones never."""
    order = sorted((i for i, (w, _) in enumerate(words) if w.strip()), key=lambda i: (-words[i][1], i))
    return order[:n]


def gold_rank_line(expl: Explanation) -> str:
    """Where the query's first gold document ranks, in words (plain text)."""
    if expl.gold_doc_ids is None:
        return "gold documents unknown"
    if expl.first_gold is None:
        return f"no gold document among the kept scores ({len(expl.gold_doc_ids)} gold)"
    rank, score = expl.first_gold
    return f"first gold document at rank {rank} (score {score:+.4f})"


def _query_html(expl: Explanation) -> str:
    if not expl.prompt and not expl.answer:
        return f'<div class="query"><span class="label">query</span>{html.escape(expl.query_text)}</div>'
    answer = (f' <span class="label">answer</span><span class="answer">{html.escape(expl.answer)}</span>'
              if expl.answer else "")
    return f'<div class="query"><span class="label">prompt</span>{html.escape(expl.prompt)}{answer}</div>'


def _doc_html(doc: DocumentExplanation) -> str:
    words = doc.words()
    scale = share_scale(words)
    spans = "".join(
        f'{html.escape(w[:len(w) - len(w.lstrip())])}<span class="word" style="background:{share_colour(c, scale)}" '
        f'title="{c:+.4g}">{html.escape(w.lstrip())}</span>' for w, c in words)
    top = ", ".join(f"<b>{html.escape(words[i][0].strip())}</b> {words[i][1]:+.3g}" for i in top_words(words))
    gold = ' <span class="gold-mark">&#10003; gold</span>' if doc.gold else ""
    return (f'<div class="doc{" gold" if doc.gold else ""}">'
            f'<div class="meta">#{doc.rank} &middot; score {doc.score:+.4f} (shares sum to '
            f'{doc.recomputed:+.4f}) &middot; <code>{html.escape(doc.doc_id)}</code> &middot; '
            f'{html.escape(doc.shard)}{gold}</div>'
            f'<div class="words">{spans}</div><div class="meta">top words: {top}</div></div>')


def explanation_section(expl: Explanation) -> str:
    """One query's HTML section (a heading, the query's prompt and answer, its documents)."""
    gold = ("" if expl.gold_doc_ids is None else
            f" &middot; {sum(bool(d.gold) for d in expl.documents)} of {len(expl.gold_doc_ids)} gold "
            "documents in this list")
    return (f"<h2>Query <code>{html.escape(expl.query_id)}</code></h2>{_query_html(expl)}"
            f'<div class="meta">{len(expl.documents)} top documents &middot; metric {html.escape(expl.metric)}'
            f"{gold} &middot; <b>{html.escape(gold_rank_line(expl))}</b></div>"
            + "".join(_doc_html(d) for d in expl.documents))


def explanation_html(explanations: Sequence[Explanation], title: str | None = None) -> str:
    """A standalone HTML page (inline CSS only) for one or more queries."""
    if not explanations:
        raise ValueError("nothing to render: no explanations")
    title = title or f"Attribution explanations: {explanations[0].pipeline}"
    legend = ('<p class="legend"><span style="background:rgba(34,170,85,.8)">supports the query</span> '
              '<span style="background:rgba(140,80,200,.8)">opposes it</span> &middot; each word shows '
              "its share of the document's score (its pieces summed; hover for the value); shares sum to "
              "the score.</p>")
    body = "".join(explanation_section(e) for e in explanations)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{legend}{body}"
            "</body></html>\n")


def _ansi(piece: str, share: float, scale: float) -> str:
    level = 0 if scale <= 0 else min(4, int(5 * abs(share) / scale))
    if level == 0:
        return piece
    green, purple = (194, 157, 120, 83, 28), (189, 183, 141, 135, 91)  # xterm-256, light to dark
    bg = (green if share >= 0 else purple)[level]
    fg = 16 if level < 3 else 231
    return f"\x1b[48;5;{bg}m\x1b[38;5;{fg}m{piece}\x1b[0m"


def query_plain(expl: Explanation) -> str:
    """The query as text, its answer (the completion the loss covers) repeated after it."""
    if not expl.prompt and not expl.answer:
        return expl.query_text
    return f"{expl.prompt}{expl.answer}  (answer: {expl.answer.strip()})" if expl.answer.strip() else expl.prompt


def explanation_terminal(expl: Explanation, colour: bool) -> str:
    """A terminal view: ANSI background colours when ``colour``, else the top words ``[[marked]]``."""
    lines = [f"query {expl.query_id}: {query_plain(expl)}", gold_rank_line(expl), f"metric {expl.metric}; "
             + ("green = supports, purple = opposes" if colour else f"[[ ]] = the top {TOP_WORDS} words")]
    for doc in expl.documents:
        mark = {True: "  GOLD", False: "", None: ""}[doc.gold]
        lines.append(f"\n#{doc.rank} {doc.score:+.4f} (shares sum {doc.recomputed:+.4f})  {doc.doc_id}  "
                     f"{doc.shard}{mark}")
        words = doc.words()
        top, scale = set(top_words(words)), share_scale(words)
        text = "".join(_ansi(w, c, scale) if colour else (f"[[{w}]]" if i in top else w)
                       for i, (w, c) in enumerate(words))
        lines.append("  " + text.strip().replace("\n", "\n  "))
        lines.append("  top: " + ", ".join(f"{words[i][0].strip()!r} {words[i][1]:+.3g}" for i in top_words(words)))
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text).replace("\n", " ")


def _md_bold(text: str, before: str, after: str) -> str:
    """``text`` in bold, its outer spaces kept outside; a thin space separates the ``**`` from
    a letter or digit ``before``/``after`` where the text itself starts/ends with punctuation
    (else CommonMark reads the ``**`` literally)."""
    core = text.strip()
    start, end = text.index(core), text.index(core) + len(core)
    lead = text[:start] or ("\u2009" if before[-1:].isalnum() and not core[0].isalnum() else "")
    trail = text[end:] or ("\u2009" if after[:1].isalnum() and not core[-1].isalnum() else "")
    return f"{lead}**{_md_escape(core)}**{trail}"


def _md_document(words: Sequence[tuple[str, float]]) -> str:
    """The document's words with each run of top words in bold."""
    top, out, run = set(top_words(words)), [], []
    texts = [w for w, _ in words] + [""]
    for i, text in enumerate(texts):
        if i in top:
            run.append(text)
            continue
        if run:
            before = texts[i - len(run) - 1] if i - len(run) > 0 else ""
            out.append(_md_bold("".join(run), before, text))
            run = []
        out.append(_md_escape(text))
    return "".join(out).strip()


def query_markdown(expl: Explanation) -> str:
    """The query's prompt and answer (or text) and its first gold rank, one Markdown line."""
    if expl.prompt or expl.answer:
        shown = f"{_md_escape(expl.prompt)} → answer **{_md_escape(expl.answer.strip())}**" if expl.answer.strip() \
            else _md_escape(expl.prompt)
    else:
        shown = _md_escape(expl.query_text)
    return f"Query `{expl.query_id}`: {shown}; **{gold_rank_line(expl)}**"


def explanation_markdown(explanations: Sequence[Explanation], html_path: str | None = None) -> str:
    """A Markdown preview: per query its prompt, answer and first gold rank, then a table of rank,
    score, gold mark, top words with their shares and the text with its top words in bold."""
    out = [f"**Sample explanations** (bold: the document's top {TOP_WORDS} words by share of the score, "
           "word pieces summed)" + (f"; the HTML heat maps are also written to `{html_path}`" if html_path else "")]
    for expl in explanations:
        out += ["", query_markdown(expl), "",
                "| rank | score | gold | top words | document |", "|---:|---:|:---:|---|---|"]
        for doc in expl.documents:
            gold = {True: "✓", False: "", None: "?"}[doc.gold]
            words = doc.words()
            top = ", ".join(f"{_md_escape(words[i][0].strip())} {words[i][1]:+.3f}" for i in top_words(words))
            out.append(f"| {doc.rank} | {doc.score:+.4f} | {gold} | {top} | {_md_document(words)} |")
    return "\n".join(out)
