"""The README's examples, and those of the docs it links to, run as written; CI runs the README's test command."""

from __future__ import annotations

import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The reference pages moved out of the README (issue 21 §5); their examples are tested as the README's were.
DOCS = {name: (ROOT / "docs" / name).read_text() for name in ("environment.md", "plugins.md", "bench.md", "rewards.md")}
EXAMPLES = {"README.md": README, **{f"docs/{name}": text for name, text in DOCS.items()}}


def _blocks(lang: str) -> list[tuple[str, str]]:
    """(file, block) for every fenced ``lang`` block of the README and the docs above."""
    return [(name, b) for name, text in EXAMPLES.items() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def test_readme_python_examples_run(capsys):
    runnable = [(name, b) for name, b in _blocks("python") if not b.startswith("# my_plugin.py")]
    assert len(runnable) >= 2 and any(name == "README.md" for name, _ in runnable)
    for name, block in runnable:
        exec(compile(block, name, "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "The weather today is\u2502" in out and "score=" in out and "(8,) (8," in out


def test_readme_plugin_example_registers_a_reward():
    from rlhf_env.plugins import PluginHost

    block = re.search(r"```python\n(# my_plugin.py.*?)```", DOCS["plugins.md"], flags=re.S).group(1)
    module = types.ModuleType("my_plugin")
    exec(compile(block, "docs/plugins.md", "exec"), module.__dict__)
    host = PluginHost(builtins=(), autoload=False)
    host.register(module, name="my_plugin")
    reward = host.rewards.get("shout")()
    assert reward(["x"], ["hi!!"]) == [0.5] and host.rewards.entry("shout").plugin == "my_plugin"


def test_ci_runs_the_readme_test_command():
    setup = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    assert commands[0].endswith("&& rlhf bench")  # the main job: the embedded default suite
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_shows_the_committed_default_results():
    results = ROOT / "benchmarks" / "results" / "bench_default"
    committed = [line for line in (results / "results.md").read_text().splitlines() if line.startswith("| ")]
    shown = [line for line in README.splitlines() if line.startswith("| ")]
    assert committed and all(line in shown for line in committed), "README's bench table differs from results.md"
    assert "benchmarks/results/bench_default/frontier.png" in README and (results / "frontier.png").is_file()


def test_readme_suite_example_is_a_valid_suite(tmp_path):
    from rlhf_env.bench.suite import load_suite

    block = next(b for _, b in _blocks("toml") if "[budget]" in b)
    (tmp_path / "mine.toml").write_text(block)
    suite = load_suite(tmp_path / "mine.toml")
    cells = suite.cells()
    assert suite.name == "mine" and "sft" not in suite.algorithm_names() and "grpo" in suite.algorithm_names()
    assert cells[0].task.budget == {"tokens": 8000} and len(cells) == 3 * len(suite.algorithm_names())


def test_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)", README))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert linked == pages, f"unlinked: {sorted(pages - linked)}, missing: {sorted(linked - pages)}"
