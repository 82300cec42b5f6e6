"""Write the shell-completion scripts in completions/ from the e4t app.

The scripts are what ``e4t --show-completion SHELL`` prints; each calls back
into e4t on TAB, so command, option and domain names always match the
installed version. Shell auto-detection is switched off so that every shell's
script can be written from one shell.
"""

import os
import subprocess
import sys
from pathlib import Path

SHELLS = {"bash": "e4t.bash", "zsh": "_e4t", "fish": "e4t.fish"}
ROOT = Path(__file__).resolve().parent.parent


def completion_script(shell: str) -> str:
    env = {**os.environ, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    command = [sys.executable, "-m", "e4tcli", "--show-completion", shell]
    return subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    out = ROOT / "completions"
    out.mkdir(exist_ok=True)
    for shell, filename in SHELLS.items():
        (out / filename).write_text(completion_script(shell))
        print(f"wrote completions/{filename}")


if __name__ == "__main__":
    main()
