"""Every shell command of a guide runs: the ```bash blocks of a doc, command by command, in a fresh folder.

`doc_commands(doc)` reads a Markdown file's ```bash blocks into commands (a line with its backslash
continuations and its here-document); `run_doc_commands(doc, workdir, env)` runs them in order, each in its own
``bash -o pipefail`` (so a command may not rely on an earlier one's ``cd`` or ``export``: write paths relative to
the repository root, which is how the guides are read). A guide is added by one line in `GUIDES`.

The commands run as a reader runs them, from a checkout in kvcast's venv, with three stand-ins on ``PATH``:

* ``kvcast`` is this interpreter's ``kvcast.cli`` (the checkout's code, not whatever the venv installed);
* ``python`` is this interpreter;
* ``pip install PATH...`` installs with ``--no-deps --no-build-isolation --no-index --target SITE`` into the
  run's own folder, which is first on ``PYTHONPATH``: offline, in a second or two, leaving the venv as it was,
  and visible to every later command, entry points included. Any other ``pip`` command fails.

The working folder holds copies of the repository files the guide names (`copy_into`), so a build writes
nothing into the checkout. ```python blocks with a ``title="PATH"`` must be PATH's text, exactly.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.factories import REPO_ROOT


@dataclass(frozen=True)
class Guide:
    doc: str
    """The Markdown file, relative to the repository root."""
    copy_into: tuple[str, ...] = ()
    """Repository files and folders its commands read, copied into the working folder."""


GUIDES = (
    Guide("docs/writing-a-policy.md", copy_into=("examples/kvcast-policy-example",)),
    Guide("docs/index.md", copy_into=("traces/default",)),
)


@dataclass(frozen=True)
class DocCommand:
    doc: Path
    line: int
    """Line of the doc where the command starts (1-based)."""
    text: str


_BUILD_LEFTOVERS = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis")
"""What a reader's own build or test run may have left in a copied folder."""
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)(.*)$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def fenced_blocks(doc: Path) -> list[tuple[int, str, str, str]]:
    """Every fenced block of `doc`: (line of its first content line, language, the rest of the info string,
    text)."""
    blocks, lines = [], doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i].strip())
        if not match:
            i += 1
            continue
        fence, language, info = match.group(1), match.group(2), match.group(3).strip()
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        if i == len(lines):
            raise ValueError(f"{doc}:{start}: the block opened here is never closed")
        blocks.append((start + 1, language, info, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


def doc_commands(doc: Path) -> list[DocCommand]:
    """The commands of `doc`'s ```bash blocks, in order. A command is a line, its continuation lines (after a
    trailing backslash) and the body of a here-document it opens; blank lines and ``#`` comment lines are not
    commands."""
    commands = []
    for first, language, _, text in fenced_blocks(doc):
        if language not in ("bash", "sh", "shell"):
            continue
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.strip() or line.lstrip().startswith("#"):
                i += 1
                continue
            start, body = i, [line]
            while body[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                body.append(lines[i])
            heredoc = _HEREDOC.search(" ".join(body))
            if heredoc:
                end = heredoc.group(2)
                while i + 1 < len(lines) and lines[i].strip() != end:
                    i += 1
                    body.append(lines[i])
                if body[-1].strip() != end:
                    raise ValueError(f"{doc}:{first + start}: here-document {end!r} is never closed")
            commands.append(DocCommand(doc, first + start, "\n".join(body)))
            i += 1
    return commands


_PIP = """#!/usr/bin/env bash
if [ "$1" != install ]; then echo "docs test: only 'pip install PATH' runs here, not 'pip $*'" >&2; exit 2; fi
shift
exec {python} -m pip install --quiet --no-deps --no-build-isolation --no-index --target {site} "$@"
"""


def command_environment(workdir: Path) -> dict[str, str]:
    """The environment of the commands: the stand-ins for ``kvcast``, ``python`` and ``pip`` first on
    ``PATH``, the run's site folder and then the checkout first on ``PYTHONPATH``."""
    bin_dir, site = workdir / ".docs-bin", workdir / ".docs-site"
    bin_dir.mkdir()
    site.mkdir()
    python = shlex.quote(sys.executable)
    scripts = {
        "kvcast": f'#!/usr/bin/env bash\nexec {python} -c "import sys; from kvcast.cli import main; '
                  f'sys.argv[0] = \'kvcast\'; main()" "$@"\n',
        "python": f'#!/usr/bin/env bash\nexec {python} "$@"\n',
        "pip": _PIP.format(python=python, site=shlex.quote(str(site))),
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "Agg"
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def run_doc_commands(doc: Path, workdir: Path, env: dict[str, str], timeout_s: float = 300.0) -> int:
    """Run every command of `doc` in `workdir`, in order; fail the test at the first that fails, naming its
    line and showing its output. Returns how many ran."""
    commands = doc_commands(doc)
    for command in commands:
        try:
            done = subprocess.run(["bash", "-o", "pipefail", "-c", command.text], cwd=workdir, env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{doc.name}:{command.line}: ran over {timeout_s:.0f} s:\n{command.text}")
        if done.returncode != 0:
            pytest.fail(f"{doc.name}:{command.line}: exit code {done.returncode}:\n{command.text}\n"
                        f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
    return len(commands)


def test_commands_are_read_as_a_reader_types_them(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("text\n\n```bash\n# a comment\nkvcast simulate \\\n    --out x   # trailing\n\n"
                   "python - <<'EOF'\nprint(1)\n\nEOF\necho done\n```\n\n```python\nprint(2)\n```\n"
                   "```sh\nls\n```\n")
    commands = doc_commands(doc)
    assert [(c.line, c.text) for c in commands] == [
        (5, "kvcast simulate \\\n    --out x   # trailing"),
        (8, "python - <<'EOF'\nprint(1)\n\nEOF"),
        (12, "echo done"),
        (19, "ls"),
    ]
    doc.write_text("```bash\ncat <<EOF\nnever closed\n```\n")
    with pytest.raises(ValueError, match="here-document 'EOF' is never closed"):
        doc_commands(doc)


def test_a_failing_command_fails_the_run_naming_its_line(tmp_path):
    doc = tmp_path / "guide.md"
    doc.write_text("```bash\ntrue\nfalse | cat\n```\n")
    with pytest.raises(pytest.fail.Exception, match="guide.md:3: exit code 1"):
        run_doc_commands(doc, tmp_path, dict(os.environ))


@pytest.mark.slow
@pytest.mark.parametrize("guide", GUIDES, ids=lambda g: g.doc)
def test_every_command_of_the_guide_runs(guide, tmp_path):
    doc = REPO_ROOT / guide.doc
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name in guide.copy_into:
        source, target = REPO_ROOT / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=_BUILD_LEFTOVERS)
        else:
            shutil.copy2(source, target)
    for line, _, info, text in fenced_blocks(doc):
        title = re.search(r'title="([^"]+)"', info)
        if title:
            assert text == (REPO_ROOT / title.group(1)).read_text(), \
                f"{guide.doc}:{line}: the block differs from {title.group(1)}"
    env = command_environment(workdir)
    assert run_doc_commands(doc, workdir, env) >= 3


@pytest.mark.slow
def test_the_example_policy_is_found_by_its_entry_point_in_a_fresh_process(tmp_path):
    """The example package, installed as the guide installs it, is a policy name in another process."""
    workdir = tmp_path / "work"
    shutil.copytree(REPO_ROOT / "examples/kvcast-policy-example", workdir / "example", ignore=_BUILD_LEFTOVERS)
    env = command_environment(workdir)
    subprocess.run(["pip", "install", "./example"], cwd=workdir, env=env, check=True, capture_output=True)
    code = ("from kvcast.policies.registry import default_registry\n"
            "registry = default_registry()\n"
            "print(type(registry.create('loss-budget:loss=0.01')).__name__, registry.origin('loss-budget'))\n")
    out = subprocess.run(["python", "-c", code], cwd=workdir, env=env, check=True, capture_output=True,
                         text=True).stdout
    assert out.startswith("LossBudgetPolicy package 'kvcast-policy-example' (entry point loss-budget = ")


# Every `kvcast ...` line of every doc names a command and options that exist. Guides in `GUIDES` run in full;
# the other pages hold long runs (sweeps of many minutes, servers, GPU benchmarks) that no test runs, so their
# command lines are checked against the CLI instead: a renamed option or command fails here.

DOCS = (*sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "README.md", REPO_ROOT / "traces" / "README.md")
_PLACEHOLDER = re.compile(r"^[A-Z_<\[]|\.\.\.")


def kvcast_invocations(doc: Path) -> list[tuple[int, list[str]]]:
    """(line, words after ``kvcast``) of each kvcast command in `doc`'s shell blocks and in its inline code
    spans that start with ``kvcast`` followed by a lowercase command name."""
    found = []
    for command in doc_commands(doc) if doc.suffix == ".md" else []:
        text = command.text.replace("\\\n", " ")
        for segment in re.split(r"&&|\|\||;|\|", text.split("\n")[0]):
            words = segment.split("#", 1)[0].split()
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words and words[0] == "kvcast":
                found.append((command.line, words[1:]))
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        for span in re.findall(r"`(kvcast [a-z][^`]*)`", line):
            found.append((number, span.split()[1:]))
    return found


def _resolve(words: list[str]):
    """The click command the words name, and the words left for it."""
    import typer

    from kvcast.cli import app

    command = typer.main.get_command(app)
    rest = list(words)
    while rest and hasattr(command, "commands") and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO_ROOT)))
def test_every_documented_kvcast_command_and_option_exists(doc):
    problems = []
    for line, words in kvcast_invocations(doc):
        if not words or words[0].startswith("-"):
            continue  # `kvcast --help`, or the bare command
        command, rest = _resolve(words)
        if hasattr(command, "commands") and rest and not rest[0].startswith("-") \
                and not _PLACEHOLDER.search(rest[0]):
            problems.append(f"{doc.name}:{line}: `kvcast {' '.join(words)}`: no command {rest[0]!r}")
            continue
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for word in rest:
            if word.startswith("--"):
                name = word.split("=", 1)[0].rstrip("]),.")
                if name not in options and not _PLACEHOLDER.search(name[2:]):
                    problems.append(f"{doc.name}:{line}: `kvcast {' '.join(words)}`: no option {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("body, problem", [
    ("```bash\nkvcast simulate --policyz text\n```\n", "no option --policyz"),
    ("Run `kvcast simulat --out x` first.\n", "no command 'simulat'"),
    ("```bash\nkvcast store putt --store out/store doc.txt\n```\n", "no command 'putt'"),
    ("```bash\nMPLBACKEND=Agg kvcast sweep --slo 0.3 --gpu-shares 1 && echo\n```\n", "no option --gpu-shares"),
])
def test_the_command_check_catches_a_wrong_command_or_option(tmp_path, body, problem):
    doc = tmp_path / "guide.md"
    doc.write_text(body)
    with pytest.raises(AssertionError, match=re.escape(problem)):
        test_every_documented_kvcast_command_and_option_exists(doc)
    doc.write_text("```bash\nkvcast sweep --slo 0.3 --gpu-share 1 --out x   # fine\nkvcast store ls --store DIR\n"
                   "```\n`kvcast calibrate host`, `kvcast COMMAND --help`, `kvcast --help`\n")
    test_every_documented_kvcast_command_and_option_exists(doc)
