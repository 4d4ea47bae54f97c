"""Markdown table printing shared by the benchmark scripts."""


def markdown_table(header: list[str], lines: list[list[str]], left: int = 1) -> None:
    """Print a markdown table; the first ``left`` columns are left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line[:left], widths[:left])]
        cells += [c.rjust(w) for c, w in zip(line[left:], widths[left:])]
        print("| " + " | ".join(cells) + " |")
