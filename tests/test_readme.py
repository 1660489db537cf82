"""The README's Python snippet runs as written, and its quick-start commands stay true."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_text():
    with open(os.path.join(REPO, "README.md")) as handle:
        return handle.read()


def test_readme_notebook_snippet_runs(capsys):
    text = readme_text()
    marker = text.index("<!-- readme-snippet")
    snippet = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    namespace = {}
    exec(compile(snippet, "README.md snippet", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "normal:" in printed
    assert namespace["learner"].evaluate(namespace["task"]).query_accuracy.shape == (1,)


def test_readme_quick_start_commands_match_ci():
    text = readme_text()
    with open(os.path.join(REPO, ".ci", "run")) as handle:
        ci = handle.read()
    assert 'pip install -e ".[test]" && python -m pytest -q' in text
    assert 'pip install -q -e ".[test]" && python3 -m pytest -q' in ci
    assert "pip install -e . && bash train_tnas.sh" in text
