"""Renderings of :class:`~attribution_assets.engine.explain.tokens.Explanation`: a
self-contained HTML heat map (inline CSS, no scripts, no network; every text escaped), a
terminal view (ANSI colours, or plain ``[[markers]]`` around the top tokens) and a Markdown
preview (Dagster metadata). Colours: green = the token supports the query (positive share),
purple = it opposes; intensity = ``|share| / max |share|`` within the document.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from attribution_assets.engine.explain.tokens import DocumentExplanation, Explanation

TOP_TOKENS = 3  # tokens marked in the plain and Markdown views

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 60em; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 2em; }
.query { background: #f4f4f4; padding: .6em; border-radius: 4px; font-family: monospace; }
.doc { border: 1px solid #ddd; border-radius: 4px; padding: .6em; margin: .8em 0; }
.doc.gold { border-color: #2a7; border-width: 2px; }
.meta { font-size: .9em; color: #555; margin-bottom: .4em; }
.gold-mark { color: #2a7; font-weight: bold; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.8; }
.tok { border-radius: 2px; }
.legend span { padding: 0 .4em; }
table { border-collapse: collapse; } td, th { padding: .1em .6em; text-align: right; }
"""


def _colour(share: float, scale: float) -> str:
    alpha = 0.0 if scale <= 0 else min(1.0, abs(share) / scale)
    rgb = "34,170,85" if share >= 0 else "140,80,200"
    return f"rgba({rgb},{alpha:.3f})"


def _scale(doc: DocumentExplanation) -> float:
    return max((abs(c) for c in doc.contributions), default=0.0)


def _gold_label(doc: DocumentExplanation) -> str:
    return {True: "gold", False: "not gold", None: "gold unknown"}[doc.gold]


def _doc_html(doc: DocumentExplanation) -> str:
    scale = _scale(doc)
    spans = "".join(
        f'<span class="tok" style="background:{_colour(c, scale)}" title="{c:+.4g}">{html.escape(p)}</span>'
        for p, c in zip(doc.pieces, doc.contributions))
    top = ", ".join(f"<code>{html.escape(doc.pieces[i])}</code> {doc.contributions[i]:+.3g}"
                    for i in doc.top_tokens(TOP_TOKENS))
    gold = ' <span class="gold-mark">&#10003; gold</span>' if doc.gold else ""
    return (f'<div class="doc{" gold" if doc.gold else ""}">'
            f'<div class="meta">#{doc.rank} &middot; score {doc.score:+.4f} (tokens sum to '
            f'{doc.recomputed:+.4f}) &middot; <code>{html.escape(doc.doc_id)}</code> &middot; '
            f'{html.escape(doc.shard)}{gold}</div>'
            f'<div class="tokens">{spans}</div><div class="meta">top tokens: {top}</div></div>')


def explanation_section(expl: Explanation) -> str:
    """One query's HTML section (a heading, the query, its documents)."""
    gold = ("" if expl.gold_doc_ids is None else
            f" &middot; {sum(bool(d.gold) for d in expl.documents)} of {len(expl.gold_doc_ids)} gold "
            "documents in this list")
    return (f"<h2>Query <code>{html.escape(expl.query_id)}</code></h2>"
            f'<div class="query">{html.escape(expl.query_text)}</div>'
            f'<div class="meta">{len(expl.documents)} top documents &middot; metric {html.escape(expl.metric)}'
            f"{gold}</div>" + "".join(_doc_html(d) for d in expl.documents))


def explanation_html(explanations: Sequence[Explanation], title: str | None = None) -> str:
    """A standalone HTML page (inline CSS only) for one or more queries."""
    if not explanations:
        raise ValueError("nothing to render: no explanations")
    title = title or f"Attribution explanations: {explanations[0].pipeline}"
    legend = ('<p class="legend"><span style="background:rgba(34,170,85,.8)">supports the query</span> '
              '<span style="background:rgba(140,80,200,.8)">opposes it</span> &middot; each token shows '
              "its share of the document's score (hover for the value); shares sum to the score.</p>")
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


def explanation_terminal(expl: Explanation, colour: bool) -> str:
    """A terminal view: ANSI background colours when ``colour``, else the top tokens ``[[marked]]``."""
    lines = [f"query {expl.query_id}: {expl.query_text}", f"metric {expl.metric}; "
             + ("green = supports, purple = opposes" if colour else f"[[ ]] = the top {TOP_TOKENS} tokens")]
    for doc in expl.documents:
        mark = {True: "  GOLD", False: "", None: ""}[doc.gold]
        lines.append(f"\n#{doc.rank} {doc.score:+.4f} (tokens sum {doc.recomputed:+.4f})  {doc.doc_id}  "
                     f"{doc.shard}{mark}")
        top = set(doc.top_tokens(TOP_TOKENS))
        scale = _scale(doc)
        text = "".join(_ansi(p, c, scale) if colour else (f"[[{p}]]" if i in top else p)
                       for i, (p, c) in enumerate(zip(doc.pieces, doc.contributions)))
        lines.append("  " + text.replace("\n", "\n  "))
        lines.append("  top: " + ", ".join(f"{doc.pieces[i]!r} {doc.contributions[i]:+.3g}"
                                           for i in doc.top_tokens(TOP_TOKENS)))
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


def _md_document(doc: DocumentExplanation) -> str:
    """The document's text with each run of top tokens in bold."""
    top, out, run = set(doc.top_tokens(TOP_TOKENS)), [], []
    pieces = doc.pieces + [""]
    for i, piece in enumerate(pieces):
        if i in top and piece.strip():
            run.append(piece)
            continue
        if run:
            before = doc.pieces[i - len(run) - 1] if i - len(run) > 0 else ""
            out.append(_md_bold("".join(run), before, piece))
            run = []
        out.append(_md_escape(piece))
    return "".join(out).strip()


def explanation_markdown(explanations: Sequence[Explanation], html_path: str | None = None) -> str:
    """A Markdown preview: per query a table of rank, score, gold mark and the text with its
    top tokens in bold."""
    out = ["**Sample explanations** (bold: the document's top "
           f"{TOP_TOKENS} tokens by share of the score)" + (f"; heat maps: `{html_path}`" if html_path else "")]
    for expl in explanations:
        out += ["", f"Query `{expl.query_id}`: {_md_escape(expl.query_text)}", "",
                "| rank | score | gold | document |", "|---:|---:|:---:|---|"]
        for doc in expl.documents:
            gold = {True: "✓", False: "", None: "?"}[doc.gold]
            out.append(f"| {doc.rank} | {doc.score:+.4f} | {gold} | {_md_document(doc)} |")
    return "\n".join(out)
