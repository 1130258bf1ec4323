"""Every command of the README runs as written.

The fenced ``bash`` blocks of ``README.md`` are split into commands (a ``\\`` continues a line,
a here-document runs to its delimiter) and run in order, each in ``bash -euo pipefail``, in an
empty temporary directory with this virtual environment's ``tensafe`` first on ``PATH`` and
none of TenSafe's settings in the environment (a new user's shell). Only the set-up steps
that install TenSafe (the leading ``&&`` steps of the first command) and the test suite are
skipped, each with its reason; a command that
is neither run nor listed there fails the fast test below, so a new README command cannot go
untested. The quick tour and ``tensafe demo`` train the bundled SmolLM2-135M (slow, still run
in CI).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensafe.cli.main import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"

#: Whole commands not run here, each with the reason.
SKIPPED: dict[str, str] = {
    r"^bash scripts/test\.sh$": "runs the static checks and this test suite, this file included",
}
#: Leading ``&&`` steps of a command that are not run here (the rest of the command is).
SKIPPED_STEPS: dict[str, str] = {
    r"^python3 -m venv \.venv$": "creates a new virtual environment (this test runs in one installed alike)",
    r"^\. \.venv/bin/activate$": "activates that environment",
    r"^pip install ": (
        "installs TenSafe and the bundled model; this environment was installed with the same "
        "constraints (.ci/run and scripts/test.sh)"
    ),
}

_HEREDOC = re.compile(r"<<-?\s*'?\"?(\w+)'?\"?")
_SETTINGS = ("TS_", "DATABASE_URL", "TENSAFE_BASE_URL", "TENSAFE_API_KEY", "TENSAFE_CA_BUNDLE")


@dataclass(frozen=True)
class Command:
    block: int
    text: str

    @property
    def skip_reason(self) -> str | None:
        for pattern, reason in SKIPPED.items():
            if re.search(pattern, self.text):
                return reason
        return None

    @property
    def skipped_steps(self) -> list[str]:
        """The leading ``&&`` steps that install TenSafe (not run here)."""
        steps = self.text.split(" && ")
        out = []
        for step in steps:
            if not any(re.search(pattern, step) for pattern in SKIPPED_STEPS):
                break
            out.append(step)
        return out

    @property
    def to_run(self) -> str | None:
        """What this test runs of the command: all of it but its installing steps (None: nothing)."""
        if self.skip_reason is not None:
            return None
        rest = self.text.split(" && ")[len(self.skipped_steps) :]
        return " && ".join(rest) or None


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced ``bash`` blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def split_commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, here-documents kept whole."""
    lines = block.splitlines()
    commands: list[str] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip() or lines[i].lstrip().startswith("#"):
            i += 1
            continue
        command = lines[i]
        while command.rstrip().endswith("\\"):
            i += 1
            command += "\n" + lines[i]
        heredoc = _HEREDOC.search(command)
        if heredoc is not None:
            while True:
                i += 1
                if i >= len(lines):
                    raise AssertionError(f"unterminated here-document in README: {command[:80]}")
                command += "\n" + lines[i]
                if lines[i] == heredoc.group(1):
                    break
        commands.append(command)
        i += 1
    return commands


def readme_commands() -> list[Command]:
    return [
        Command(block, text)
        for block, body in enumerate(shell_blocks(README.read_text(encoding="utf-8")))
        for text in split_commands(body)
    ]


def _user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTINGS)}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["HOME"] = os.environ.get("HOME", str(tmp_path))  # the converted-model cache lives there
    # A new user's TSSP rollback memory (tssp unpack refuses a different package under a version it
    # has accepted before, e.g. from an earlier run of this test on the same machine).
    env["XDG_STATE_HOME"] = str(tmp_path / ".state")
    return env


def _run_in_order(commands: list[Command], cwd: Path) -> list[str]:
    env = _user_env(cwd)
    outputs = []
    for command in commands:
        assert command.to_run is not None, command.text
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command.to_run],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert done.returncode == 0, (
            f"README command failed (exit {done.returncode}):\n{command.text}\n--- stdout\n"
            f"{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
        outputs.append(done.stdout)
    return outputs


# -- fast: the inventory ----------------------------------------------------------------------


def test_the_parser_keeps_continuations_and_here_documents_whole() -> None:
    block = "a --x \\\n    --y\ncat > f <<'EOF'\nk: v\n# c\nEOF\n\n# comment\nb   # trailing\n"
    assert split_commands(block) == ["a --x \\\n    --y", "cat > f <<'EOF'\nk: v\n# c\nEOF", "b   # trailing"]


def test_every_readme_command_is_run_or_skipped_for_a_reason() -> None:
    commands = readme_commands()
    # Exactly the two set-up commands: install then run the demo, and the test suite.
    setup = [c for c in commands if c.block == 0]
    assert len(setup) == 2
    assert [s.split()[0] for s in setup[0].skipped_steps] == ["python3", ".", "pip", "pip"]
    assert setup[0].to_run == "tensafe demo"
    assert setup[1].skip_reason is not None and setup[1].to_run is None
    for command in commands:
        if command.to_run is not None:
            program = command.to_run.split()[0]
            assert program in ("tensafe", "cat"), f"README command not covered: {command.text[:80]}"
    tour = [c.text for c in commands if c.block == 1]
    assert any(t.startswith("tensafe train config.yaml") for t in tour)
    assert any(t.startswith("cat > config.yaml") for t in tour)


def test_every_tensafe_command_of_the_readme_exists() -> None:
    """Each ``tensafe GROUP [SUBCOMMAND]`` of the README parses (``--help`` exits 0)."""
    parser = build_parser()
    for command in readme_commands():
        if command.to_run is None or not command.to_run.startswith("tensafe "):
            continue
        words = [w for w in command.to_run.split() if not w.startswith("-")][1:3]  # GROUP [SUB|ARG]
        with pytest.raises(SystemExit) as exited:
            parser.parse_args([*words, "--help"])
        assert exited.value.code == 0, command.text


# -- slow: run them ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.realmodel
def test_the_readme_quick_tour_runs_as_written(tmp_path: Path) -> None:
    tour = [c for c in readme_commands() if c.block == 1]
    assert all(c.to_run == c.text for c in tour)
    outputs = _run_in_order(tour, tmp_path)
    assert "ε = 2.1014 at δ = 1e-05 after 1000 steps" in outputs[0]
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "canaries.json").is_file()
    assert "signed by" in outputs[6] and ": valid" in outputs[6]
    assert "dataset commitment matches" in outputs[7]
    assert (tmp_path / "dist" / "clinical.tssp").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert outputs[-1].startswith("ok: tenant 'tensafe.deployment'")


@pytest.mark.slow
@pytest.mark.realmodel
def test_the_readme_first_block_runs_as_written(tmp_path: Path) -> None:
    setup = [c for c in readme_commands() if c.block == 0]
    to_run = [c for c in setup if c.to_run is not None]
    assert [c.to_run for c in to_run] == ["tensafe demo"]
    (output,) = _run_in_order(to_run, tmp_path)
    assert "Held-out loss: before" in output and "Verify: tensafe privacy certificate" in output
    assert (tmp_path / "runs" / "demo" / "run" / "dp_certificate.json").is_file()
