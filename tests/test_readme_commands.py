"""CI runs the README's two fresh-machine commands as written (.ci/readme_commands.py reads them)."""
import os
import subprocess
import sys

from conftest import REPO


def readme_commands(path):
    return subprocess.run([sys.executable, os.path.join(REPO, ".ci", "readme_commands.py"), path],
                          capture_output=True, text=True)


def test_ci_runs_the_readmes_install_and_test_commands():
    result = readme_commands(os.path.join(REPO, "README.md"))
    assert result.returncode == 0, result.stderr
    install, tests = result.stdout.splitlines()
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install") and install in text
    assert tests in text and " -m pytest " in tests and ".[dev]" in tests


def test_a_readme_without_the_two_commands_fails_ci_naming_why(tmp_path):
    broken = tmp_path / "README.md"
    broken.write_text("# x\n\n```bash\npip install foo\n```\n", encoding="utf-8")
    result = readme_commands(str(broken))
    assert result.returncode != 0 and "must hold exactly two commands" in result.stderr
