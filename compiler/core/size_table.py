"""The Deep Compression size table (the paper's): per layer, and the total by stage.

    print(size_table(sparsity, shared, fp32_bytes))                        # after optimize
    print(size_table(sparsity, shared, fp32_bytes, coded, data_bytes))      # in a compressed file's report

sparsity: {layer: [kept, total]} (gm.meta["fxopt_sparsity"]); shared: {layer: {"bits", "kept",
"total", ...}} (gm.meta["fxopt_shared"]); coded: {layer: coded bytes of its weights}. The stages
count as the paper does: pruned = kept fp32 values + an 8-bit relative index each; shared =
`bits` per value + the index + a one-byte codebook entry per value; coded = the saved file's
data. Everything that is not a pruned/shared weight (biases...) counts fp32 in every stage
but the coded one.
"""
from __future__ import annotations

INDEX_BITS = 8


def size_table(sparsity: dict, shared: dict, fp32_bytes: int, coded: dict | None = None,
               data_bytes: int | None = None) -> str:
    layers = list(dict.fromkeys([*sparsity, *shared]))
    head = f"{'layer':<12} {'weights':>8} {'kept':>7} {'kept%':>6} {'bits':>4}"
    lines = [head + (f" {'coded B':>8} {'bits/w':>6}" if coded else "")]
    totals = {"pruned": 0.0, "shared": 0.0}
    weights = 0
    for layer in layers:
        kept, total = sparsity.get(layer) or [shared[layer]["kept"], shared[layer]["total"]]
        info = shared.get(layer)
        bits = info["bits"] if info else 8
        weights += total
        totals["pruned"] += kept * (32 + INDEX_BITS) / 8
        totals["shared"] += kept * (bits + INDEX_BITS) / 8 + (2 ** bits if info else 0)
        row = f"{layer:<12} {total:>8} {kept:>7} {100 * kept / max(total, 1):>5.1f}% {bits:>4}"
        if coded:
            got = coded.get(layer)
            row += f" {got:>8} {8 * got / max(kept, 1):>6.2f}" if got is not None else f" {'-':>8} {'-':>6}"
        lines.append(row)
    other = max(fp32_bytes - 4 * weights, 0)
    stages = {"dense fp32": fp32_bytes, "pruned": round(totals["pruned"]) + other}
    if shared:
        stages["shared"] = round(totals["shared"]) + other
    if data_bytes is not None:
        stages["coded (file data)"] = data_bytes
    lines += [f"{stage:<18} {b:>9,} B  {fp32_bytes / max(b, 1):6.1f}x smaller" for stage, b in stages.items()]
    return "\n".join(lines)
