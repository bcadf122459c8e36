"""Notes to the user on stderr: what a command decided for them (an adapted default, a folder it read)."""
import sys


def notice(text: str) -> None:
    """One line, ``visionmamba: <text>``, on stderr (stdout stays the command's result)."""
    print(f"visionmamba: {text}", file=sys.stderr, flush=True)
