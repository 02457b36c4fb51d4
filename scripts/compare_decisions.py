"""Compare two `decision_snapshot.py` outputs: per method, the layers whose kept heads or channels differ."""

import json
import sys


def main(a: str, b: str) -> None:
    left, right = json.load(open(a)), json.load(open(b))
    for method in sorted(set(left) & set(right)):
        la, lb = left[method]["layers"], right[method]["layers"]
        heads = [i for i, (x, y) in enumerate(zip(la, lb)) if x[0] != y[0]]
        chans = [i for i, (x, y) in enumerate(zip(la, lb)) if x[1] != y[1]]
        moved = sum(len(set(x[1]) ^ set(y[1])) // 2 for x, y in zip(la, lb))
        status = "identical" if not heads and not chans else f"heads differ in layers {heads}, channels in {chans} ({moved} channels swapped)"
        print(f"{method}: {status}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
