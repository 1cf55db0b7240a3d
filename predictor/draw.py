"""Draw a learned workflow automaton (from `Predictor.model_json`) as a PNG with matplotlib."""

from __future__ import annotations

from collections import deque
from typing import Any

START, END_NODE = "START", "END"


def _layout(model: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Columns by shortest distance from START (BFS over the unpruned transitions), rows within a column."""
    roles: dict[str, Any] = model.get("roles", {})
    depth: dict[str, int] = {START: 0}
    queue: deque[str] = deque()
    for r in model.get("start", {}):
        depth[r] = 1
        queue.append(r)
    while queue:
        r = queue.popleft()
        for nxt, t in roles.get(r, {}).get("transitions", {}).items():
            if nxt in roles and nxt not in depth and not t.get("pruned"):
                depth[nxt] = depth[r] + 1
                queue.append(nxt)
    for r in roles:  # reachable only through pruned edges (or never started): put them after the rest
        depth.setdefault(r, max(depth.values()) + 1)
    depth[END_NODE] = max(depth.values()) + 1
    columns: dict[int, list[str]] = {}
    for node, d in sorted(depth.items(), key=lambda kv: (kv[1], kv[0])):
        columns.setdefault(d, []).append(node)
    pos: dict[str, tuple[float, float]] = {}
    for d, nodes in columns.items():
        for i, node in enumerate(nodes):
            pos[node] = (d * 3.0, (len(nodes) - 1) / 2.0 * 2.0 - i * 2.0)
    return pos


def _half_size(node: str) -> tuple[float, float]:
    return (0.6, 0.4) if node in (START, END_NODE) else (1.2, 0.55)


def _border(pos: dict[str, tuple[float, float]], a: str, b: str) -> tuple[float, float]:
    """Where the line from node a's centre towards node b's leaves a's box."""
    (x1, y1), (x2, y2) = pos[a], pos[b]
    dx, dy = x2 - x1, y2 - y1
    w, h = _half_size(a)
    t = min(w / abs(dx) if dx else float("inf"), h / abs(dy) if dy else float("inf"), 1.0)
    return x1 + dx * t, y1 + dy * t


def draw_automaton(model: dict[str, Any], path: str) -> None:
    """Write the automaton of `model` to `path` (PNG): roles, start/end, transition shares, fan-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    pos = _layout(model)
    roles: dict[str, Any] = model.get("roles", {})
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    ncols = round((max(xs) - min(xs)) / 3.0) + 1
    nrows = round((max(ys) - min(ys)) / 2.0) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 2.3 * ncols + 1), max(3.5, 1.5 * nrows + 2.5)))
    ax.set_xlim(min(xs) - 1.5, max(xs) + 1.5)
    ax.set_ylim(min(ys) - 2.2, max(ys) + 2.2)
    ax.axis("off")

    def edge(a: str, b: str, share: float, pruned: bool, label: str) -> None:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        color = "0.6" if pruned else "tab:blue"
        style = "dashed" if pruned else "solid"
        if a == b:  # a loop: an arc above the node
            arrow = FancyArrowPatch((x1 - 0.4, y1 + 0.45), (x1 + 0.4, y1 + 0.45), connectionstyle="arc3,rad=-1.6",
                                    arrowstyle="-|>", mutation_scale=14, color=color, linestyle=style,
                                    linewidth=0.8 + 2.5 * share)
            ax.add_patch(arrow)
            ax.text(x1, y1 + 1.25, label, ha="center", fontsize=8, color=color)
            return
        back = x2 <= x1
        rad = 0.6 if back else 0.08  # back edges (retries) arc over the forward ones
        if back:  # leave from the top of the boxes, so the arc clears the forward edges
            start, end = (x1, y1 + 0.55), (x2, y2 + 0.55)
        else:
            start, end = _border(pos, a, b), _border(pos, b, a)
        arrow = FancyArrowPatch(start, end, connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>",
                                mutation_scale=14, shrinkA=2, shrinkB=2, color=color, linestyle=style,
                                linewidth=0.8 + 2.5 * share, zorder=3)
        ax.add_patch(arrow)
        mx, my = (x1 + x2) / 2, (y1 + y2) / 2 + (0.3 * abs(x2 - x1) + 0.75 if back else 0.15)
        ax.text(mx, my, label, ha="center", fontsize=8, color=color)

    for r, share in model.get("start", {}).items():
        if r in pos:
            edge(START, r, share, False, f"{share:.0%}")
    for r, info in roles.items():
        for nxt, t in info.get("transitions", {}).items():
            target = END_NODE if nxt == "$end" else nxt
            if target in pos:
                edge(r, target, t["share"], bool(t.get("pruned")), f"{t['share']:.0%} ({int(t['count'])})")
    for node, (x, y) in pos.items():
        if node in (START, END_NODE):
            ax.add_patch(FancyBboxPatch((x - 0.5, y - 0.3), 1.0, 0.6, boxstyle="round,pad=0.1", fc="0.9", ec="0.3"))
            ax.text(x, y, node, ha="center", va="center", fontsize=9, weight="bold")
            continue
        info = roles.get(node, {})
        out = info.get("output_tokens", {})
        lines = [node, f"out p50 {out.get('p50', 0)} / bound {out.get('bound', 0)}"]
        if info.get("fanout_mean", 1.0) > 1.01:
            lines.append(f"fan-out x{info['fanout_mean']:.1f}")
        ax.add_patch(FancyBboxPatch((x - 1.1, y - 0.45), 2.2, 0.9, boxstyle="round,pad=0.1", fc="#e8f0fe",
                                    ec="tab:blue"))
        ax.text(x, y, "\n".join(lines), ha="center", va="center", fontsize=8)
    title = (f"{model.get('app', '')}: {int(model.get('workflows_finished', 0))} workflows, "
             f"{model.get('workflow_calls', {}).get('mean', 0)} calls each on average"
             f"{' (cold)' if model.get('cold') else ''}")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
