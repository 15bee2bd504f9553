"""Every measured figure in the READMEs comes from a committed results file.

A README "unit" is one table row, one list item or one paragraph. A figure is a number a reader would
take as measured: three or more decimals (an AUC, a log loss), a ratio ("2.4x", "2.4×"), a share
("76%"), or a number with a unit of speed, size or latency ("12,807 samples/s", "366 MiB", "8 ms").
Run times ("~15 min", "2:36") are not figures here: they depend on the machine of the day.

Each figure must occur in a results file that its unit links (`results/NAME.md` or `.json`), or, when
the unit links none, one that its section (the text under the same heading) links. Figures that are
arithmetic on the results (a difference, a sum, a rounded range) or settings, not measurements, are
listed with a reason in tests/readme_figures_allowed.txt.
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READMES = ["README.md", "stage1_adult/README.md", "stage2_ctr/README.md", "stage3_advanced/README.md"]
ALLOWED = ROOT / "tests" / "readme_figures_allowed.txt"

NUMBER = r"\d[\d,]*(?:\.\d+)?"
FIGURE = re.compile(
    rf"(?<![\w.])(?P<decimal>\d+\.\d{{3,}})(?![\d])"               # 0.8352, 12.1234
    rf"|(?<![\w.])(?P<ratio>{NUMBER})\s?[x×](?![\w])"               # 2.4x, 3.69×
    rf"|(?<![\w.])(?P<share>{NUMBER})\s?%"                           # 76%
    rf"|(?<![\w.])(?P<unit>{NUMBER})\s?(?:samples/s|rows/s|MiB|GiB|KiB|MB|GB|ms|µs|us|B/row|bytes)(?![\w])")
RESULTS_LINK = re.compile(r"results/([\w.-]+\.(?:md|json))")
CODE_SPAN = re.compile(r"`[^`]*`")


def units(text):
    """Split a README into (section heading, unit text) pairs: table rows, list items, paragraphs."""
    section, block, out = "", [], []

    def flush():
        if block:
            out.append((section, "\n".join(block)))
            block.clear()

    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            flush()
            continue
        if in_code:
            continue
        if line.startswith("#"):
            flush()
            section = line.strip("# ").strip()
            out.append((section, ""))
            continue
        if not line.strip():
            flush()
        elif line.startswith("|") or re.match(r"\s*([-*]|\d+\.)\s", line):
            flush()
            block.append(line)
        else:
            block.append(line)
    flush()
    return out


def figures(unit_text):
    """The figures of a unit, as written (inline code spans are commands or paths, not figures)."""
    for match in FIGURE.finditer(CODE_SPAN.sub(" ", unit_text)):
        yield next(value for value in match.groupdict().values() if value)


def normalized(number):
    """'12,807' -> '12807', '76.0' -> '76', '0.8350' -> '.835': the same number however it is written."""
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number.lstrip("0") or "0"


def figures_of(text):
    """Every number in a results file, normalized, to look figures up in."""
    return {normalized(n) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)} | {
        normalized(n) for n in re.findall(r"\d+(?:\.\d+)?", text)}


def allowed_figures(path=ALLOWED):
    """{(readme, figure)} from lines 'readme | figure | reason'; a line without a reason is an error."""
    allowed = set()
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = [part.strip() for part in line.split("|")]
        assert len(parts) == 3 and all(parts), f"{path.name}:{number}: want 'readme | figure | reason'"
        allowed.add((parts[0], parts[1]))
    return allowed


def violations(readme_path, readme_name, results_dir, allowed):
    """Figures of one README that no linked results file holds: 'README:section: figure (files)'."""
    sections = {}
    parsed = units(readme_path.read_text())
    for section, text in parsed:
        sections.setdefault(section, set()).update(RESULTS_LINK.findall(text))
    cache, found = {}, []
    for section, text in parsed:
        linked = set(RESULTS_LINK.findall(text)) or sections[section]
        for figure in figures(text):
            if (readme_name, figure) in allowed:
                continue
            files = sorted(linked)
            holders = []
            for name in files:
                if name not in cache:
                    path = results_dir / name
                    cache[name] = figures_of(path.read_text()) if path.exists() else set()
                holders.append(normalized(figure) in cache[name])
            if not any(holders):
                where = ", ".join(files) if files else "no results file linked"
                found.append(f"{readme_name} [{section}]: {figure} ({where})")
    return found


def test_every_readme_figure_is_in_its_results_file():
    allowed = allowed_figures()
    found = []
    for name in READMES:
        found += violations(ROOT / name, name, ROOT / "results", allowed)
    assert not found, "figures not found in the results file they link:\n" + "\n".join(found)


def test_allow_list_has_no_stale_lines():
    """An allowed figure that no README shows any more is a stale line (the list stays honest)."""
    shown = {(name, figure) for name in READMES
             for _, text in units((ROOT / name).read_text()) for figure in figures(text)}
    stale = sorted(allowed_figures() - shown)
    assert not stale, f"lines in {ALLOWED.name} for figures no README shows: {stale}"


def test_the_check_catches_an_edited_results_file(tmp_path):
    """The checker fails when a results file's number changes under the README that quotes it."""
    (tmp_path / "results").mkdir()
    results = tmp_path / "results" / "r.md"
    readme = tmp_path / "README.md"
    readme.write_text("| FM | 0.8352 test AUC, 12,807 samples/s, 2.4× | [r](results/r.md) |\n"
                      "\nSee `results/r.md`: 76% of the peak, batch 4096 in 8 ms.\n")
    results.write_text("| fm | 0.8352 | 12807 | 2.4 | 76.0 | 8 |\n")
    assert violations(readme, "README.md", tmp_path / "results", set()) == []
    results.write_text("| fm | 0.8353 | 12807 | 2.4 | 75.0 | 8 |\n")
    found = violations(readme, "README.md", tmp_path / "results", set())
    assert [line.split(": ")[1] for line in found] == ["0.8352 (r.md)", "76 (r.md)"]
    assert violations(readme, "README.md", tmp_path / "results", {("README.md", "0.8352"),
                                                                 ("README.md", "76")}) == []
