"""No function in `ranke/` is longer than 60 lines (an ast count, decorators and docstring
included), except the tables that build argument parsers: a long function is a recipe or a
stage that wants splitting into named steps."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
# argument-parser tables: long because every option is a line, with nothing to split
PARSER_TABLES = {"build_parser"}


def long_functions(root: Path, max_lines: int = MAX_LINES) -> list[tuple[int, str]]:
    """(lines, "path:line name") of every function under `root/ranke` over `max_lines`, longest first."""
    found = []
    for path in sorted((root / "ranke").rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
                lines = node.end_lineno - start + 1
                if lines > max_lines and node.name not in PARSER_TABLES:
                    found.append((lines, f"{relative}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_no_function_is_over_60_lines():
    assert long_functions(ROOT) == []


def test_the_count_finds_a_long_function(tmp_path):
    (tmp_path / "ranke").mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_LINES))
    (tmp_path / "ranke" / "long.py").write_text(f"@staticmethod\ndef recipe():\n{body}")
    assert long_functions(tmp_path) == [(MAX_LINES + 2, "ranke/long.py:2 recipe")]
