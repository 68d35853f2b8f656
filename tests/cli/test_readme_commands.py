"""Every `modiff` and `make` command that the README, the reports' and benchmarks' READMEs and the commands'
`--help` examples show exists as written: the subcommand, each option, the quantization presets and the `--set`
keys."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Iterator

import click
import pytest

from modiff.cli import main
from modiff.cli.calibrate import apply_overrides
from modiff.pipelines.reproduce import parse_override
from modiff.quant import presets
from modiff.quant.presets import expand_static
from modiff.quant.ptq.calibrate import CalibrationConfig

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCUMENTS = "\n".join((ROOT / doc).read_text() for doc in ("README.md", "reports/README.md",
                                                          "reports/reproducibility/README.md", "benchmarks/README.md"))
QUANT_PRESET_COMMANDS = {"sample", "bops", "evaluate", "record", "calibrate", "calibrate-shipped"}


def readme_commands(text: str, program: str) -> list[str]:
    """``program ...`` lines of the bash blocks (comments cut, continuations joined) and inline code spans."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#\s", line)[0].strip()
            if line.startswith(f"{program} "):
                found.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
    found += [span for span in re.findall(r"`([^`]+)`", prose) if span.startswith(f"{program} ")]
    return found


def help_examples() -> Iterator[str]:
    """The example lines of every command's help text."""
    def walk(command: click.Command) -> Iterator[click.Command]:
        yield command
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    for command in walk(main):
        for line in (command.help or "").replace("\\\n", " ").splitlines():
            if line.strip().startswith("modiff "):
                yield line.strip()


def _resolve(words: list[str]) -> tuple[click.Command, list[str]]:
    command = main
    while isinstance(command, click.Group) and words and words[0] in command.commands:
        command = command.commands[words.pop(0)]
    return command, words


def _preset_names(value: str) -> list[str]:
    """``qdiff-w4a4[-modiff]`` -> both names the README means."""
    if "[" not in value:
        return [value]
    head, optional, tail = re.match(r"(.*)\[(.*)\](.*)", value).groups()
    return [head + tail, head + optional + tail]


def problems(line: str) -> list[str]:
    """What in one command line does not exist; placeholders (RUN, FOLDER, ...) are taken as written."""
    words = [w for w in shlex.split(line)[1:] if w != "..."]
    if words and words[0] == "COMMAND":
        return []
    command, args = _resolve(words)
    if isinstance(command, click.Group):  # a group named alone (`modiff train`) is a reference to its commands
        return [f"{line}: no subcommand {args[:1]}"] if args else []
    options = {opt: param for param in command.params  # secondary_opts: the --no-x of a --x/--no-x flag
               for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])]}
    found = []
    for i, word in enumerate(args):
        if not word.startswith("--"):
            continue
        name, _, inline = word.partition("=")
        if name not in options:
            found.append(f"{line}: no option {name}")
            continue
        value = inline or (args[i + 1] if i + 1 < len(args) and not options[name].is_flag else "")
        if not value or value.isupper():
            continue
        try:
            if name == "--preset" and command.name in QUANT_PRESET_COMMANDS:
                patterned = command.name == "calibrate-shipped" and any(c in value for c in "*?")
                for preset in expand_static([value]) if patterned else _preset_names(value):
                    presets[preset]
            elif name == "--set" and command.name == "reproduce":
                parse_override(value)
            elif name == "--set":
                apply_overrides(CalibrationConfig(), (value,))
            elif isinstance(options[name].type, click.Choice) and value not in options[name].type.choices:
                found.append(f"{line}: {name} {value} is not one of {options[name].type.choices}")
        except (KeyError, ValueError) as err:
            found.append(f"{line}: {err}")
    return found


def test_the_readme_shows_commands() -> None:
    """The parser finds what the README shows (so the checks below are not vacuous)."""
    lines = readme_commands(README, "modiff")
    assert "modiff presets" in lines and "modiff train ldm --out data/train/fmnist-ldm" in lines
    assert any(line.startswith("modiff calibrate --data data/calib/fmnist --preset qdiff-w4a4 --modiff") for line in lines)
    assert "make install" in readme_commands(README, "make")


@pytest.mark.parametrize("line", sorted(set(readme_commands(DOCUMENTS, "modiff")) | set(help_examples())))
def test_command_exists_as_written(line: str) -> None:
    assert problems(line) == []


def test_a_wrong_command_is_caught() -> None:
    assert problems("modiff sample --data-dir X --out Y") == ["modiff sample --data-dir X --out Y: no option --data-dir"]
    assert problems("modiff fid RUN --data-dir D")[0].endswith("no option --data-dir")
    assert "w4a5" in problems("modiff sample --preset w4a5 --out Y")[0]
    assert "expected key=value" in problems("modiff reproduce --set samples=3")[0]
    assert "--sampler euler is not one of" in problems("modiff evaluate --sampler euler --out Y")[0]
    assert problems("modiff nope") == ["modiff nope: no subcommand ['nope']"]


def test_make_targets_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for line in readme_commands(DOCUMENTS, "make"):
        assert shlex.split(line)[1] in targets, line
