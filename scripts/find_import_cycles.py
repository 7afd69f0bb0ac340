"""Print every import cycle between prune-cli's modules (exit 1 if there is one).

Run on the installed layout (scripts/check_layers.sh builds it): every import counts, those at a
module's top and those inside functions. A cycle is a strongly connected component of the graph
of module imports with more than one module (Tarjan's algorithm).
"""

from __future__ import annotations

import sys

import grimp


def cycles(graph) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # recursion depth is bounded by the module count (~100)
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.find_modules_directly_imported_by(node)):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def main() -> int:
    graph = grimp.build_graph("prune_cli", include_external_packages=False)
    found = cycles(graph)
    for component in found:
        print("import cycle:", " <-> ".join(component))
    print(f"{len(graph.modules)} modules, {len(found)} import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
