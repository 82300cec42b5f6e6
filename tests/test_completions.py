import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_completions import SHELLS, completion_script  # noqa: E402


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completion_scripts_have_not_drifted(shell):
    committed = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert committed == completion_script(shell), "run 'make completions' and commit the result"


def complete(words: str, cword: int) -> list[str]:
    env = {**os.environ, "_E4T_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
    return subprocess.run([sys.executable, "-m", "e4tcli"], env=env, capture_output=True, text=True).stdout.split()


def test_domain_names_complete_from_the_registry():
    assert complete("e4t domains show ", 3) == ["art", "cats", "faces", "minifaces"]
    assert complete("e4t domains pull m", 3) == ["minifaces"]
    assert complete("e4t domains show f", 3) == ["faces"]


def test_commands_complete():
    assert "domains" in complete("e4t d", 1)


def test_domain_option_completes_for_tune_and_pretrain():
    assert complete("e4t tune cat.jpg --domain c", 4) == ["cats"]
    assert complete("e4t pretrain --domain ", 3) == ["art", "cats", "faces", "minifaces"]
