"""YAML read safely and within bounds: no Python objects (``SafeLoader``) and no alias bombs.

PyYAML shares an aliased node instead of copying it, so ``a: &a [x, x]`` / ``b: &b [*a, *a]``
... loads in microseconds and small memory, and then exhausts memory in whatever walks the
result (validation, ``json.dumps``, a deep copy). The composed document is measured as it
would be once every alias is expanded, and refused above a budget, before it is built.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_EXPANDED_NODES = 100_000  # a params.yaml has hundreds; a bomb has billions


class YamlBudgetError(ValueError):
    """A YAML document whose aliases expand beyond the budget (or refer to themselves)."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int], budget: int) -> int:
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YamlBudgetError("an alias refers to a node that contains it (a recursive structure)")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_, budget)
        if size > budget:
            raise YamlBudgetError(
                f"its aliases expand to more than {budget:,} nodes (an alias bomb?); "
                "write the values out instead of nesting anchors"
            )
    open_.discard(key)
    sizes[key] = size
    return size


def safe_load_bounded(text: str, budget: int = MAX_EXPANDED_NODES) -> Any:
    """``yaml.safe_load`` that first checks the document's expanded size (YamlBudgetError)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), budget)
        return loader.construct_document(node)
    finally:
        loader.dispose()
