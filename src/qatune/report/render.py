"""The report's blocks rendered twice: markdown (``report.md``) and one self-contained HTML page (``report.html``).

A block is a tuple: ``("h1"|"h2"|"h3"|"p", text)``, ``("ul", items)``, ``("table", header, rows)`` or ``("img", file)``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind == "h1":
            out += [f"# {rest[0]}", ""]
        elif kind == "h2":
            out += [f"## {rest[0]}", ""]
        elif kind == "h3":
            out += [f"### {rest[0]}", ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in rest[0]] + [""]
        elif kind == "table":
            header, body = rest
            numeric = [all(_numeric(row[i]) for row in body) and body for i in range(len(header))]
            out += ["| " + " | ".join(header) + " |",
                    "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
            out += ["| " + " | ".join(str(x) for x in row) + " |" for row in body] + [""]
        elif kind == "img":
            out += [f"![{rest[0]}]({rest[0]})", ""]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,.]+( †\d+)?|n/a", str(text)))


def _inline(text: str) -> str:
    """Markdown's bold and code spans as HTML, everything else escaped."""
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430; margin: 0;
       background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 12px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #dde1e6;
  padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; display: block; overflow-x: auto; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e5e8ec; text-align: left; white-space: nowrap; vertical-align: top; }
th { background: #eef1f5; white-space: normal; vertical-align: bottom; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:last-child { white-space: normal; min-width: 160px; } tr:hover td { background: #f8fafc; } code { font-size: 12px; background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
figure { margin: 12px 0 24px; } figure img { max-width: 100%; border: 1px solid #e5e8ec; }
figcaption { font-size: 12px; color: #5b6573; } ul { padding-left: 22px; } li { margin: 4px 0; }
"""


def to_html(blocks: list[tuple], figure_dir: Path) -> str:
    """The report as one page: figures embedded as base64 PNG, so the file can be mailed or archived alone."""
    title = next((rest[0] for kind, *rest in blocks if kind == "h1"), "Study report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body><main>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            header, body = rest
            numeric = [all(_numeric(row[i]) for row in body) and bool(body) for i in range(len(header))]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr></thead><tbody>")
            for row in body:
                out.append("<tr>" + "".join(f'<td class="num">{_inline(x)}</td>' if n else f"<td>{_inline(x)}</td>"
                                            for x, n in zip(row, numeric)) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((figure_dir / rest[0]).read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(rest[0])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(rest[0])}</figcaption></figure>")
    out.append("</main></body></html>")
    return "\n".join(out)


