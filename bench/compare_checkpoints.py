"""Compare two checkpoint folders tensor by tensor: the same names, and for each tensor whether
it is bit-identical, else how far apart (max |a - b|) and how many zero positions differ.

    python bench/compare_checkpoints.py OUT_A OUT_B [--activation]

Exit code 0 when every tensor is bit-identical, 1 otherwise (the list of differences is printed).
Used to check that the streamed path writes what the in-memory path wrote (and resumed runs what
uninterrupted ones write).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open


def tensors(folder: Path, activation: bool = False) -> dict[str, tuple[Path, str]]:
    files = [folder / "activation_sparsity.safetensors"] if activation else sorted(
        p for p in folder.glob("*.safetensors") if p.name != "activation_sparsity.safetensors")
    out = {}
    for path in files:
        if path.exists():
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = (path, key)
    return out


def read(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), framework="pt") as f:
        return f.get_tensor(where[1])


def compare(a: Path, b: Path, activation: bool = False) -> list[str]:
    ta, tb = tensors(a, activation), tensors(b, activation)
    problems = []
    for name in sorted(set(ta) ^ set(tb)):
        problems.append(f"{name}: only in {'A' if name in ta else 'B'}")
    for name in sorted(set(ta) & set(tb)):
        x, y = read(ta[name]), read(tb[name])
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}")
        elif not torch.equal(x.view(torch.uint8) if x.dtype == torch.bfloat16 else x, y.view(torch.uint8) if y.dtype == torch.bfloat16 else y):
            diff = float((x.double() - y.double()).abs().max())
            zeros = int(((x == 0) != (y == 0)).sum())
            problems.append(f"{name}: max |diff| {diff:.3g}, {zeros} zero positions differ")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--activation", action="store_true", help="compare the activation-sparsity files instead")
    args = parser.parse_args()
    problems = compare(args.a, args.b, args.activation)
    ra, rb = (json.loads((p / "sparsity.json").read_text()) for p in (args.a, args.b))
    print(f"ppl A {ra['ppl']}  B {rb['ppl']}")
    print("\n".join(problems) if problems else f"all {len(tensors(args.a, args.activation))} tensors bit-identical")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
