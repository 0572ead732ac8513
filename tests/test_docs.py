"""The docs stay true: every `python <script>.py ...` command in README.md and docs/*.md is accepted by
today's parser of that script (or, where the docs say it ran at an older commit, uses flags that commit
had); every relative link and anchor resolves; README.md stays a guide; no path of one machine appears."""
import contextlib
import importlib
import io
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 180
PYTHONS = {"python", "python3", ".venv/bin/python"}
SEPARATORS = {";", "&&", "||", "|", "&"}
REDIRECTIONS = {">", ">>", "<"}
ELLIPSES = {"...", "\u2026"}
# A command that the docs say ran at an older commit ("... at `6c742ec`") is checked against that commit.
PINNED = re.compile(r"\bat `([0-9a-f]{7,40})`")
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|root)/")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`]+)`")


class Command(NamedTuple):
    where: str  # file:line, for the failure message
    text: str  # as the docs show it
    script: str  # path relative to the repository root
    args: list
    commit: str  # the commit it ran at, where the docs name one; "" for today's code


# ---------------------------------------------------------------------------------------------------
# Reading the docs: code-block lines, and inline code in paragraphs and table rows
# ---------------------------------------------------------------------------------------------------

def code_lines(lines):
    """(line number, text) of each code-block line, backslash continuations joined."""
    inside, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        start = start if pending else number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def prose_blocks(lines):
    """(first line number, text) of each paragraph outside code blocks, its lines joined (inline code may
    wrap); every table row is a block of its own."""
    inside, block, start = False, [], 0
    for number, line in enumerate([*lines, ""], 1):
        if line.lstrip().startswith("```"):
            inside = not inside
        if inside or line.lstrip().startswith("```") or not line.strip() or line.lstrip().startswith("|"):
            if block:
                yield start, " ".join(block)
            block = []
            if not inside and line.lstrip().startswith("|"):
                yield number, line
            continue
        start = number if not block else start
        block.append(line.strip())


def shell_words(text):
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote: prose, not a command
        return []
    comment = next((i for i, word in enumerate(words) if word.startswith("#")), len(words))
    return words[:comment]


def simple_commands(words):
    """The words of each simple command, split at ; && || | &, redirections and their targets dropped."""
    command, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in REDIRECTIONS:
            skip = True
        elif word in SEPARATORS:
            yield command
            command = []
        else:
            command.append(word)
    yield command


def script_and_args(words):
    """(script, its arguments) where `words` runs a repository script with Python or torchrun, else None.
    Environment assignments before it are skipped; `python -m` runs only torch.distributed.run."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    if words[0] in PYTHONS:
        if len(words) > 1 and words[1].endswith(".py"):
            return words[1], words[2:]
        if words[1:3] != ["-m", "torch.distributed.run"]:
            return None
    elif words[0] != "torchrun":
        return None
    script = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
    return None if script is None else (words[script], words[script + 1:])


def commands_in(text, where, commit):
    for words in simple_commands(shell_words(text)):
        found = script_and_args(words)
        if found:
            yield Command(where, text.strip(), found[0], found[1], commit)


def doc_commands(path):
    lines = path.read_text().splitlines()
    name = path.relative_to(ROOT)
    for number, line in code_lines(lines):
        pinned = PINNED.search(line)
        yield from commands_in(line, f"{name}:{number}", pinned.group(1) if pinned else "")
    for number, block in prose_blocks(lines):
        pinned = PINNED.search(block)
        for span in INLINE_CODE.findall(block):
            yield from commands_in(span, f"{name}:{number}", pinned.group(1) if pinned else "")


ALL_COMMANDS = [command for path in DOCS for command in doc_commands(path)]
TODAY = [c for c in ALL_COMMANDS if not c.commit]
PAST = [c for c in ALL_COMMANDS if c.commit]


def test_the_docs_show_commands():
    """The reader found them: the README alone shows a dozen."""
    assert len([c for c in TODAY if c.where.startswith("README.md")]) >= 12


# ---------------------------------------------------------------------------------------------------
# Today's commands: today's parsers
# ---------------------------------------------------------------------------------------------------

@cache
def parser_of(script):
    """The script's build_parser(), its module imported from the repository (benchmarks/ on the path)."""
    path = ROOT / script
    assert path.is_file(), f"the docs run {script}, which is not in the repository"
    for folder in (ROOT, path.parent):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(path.stem)
    except ModuleNotFoundError as error:
        if (ROOT / f"{error.name.split('.')[0]}.py").exists() or (ROOT / error.name.split(".")[0]).is_dir():
            raise
        pytest.skip(f"{script} needs {error.name}, not installed here")
    assert Path(module.__file__).resolve() == path.resolve(), f"{path.stem} imported from {module.__file__}"
    return module.build_parser if hasattr(module, "build_parser") else None


def parse(script, args):
    """(accepted, argparse's message)."""
    build = parser_of(script)
    if build is None:  # a module that takes no flags, like models.py
        return not args, f"{script} has no build_parser(), so it takes no arguments"
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message), contextlib.redirect_stdout(io.StringIO()):
            namespace = build().parse_args(args)
    except SystemExit as exit:
        return exit.code == 0, message.getvalue().strip()  # 0: --help
    if script == "benchmarks/accuracy.py" and namespace.train_args:  # the flags after -- go to train.py
        return parse("train.py", namespace.train_args)
    return True, ""


@pytest.mark.parametrize("command", TODAY, ids=[c.where for c in TODAY])
def test_command_parses_with_todays_script(command):
    accepted, message = parse(command.script, command.args)
    if not accepted and ELLIPSES & set(command.args):  # "...": a value (--data ...), or flags shown elsewhere
        accepted = parse(command.script, [a for a in command.args if a not in ELLIPSES])[0]
    assert accepted, f"{command.where}: `{command.text}` is refused by today's {command.script}:\n{message}"


# ---------------------------------------------------------------------------------------------------
# Commands that ran at an older commit: that commit's flags
# ---------------------------------------------------------------------------------------------------

def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


@cache
def flags_at(commit):
    """Every --flag string that the commit's code (tests left out) spells out; skips where the clone
    lacks the commit."""
    if shutil.which("git") is None or git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        pytest.skip(f"commit {commit} is not in this clone")
    found = git("grep", "-h", "-o", "-E", "-e", r"""["']--[a-z0-9][a-z0-9-]*["']""", commit, "--", "*.py",
                ":(exclude)tests")
    return {word.strip("\"'") for word in found.stdout.split()}


@pytest.mark.parametrize("command", PAST, ids=[c.where for c in PAST])
def test_command_of_an_older_commit_uses_its_flags(command):
    known = flags_at(command.commit)
    assert git("cat-file", "-e", f"{command.commit}:{command.script}").returncode == 0, \
        f"{command.where}: {command.script} is not in {command.commit}"
    unknown = [flag for flag in FLAG.findall(" ".join(a.split("=")[0] for a in command.args if a.startswith("--")))
               if flag not in known and flag.replace("--no-", "--", 1) not in known]
    assert not unknown, f"{command.where}: `{command.text}`: {command.commit} has no {', '.join(unknown)}"


# ---------------------------------------------------------------------------------------------------
# Links, length, paths
# ---------------------------------------------------------------------------------------------------

def anchors(path):
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered."""
    seen, found = {}, set()
    lines = path.read_text().splitlines()
    code = {number for number, _ in code_lines(lines)}
    for number, line in enumerate(lines, 1):
        if number in code or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path):
    """(line number, target) of each relative link outside code."""
    lines = path.read_text().splitlines()
    code = {number for number, _ in code_lines(lines)}
    for number, line in enumerate(lines, 1):
        if number not in code:
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if not re.match(r"[a-z]+:", target):
                    yield number, target


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_resolve(doc):
    broken = []
    for number, target in links(doc):
        file, _, anchor = target.partition("#")
        linked = (doc.parent / file).resolve() if file else doc
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(f"{doc.name}:{number}: {target}")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_readme_is_a_guide_not_a_notebook():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the history belongs in docs/log.md"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_no_path_of_one_machine(doc):
    found = [f"{doc.name}:{n}: {line.strip()}" for n, line in enumerate(doc.read_text().splitlines(), 1)
             if MACHINE_PATH.search(line)]
    assert not found, ("absolute paths of one machine (write ../shared/data/fer2013, PATH or a path in "
                       "the repository):\n" + "\n".join(found))
