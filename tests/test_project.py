"""The README's commands and CI stay in step."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()]


def test_ci_runs_the_readme_test_command():
    test_lines = [line for line in _readme_commands() if line.endswith("python -m pytest")]
    assert test_lines, "README has no test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_lines[0] in ci
    assert "pip install -q -r requirements.txt" in ci and "VITLAB_REQUIRE_ALL=1" in ci


def test_readme_setup_installs_requirements_and_runs_the_app():
    setup = [line for line in _readme_commands() if "pip install -r requirements.txt" in line]
    assert setup and "streamlit run app.py" in setup[0]
