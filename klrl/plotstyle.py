"""One plotting style for every klrl figure (`klrl table --plots`, `klrl audit --plot`).

A leaf module (matplotlib, numpy, pandas and scipy only; no klrl import), so that both the audit and the run tables use it.

The encoding, fixed and the same in every figure:

- colour = estimator (`PALETTE`; an estimator not listed gets a colour from `FALLBACK` chosen by a stable hash of
  its name, so the same new estimator has the same colour in every figure and every process);
- line style = placement (`LINESTYLES`: reward solid, loss dashed, both dotted, none dash-dot);
- marker = the placement's options (`MARKERS`: plain o, reward-to-go ^, sequence IS weight s, token IS weight D, and
  their combinations); configurations that share all three (several betas) get darker shades of their colour.

Placements are read in both spellings: `klrl table`'s labels (`reward[togo]`, `loss[is]`, `both[togo,reward-is]`)
and `klrl audit`'s configuration names (`k1-reward+togo`, `k3-loss+tokIS`).

Statistics drawn: an exponential moving average (`ema`, span stated in the figure) over a faint raw trace, and
mean +- the 95% Student-t confidence interval across seeds (`t_halfwidth`, scipy's t quantile).
"""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
import zlib
from pathlib import Path

import numpy as np

PALETTE = {  # Okabe-Ito (colour-blind safe); k1+/k3+ (straight-through) near k1/k3
    "none": "#4D4D4D", "k1": "#0072B2", "k2": "#009E73", "k3": "#D55E00", "abs": "#CC79A7",
    "k1+": "#56B4E9", "k3+": "#E69F00",
}
FALLBACK = ("#8C564B", "#9467BD", "#17BECF", "#BCBD22", "#332288", "#882255", "#44AA99", "#999933")
LINESTYLES = {"reward": "-", "loss": "--", "both": ":", "none": "-."}
FALLBACK_LINESTYLE = (0, (6, 2, 1, 2, 1, 2))  # dash-dot-dot: a placement this module does not know
VARIANTS = ("togo", "seqIS", "tokIS")  # canonical option names, audit spelling
MARKERS = {(): "o", ("togo",): "^", ("seqIS",): "s", ("tokIS",): "D", ("togo", "seqIS"): "v",
           ("togo", "tokIS"): "<", ("seqIS", "tokIS"): ">", ("togo", "seqIS", "tokIS"): "X"}
FALLBACK_MARKERS = ("P", "*", "h", "p", "8", "d")
VARIANT_NAMES = {"togo": "reward-to-go", "seqIS": "sequence IS weight", "tokIS": "token IS weight"}
ROUNDOFF = 1e-12  # |relative bias| below this is float64 round-off: the configuration is unbiased
FLOOR = 1e-16  # where exact zeros (and anything below) are drawn on a log axis
PNG_DPI = 110  # the PNGs are committed (docs/figures): modest; the PDF beside each is the print copy


def _stable_pick(name: str, options: tuple):
    return options[zlib.crc32(name.encode()) % len(options)]


def estimator_color(estimator: str) -> str:
    return PALETTE.get(estimator) or _stable_pick(estimator, FALLBACK)


def split_placement(placement: str) -> tuple[str, tuple[str, ...]]:
    """`reward[togo,is]` or `reward+togo+seqIS` -> ("reward", ("togo", "seqIS")), options in VARIANTS order."""
    text = str(placement)
    if "[" in text:
        base, tags = text.split("[", 1)
        tags = [t.strip() for t in tags.rstrip("]").split(",") if t.strip()]
    else:
        base, *tags = text.split("+")
    canon = {"is": "seqIS" if base == "reward" else "tokIS", "reward-is": "seqIS", "loss-is": "tokIS"}
    found = {canon.get(t, t) for t in tags}
    return base, tuple(sorted(found, key=lambda t: (VARIANTS.index(t) if t in VARIANTS else len(VARIANTS), t)))


def split_config(name: str) -> tuple[str, str]:
    """An audit configuration name `k3-loss+tokIS` -> ("k3", "loss+tokIS")."""
    est, _, placement = str(name).partition("-")
    return est, placement or "none"


def placement_linestyle(placement: str):
    return LINESTYLES.get(split_placement(placement)[0], FALLBACK_LINESTYLE)


def marker_of(variants: tuple[str, ...]) -> str:
    return MARKERS.get(tuple(variants)) or _stable_pick(",".join(variants), FALLBACK_MARKERS)


def variant_marker(placement: str) -> str:
    return marker_of(split_placement(placement)[1])


def style(estimator: str, placement: str) -> dict:
    """Matplotlib keyword arguments (color, linestyle, marker) of a configuration: the same in every figure."""
    return {"color": estimator_color(estimator), "linestyle": placement_linestyle(placement),
            "marker": variant_marker(placement)}


def shade(color: str, i: int, n: int) -> tuple:
    """The i-th of n shades of color: i = 0 the colour itself, later ones darker, down to 45% of its lightness
    (darker, because the lighter neighbours of k1 and k3 are k1+ and k3+); a grey (none's, already dark) gets
    lighter ones instead, up to a light grey."""
    import colorsys

    from matplotlib.colors import to_rgb

    if n <= 1 or i == 0:
        return to_rgb(color)
    h, lightness, sat = colorsys.rgb_to_hls(*to_rgb(color))
    f = i / (n - 1)
    lightness = lightness + (0.75 - lightness) * f if sat < 0.2 else lightness * (1 - 0.55 * f)
    return colorsys.hls_to_rgb(h, lightness, sat)


# --- statistics ---------------------------------------------------------------------------------------------------


def t_halfwidth(sd, n, level: float = 0.95):
    """Half-width of the Student-t confidence interval of a mean: t_{(1+level)/2, n-1} sd / sqrt(n); NaN for n < 2."""
    from scipy.stats import t

    sd, n = np.asarray(sd, dtype=float), np.asarray(n, dtype=float)
    ok = n >= 2
    q = t.ppf((1 + level) / 2, np.where(ok, n - 1, 1))
    return np.where(ok, q * sd / np.sqrt(np.maximum(n, 1)), np.nan)


def ema(values, span: int) -> np.ndarray:
    """Exponential moving average with span `span` (alpha = 2 / (span + 1)): pandas' `ewm(span, adjust=True,
    ignore_na=True)`, bias-corrected at the start; NaNs are skipped (they neither count nor reset it)."""
    import pandas as pd

    x = np.asarray(values, dtype=float)
    if span <= 1:
        return x.copy()
    return pd.Series(x).ewm(span=span, adjust=True, ignore_na=True).mean().to_numpy()


def auto_span(n_steps: int) -> int:
    """The default EMA span: about 1/10 of the run, between 1 (no smoothing) and 50 steps."""
    return int(max(1, min(50, round(n_steps / 10))))


# --- drawing ------------------------------------------------------------------------------------------------------


def _tidy(ax) -> None:
    ax.grid(alpha=0.3, lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)


def new_figure(nrows: int, ncols: int, size: tuple[float, float], **kw):
    """A pyplot-free Figure (no global state, no display) with constrained layout, and its axes array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.ravel():
        _tidy(ax)
    return fig, axes


def new_mosaic(layout, size: tuple[float, float], **kw):
    """The same, laid out by Figure.subplot_mosaic: (figure, {name: axes})."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplot_mosaic(layout, **kw)
    for ax in axes.values():
        _tidy(ax)
    return fig, axes


def band_alpha(n_curves: int) -> float:
    """The opacity of a CI band among n_curves overlapping ones: their overlap stays light enough to read the lines
    (bands sit below every line whatever the drawing order: collections have the lower zorder)."""
    return min(0.15, 0.4 / max(n_curves, 1))


def draw_curve(ax, x, line, style_kw: dict, raw=None, lo=None, hi=None, markers: int = 8, label=None,
               alpha: float = 0.12) -> None:
    """A smoothed line (with `markers` markers spread along it) over a faint raw trace, with a band lo..hi of
    opacity `alpha`."""
    x = np.asarray(x, dtype=float)
    color, ls, marker = style_kw["color"], style_kw["linestyle"], style_kw.get("marker")
    if raw is not None:
        ax.plot(x, raw, color=color, lw=0.5, alpha=0.2, ls="-")
    if lo is not None and np.isfinite(np.asarray(lo, dtype=float)).any():
        ax.fill_between(x, lo, hi, color=color, alpha=alpha, lw=0)
    every = max(1, len(x) // markers) if markers else None
    ax.plot(x, line, color=color, ls=ls, lw=1.6, marker=marker if markers else None, markevery=every, ms=4,
            label=label)


def plain_log_ticks(ax) -> None:
    """A log y-axis labelled with plain numbers (4, 20, 1000) instead of 4x10^0: for quantities read as numbers,
    such as a gradient norm. Minor ticks are labelled only where the axis spans less than about a decade."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter())


def spans_decades(values, decades: float = 2.0) -> bool:
    """True when the finite values are all positive and span more than `decades` orders of magnitude: a quantity
    for a log axis."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(len(v) and v.min() > 0 and np.log10(v.max() / v.min()) > decades)


def fit_ylim(ax, lines, bands=(), log: bool = False, share: float = 0.5, margin: float = 0.05) -> None:
    """y-limits that show the lines and their bands, except that a band may not squeeze the lines into less than
    `share` of the axis (a 95% t-interval over two seeds, t = 12.7, easily would): such a band runs off the axes."""
    def finite(x):
        x = np.asarray(x, dtype=float).ravel()
        x = x[np.isfinite(x) & (x > 0)] if log else x[np.isfinite(x)]
        return np.log10(x) if log else x

    ln, bd = finite(lines), finite(bands)
    if not len(ln):
        return
    lo, hi = ln.min(), ln.max()
    span = hi - lo
    if len(bd):
        room = (1 / share - 1) * span / 2 if span > 1e-12 * max(1.0, abs(hi)) else np.inf
        lo, hi = max(min(lo, bd.min()), lo - room), min(max(hi, bd.max()), hi + room)
    pad = margin * (hi - lo) or (0.1 * abs(hi) if hi else 0.05)  # a flat line: +-10%, or +-0.05 around 0
    lo, hi = lo - pad, hi + pad
    ax.set_ylim(*((10**lo, 10**hi) if log else (lo, hi)))


def roundoff_split(top, bottom, values, note: str | None = None) -> None:
    """A log y-axis broken in two: `top` spans the values above ROUNDOFF (and their error bars: `values`), `bottom`
    is a grey strip from FLOOR / 10 to ROUNDOFF where round-off values sit, labelled `note`. Draw every line on both;
    each axis shows its own range."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v >= ROUNDOFF)]
    lo, hi = (v.min() / 2, v.max() * 2) if len(v) else (1e-3, 10.0)
    for ax in (top, bottom):
        ax.set_yscale("log")
    top.set_ylim(lo, hi)
    bottom.set_ylim(FLOOR / 10, ROUNDOFF)
    bottom.set_facecolor("0.92")
    bottom.axhline(FLOOR, color="0.5", lw=0.6, ls=(0, (1, 2)), zorder=0)
    bottom.set_yticks([FLOOR, 1e-14, ROUNDOFF])
    top.spines["bottom"].set_visible(False)
    bottom.spines["top"].set_visible(False)
    top.tick_params(axis="x", bottom=False, labelbottom=False)
    cut = {"marker": [(-1, -0.5), (1, 0.5)], "ms": 10, "ls": "none", "color": "0.2", "mew": 1, "clip_on": False}
    top.plot([0], [0], transform=top.transAxes, **cut)
    bottom.plot([0], [1], transform=bottom.transAxes, **cut)
    if note:
        bottom.text(0.99, 0.93, note, transform=bottom.transAxes, ha="right", va="top", fontsize="x-small",
                    color="0.25")


def _header(text: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="none"), text


def key_entries(estimators, placements, extra=()) -> list[tuple[str, list]]:
    """Legend sections explaining the encoding: [(title, [(handle, label), ...]), ...]; `extra` adds sections."""
    from matplotlib.lines import Line2D

    est = [(Line2D([], [], color=estimator_color(e), lw=3), e) for e in dict.fromkeys(estimators)]
    bases = dict.fromkeys(split_placement(p)[0] for p in placements)
    ls = [(Line2D([], [], color="0.2", ls=placement_linestyle(b), lw=1.6), b) for b in bases]
    sections = [("colour = estimator", est), ("line style = placement", ls)]
    variants = dict.fromkeys(split_placement(p)[1] for p in placements)
    if set(variants) - {()}:
        mk = [(Line2D([], [], color="0.2", ls="none", marker=marker_of(v)),
               " + ".join(VARIANT_NAMES.get(t, t) for t in v) or "plain") for v in variants]
        sections.append(("marker = options", mk))
    return sections + list(extra)


def sectioned_legend(fig, sections, max_rows: int = 9, wrap: int = 40, **kw):
    """One figure legend below the axes, one column per section (long sections wrap), a bold title atop each;
    labels longer than `wrap` characters are broken at spaces."""
    def per_column(items) -> int:  # balanced columns of at most max_rows - 1 entries
        return math.ceil(len(items) / math.ceil(len(items) / (max_rows - 1))) if items else 0

    rows = max(per_column(items) for _, items in sections) + 1
    handles, labels, titles = [], [], set()
    for title, items in sections:
        per = per_column(items) or 1
        chunks = [items[i:i + per] for i in range(0, len(items), per)] or [[]]
        for j, chunk in enumerate(chunks):
            col = [_header(title if j == 0 else "")] + list(chunk)
            col += [_header("")] * (rows - len(col))
            handles += [h for h, _ in col]
            labels += [lab for _, lab in col]
        titles.add(title)
    labels = [textwrap.fill(lab, wrap, break_long_words=False) for lab in labels]  # long run labels: two lines
    leg = fig.legend(handles, labels, loc="outside lower center", ncols=len(handles) // rows, fontsize="small",
                     frameon=False, columnspacing=1.5, handlelength=2.8, **kw)
    for text in leg.get_texts():
        if text.get_text() in titles:
            text.set_fontweight("bold")
    return leg


def save(fig, path: str | Path) -> list[Path]:
    """`path` in its own format and, beside it, the vector (PDF) copy of a PNG or the PNG of a PDF/SVG; each file
    written atomically (a temporary name, then a rename). Returns the paths written, `path` first."""
    path = Path(path)
    raster = path.suffix.lower() in ("", ".png")
    path = path.with_suffix(".png") if not path.suffix else path
    paths = [path, path.with_suffix(".pdf" if raster else ".png")]
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for p in paths:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                _write(fig, f, p.suffix[1:].lower())
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the figure from everyone else
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return paths


def _write(fig, f, fmt: str) -> None:
    """fig in format fmt to the open file f; a PNG at PNG_DPI with its colours reduced to a 256-colour palette
    (Pillow's median cut, no dithering: the same look at under half the size of the committed files)."""
    if fmt != "png":
        fig.savefig(f, format=fmt, metadata=_metadata("." + fmt))
        return
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    image = Image.open(buf).convert("RGB")
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(f, format="png", optimize=True)


def _metadata(suffix: str) -> dict | None:
    # No creation date in vector files: the same figure gives the same bytes (diffable, cacheable).
    return {"CreationDate": None} if suffix.lower() == ".pdf" else {"Date": None} if suffix.lower() == ".svg" else None
