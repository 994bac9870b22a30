"""The README's install line gives what its test command needs, and .ci/run runs exactly those commands.
(That the pair passes in a fresh clone and virtual environment was run by hand: see the commit that added this.)"""
import os
import re
import subprocess

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme_block() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    after = text.split("<!-- ci: install and test", 1)[1]
    return after.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()


def test_ci_runs_the_readme_commands():
    out = subprocess.run(["bash", os.path.join(ROOT, ".ci", "readme-commands")], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == readme_block()
    run = open(os.path.join(ROOT, ".ci", "run")).read()
    assert 'commands=$(bash .ci/readme-commands)' in run and 'bash -euo pipefail -c "$commands"' in run
    # .ci/run installs and tests nothing of its own: only pip itself is upgraded
    assert not re.search(r"^\s*(pip install (?!-q --upgrade pip)|python -m pytest)", run, re.M)


def test_install_line_brings_what_the_test_command_needs():
    install, test = readme_block()
    assert re.match(r'pip install torch==[\d.]+ && pip install -e "\.\[test\]"\s+#', install)
    assert test.startswith("python -m pytest -q tests")
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert re.search(r'^test = \[.*"pytest".*\]$', pyproject, re.M)
