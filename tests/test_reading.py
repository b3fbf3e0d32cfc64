"""The two method scripts read as their papers: the method first, main before the appendices, lines a reader can
parse (one statement per line, at most 100 characters)."""

import ast
import io
import tokenize

import pytest

from conftest import ROOT

SCRIPTS = ("iit_distill.py", "adkd_distill.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_statement_per_line_of_at_most_100_characters(script):
    source = (ROOT / script).read_text()
    wide = [n for n, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    assert not wide, f"{script}: lines over 100 characters: {wide}"
    joined = []
    for node in ast.walk(ast.parse(source)):
        # `a, b = x, y` and `a = b = x` join two statements; `a, b = f()` unpacks one value
        if isinstance(node, ast.Assign) and (len(node.targets) > 1 or (
                isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple))):
            joined.append(node.lineno)
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    semicolons = [token.start[0] for token in tokens if token.type == tokenize.OP and token.string == ";"]
    assert not joined and not semicolons, f"{script}: joined statements at lines {joined + semicolons}"


def top_level(script: str) -> tuple[str, dict]:
    """The script's source and the line of each function and class it defines at the top level."""
    source = (ROOT / script).read_text()
    tree = ast.parse(source)
    return source, {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_iit_distill_is_a_story_with_appendices():
    source, defined = top_level("iit_distill.py")
    lines = source.splitlines()
    first_method = min(line for name, line in defined.items())
    assert first_method <= 60, f"the method starts at line {first_method}"
    assert defined["main"] < 0.7 * len(lines), f"main starts at line {defined['main']} of {len(lines)}"
    assert defined["base_and_counterfactual"] > defined["main"]
    # the two objectives side by side, before the data
    assert abs(defined["distillation_loss"] - defined["task_distillation_loss"]) < 60
    assert defined["task_distillation_loss"] < defined["tokenize_paragraphs"] < defined["load_models"] < \
        defined["Args"] < defined["main"]
    for banner in ("1. THE METHOD", "2. DATA", "3. MODELS", "4. SETTINGS", "APPENDIX A. SPEED-UPS",
                   "APPENDIX B. INPUT CHECKS", "APPENDIX C. THE OFFLINE DEMO"):
        assert f"# ==== {banner}" in source, banner


def test_adkd_distill_keeps_the_same_order():
    _, defined = top_level("adkd_distill.py")
    assert min(defined.values()) <= 60
    assert defined["adkd_loss"] < defined["load_student"] < defined["Args"] < defined["main"] < \
        defined["TeacherCache"] < defined["check_args"]
    assert defined["teacher_token_maps"] < defined["adkd_loss"]
