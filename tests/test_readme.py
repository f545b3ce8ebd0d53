"""The README's quick start stays true: CI runs exactly its test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text: str) -> list[str]:
  blocks, inside, current = [], False, []
  for line in text.splitlines():
    if line.strip().startswith("```"):
      if inside:
        blocks.append("\n".join(current).strip())
        current = []
      inside = not inside and line.strip() == "```bash"
      continue
    if inside:
      current.append(line)
  return blocks


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
  commands = _bash_blocks(quick_start)
  assert len(commands) == 2, "the quick start is two commands: generate, and test"
  generate_cmd, test_cmd = commands
  assert "kvjax generate" in generate_cmd and "pip install" in generate_cmd
  assert "pytest" in test_cmd and "pip install" in test_cmd
  ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
  assert test_cmd in ci_lines, f".ci/run must run the README test command verbatim: {test_cmd}"
