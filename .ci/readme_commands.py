"""Print README.md's two fresh-machine commands, as CI runs them: line 1 the install (command 1 up to its
training run), line 2 the test command. Exits non-zero, naming what is missing, when the README lost them."""
import sys

TRAINING_RUN = " && .venv/bin/python -m fgpair_jax.main"


def main(path: str) -> None:
    text = open(path, encoding="utf-8").read()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(commands) != 2 or TRAINING_RUN not in commands[0] or " -m pytest " not in commands[1]:
        sys.exit(f"{path}: its first bash block must hold exactly two commands, install + '{TRAINING_RUN.strip()} ...' "
                 f"and the test command with '-m pytest'; found {commands}")
    print(commands[0].split(TRAINING_RUN, 1)[0])
    print(commands[1])


if __name__ == "__main__":
    main(sys.argv[1])
