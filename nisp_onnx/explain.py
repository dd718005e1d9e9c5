"""`--dry-run`: what pruning would do to a model, without calibration data or writing anything."""

from __future__ import annotations

import numpy as np

from .analyze import analyze
from .budget import MacModel, layer_ratios
from .model_io import LoadedModel
from .select import select
from .verify import node_macs


def explain(
    loaded: LoadedModel,
    input_shapes: dict[str, tuple],
    ratio: float,
    exclude: tuple[str, ...] = (),
    layer_ratio: dict[str, float] | None = None,
    round_to: int = 1,
) -> str:
    """The channel groups of a model: size, nodes, frozen channels and why, and the MACs each
    group saves alone at its ratio (the uniform or `layer_ratio` plan)."""
    opset = next((o.version for o in loaded.proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    cg = analyze(loaded.graph(), opset, exclude)
    cls = cg.classes()
    groups = cg.groups(cls)
    macs = MacModel(cg, node_macs(loaded.proto, input_shapes))
    ratios = layer_ratios(groups, ratio, layer_ratio or {})
    order = np.zeros(int(cls.max()) + 1 if len(cls) else 0)
    all_removed = select(groups, cls, order, ratios, round_to)
    after = macs.macs(~all_removed[cls])
    frozen = [g for g in groups if g.frozen.any()]
    lines = [
        f"{loaded.path or 'model'}: {len(groups)} channel groups, "
        f"{sum(g.prunable > 0 for g in groups)} prunable, {len(frozen)} with frozen channels; "
        f"{macs.total:,} MACs per sample at input {_shapes(input_shapes)}",
    ]
    for g, r in zip(groups, ratios):
        alone = [0.0] * len(groups)
        alone[g.id] = r
        removed = select(groups, cls, order, alone, round_to)
        saved = macs.total - macs.macs(~removed[cls])
        kept = g.size - int(removed[g.classes].sum())
        head = f"group {g.id}: {g.size} channels in {len(g.spaces)} tensors"
        if g.prunable:
            head += f", ratio {r:g}: keep {kept}, saves {saved:,.0f} MACs"
            head += f" ({100 * saved / max(macs.total, 1):.1f}%)"
        lines.append(head)
        more = f", ... ({len(g.nodes)} nodes)" if len(g.nodes) > 6 else ""
        lines.append(f"  nodes: {', '.join(g.nodes[:6])}{more}")
        if g.frozen.any():
            lines.append(f"  frozen {int(g.frozen.sum())}: " + "; ".join(g.reasons))
    cut = 1 - after / max(macs.total, 1)
    lines.append(f"all groups together: {after:,.0f} MACs per sample (-{100 * cut:.1f}%)")
    return "\n".join(lines)


def _shapes(shapes: dict[str, tuple]) -> str:
    return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
