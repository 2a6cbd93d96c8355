"""PNG figures (matplotlib, imported only when a --png is asked for)."""

from __future__ import annotations

from pathlib import Path

from maskstore.errors import MaskstoreError

from ._common import check_output, write_output


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MaskstoreError("--png needs matplotlib: pip install 'maskstore[plot]'") from None
    return plt


def check_png(path: Path | None) -> None:
    """Fail before any compute when the figure cannot be written where asked."""
    check_output(path, "--png")


def _save(fig, path: Path, dpi: int) -> None:
    """The figure as PNG at exactly ``path`` (matplotlib would add ``.png`` to a path without
    it, and write through a link or into a FIFO)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _plt().close(fig)
    write_output(path, buf.getvalue(), "--png")


def overlap_heatmap(rows: list[str], layers: list[str], values, metric: str, path: Path) -> None:
    """A pair x layer heatmap, its colour scale fitted to the data, with a colour bar.

    Args:
        values: ``(len(rows), len(layers))`` numbers.
    """
    import numpy as np

    plt = _plt()
    v = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(layers) + 2.5), 1.2 + 0.45 * len(rows)))
    im = ax.imshow(v, aspect="auto", cmap="viridis", vmin=np.nanmin(v), vmax=np.nanmax(v))
    ax.set_xticks(range(len(layers)), layers, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(f"{metric} by layer (colour scale: {np.nanmin(v):.4f} to {np.nanmax(v):.4f})")
    fig.colorbar(im, ax=ax, label=metric, fraction=0.04, pad=0.02)
    fig.tight_layout()
    _save(fig, path, 130)


def diff_by_layer(series: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Per-layer differential ratio, one line per module kind (attention, MLP): the paper's
    Table 2 as a figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for kind, by_layer in series.items():
        layers = sorted(by_layer, key=lambda k: int(k) if k.isdigit() else -1)
        ax.plot(
            [int(k) for k in layers if k.isdigit()],
            [by_layer[k] for k in layers if k.isdigit()],
            marker="o",
            label={"attn": "attention", "mlp": "MLP"}.get(kind, kind),
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("differential ratio")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path, 130)


def cosine_by_layer(cos: list[float], a: str, b: str, path: Path) -> None:
    """Mean cosine similarity of hidden states under personas ``a`` and ``b``, layer by layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(cos)), cos, marker="o")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title(f"hidden states: {a} vs {b}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, 120)
