"""README.md and docs/PERF.md say what is true: short enough, real paths, commands that parse,
and result tables that match the committed results they link to."""

import csv
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/PERF.md"]
# Paths a doc may name that live outside the repository: a placeholder prefix, an absolute path,
# or what the scripts create (.venv/ by scripts/install.sh).
OUTSIDE = ("<", "/", "~", "http://", "https://", ".venv/")


def text(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def code_spans(markdown: str) -> list:
    """Inline code, and each line of the bash blocks (python blocks are run by another test)."""
    shell = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
             for line in block.splitlines()]
    markdown = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return re.findall(r"`([^`\n]+)`", markdown) + [line for line in shell if line.strip()]


def named_paths(markdown: str) -> set:
    """Link targets, and every word of a code span that looks like a repository path."""
    paths = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", markdown)}
    for span in code_spans(markdown):
        for word in span.split():
            word = word.strip("\"',;:()")
            if "/" in word and not re.search(r"[=|*]", word) or re.fullmatch(r"[\w.-]+\.(py|sh)", word):
                paths.add(word)
    return {p for p in paths if p and not p.startswith(OUTSIDE)}


def test_readme_is_an_entry_point_of_at_most_130_lines():
    lines = text("README.md").splitlines()
    assert len(lines) <= 130, len(lines)


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_a_doc_names_exists(doc):
    missing = []
    for path in sorted(named_paths(text(doc))):
        known = path.split("<")[0]  # benchmarks/results/<device>/ -> benchmarks/results/
        if "/" in path:
            ok = (ROOT / known).exists()
        else:  # a bare file name: somewhere in the tree
            ok = any(p for p in ROOT.rglob(path) if ".venv" not in p.parts)
        if not ok:
            missing.append(path)
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def _bench_run():
    spec = importlib.util.spec_from_file_location("bench_run_for_docs", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_bench():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its siblings
    spec = importlib.util.spec_from_file_location("model_bench_for_docs", ROOT / "benchmarks" / "model_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("doc", DOCS)
def test_benchmark_commands_in_a_doc_take_those_options(doc):
    run = _bench_run()
    commands = 0
    for span in code_spans(text(doc)):
        words = shlex.split(span)
        for i, w in enumerate(words):
            if w in ("benchmarks/run.py", "scripts/run.sh") and i > 0 and words[i - 1] in ("python", "bash"):
                args = words[i + 1:]
                commands += 1
                try:
                    run.parse_args(args)
                except SystemExit as e:
                    assert e.code == 0, f"{doc}: `{span}` does not parse"  # --help exits 0
            if w == "benchmarks/model_bench.py" and i > 0 and words[i - 1] == "python":
                try:
                    _model_bench().parse_args(words[i + 1:])
                except SystemExit as e:
                    assert e.code == 0, f"{doc}: `{span}` does not parse"
    assert doc != "README.md" or commands >= 3


def _number(cell: str):
    """'0.226 (25.6×)' -> [(0.226, 3), (25.6, 1)]: each value with its decimals."""
    return [(float(v), len(v.split(".")[1]) if "." in v else 0) for v in re.findall(r"\d+(?:\.\d+)?", cell)]


def _close(printed, decimals, value) -> bool:
    return abs(printed - value) <= 0.5 * 10 ** -decimals + 1e-9


COLUMN_CANDIDATES = {"PEFT Uni-LoRA": "peft-unilora", "triton": "unilora[triton]", "cuda": "unilora[cuda]",
                     "cpu": "unilora[cpu]", "reference": "unilora[reference]"}


def result_tables(readme: str):
    """(layer.csv path, header, rows) for each table that follows a line linking a layer.csv."""
    lines = readme.splitlines()
    csv_path = None
    for i, line in enumerate(lines):
        link = re.search(r"\]\((benchmarks/results/[^)]+/layer\.csv)\)", line)
        if link:
            csv_path = link.group(1)
        elif csv_path and line.startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            yield csv_path, [c.strip() for c in line.strip("|").split("|")], rows
            csv_path = None


def test_readme_result_tables_match_the_results_they_link():
    tables = list(result_tables(text("README.md")))
    assert tables, "the README lost its results tables"
    for csv_path, header, rows in tables:
        timed = [r for r in csv.DictReader(open(ROOT / csv_path, encoding="utf-8")) if r["median_ms"]]
        for row in rows:
            cell = dict(zip(header, row))
            shape = cell.get("shape") or cell["shape, d"].split(",")[0]
            d = cell["shape, d"].split(",", 1)[1].replace(",", "").strip() if "shape, d" in cell else None
            match = [r for r in timed if f"{r['in_features']}x{r['out_features']}" == shape and r["mode"] == cell["mode"]
                     and r["M"] == cell["M"] and (d is None or r["d"] == d)]
            by_name = {r["candidate"]: r for r in match}
            assert len(by_name) == len(match), f"{csv_path}: {row} matches several d; name it"
            (base_ms, dec), = _number(cell["base ms"])
            assert _close(base_ms, dec, float(by_name["base"]["median_ms"])), (csv_path, row)
            for column, value in cell.items():
                name = next((c for prefix, c in COLUMN_CANDIDATES.items() if column.startswith(prefix)), None)
                if name is None:
                    continue
                r = by_name[name]
                numbers = _number(value)
                truth = [float(r["median_ms"]), float(r["ratio_to_base"]), 1 / float(r["ratio_to_naive"])]
                assert all(_close(p, dec, t) for (p, dec), t in zip(numbers, truth)), (csv_path, row, column, truth)
