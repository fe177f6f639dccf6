"""Draw the architecture diagrams of the captioning model ("Show, Attend and Tell").

Writes five PNG files next to this script:

    encoder.png      image -> ResNet-50 -> adaptive pooling -> 196 x 2048 annotation vectors
    decoder.png      unrolled LSTM decoder without attention
    decoder_att.png  unrolled LSTM decoder with soft attention and the beta gate
    att.png          the soft attention module, with tensor shapes
    overall.png      the whole pipeline, training and inference

Usage:  python assets/draw_figures.py      (works from any directory)

Only matplotlib and numpy are needed. Every figure is drawn in a coordinate
system measured in inches (one data unit = one inch), so sizes and gaps in the
code match what you see in the saved picture.
"""
import os

import matplotlib

matplotlib.use("Agg")  # no window, just files

import matplotlib.pyplot as plt  # noqa: E402  (must come after matplotlib.use)
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT_DIR = os.path.dirname(os.path.abspath(__file__))
DPI = 150

# One soft fill colour and one darker edge colour per module type.
COLORS = {
    "cnn": ("#d6e6f7", "#4a78a8"),      # convolutional network
    "lstm": ("#d8edd3", "#4f8a44"),     # recurrent cell
    "att": ("#fde3c8", "#c9782e"),      # attention
    "linear": ("#eadcf0", "#8a5ba0"),   # fully connected layers
    "embed": ("#fff3c4", "#b59a2a"),    # word embedding
    "op": ("#e4ecee", "#5f7f86"),       # parameter-free operation (pool, softmax, concat, ...)
    "data": ("#f4f4f4", "#7a7a7a"),     # tensors / data
    "dropped": ("#f1f1f1", "#b0b0b0"),  # removed part
    "infer": ("#fbdada", "#b04a4a"),    # inference-only machinery
}
LEGEND_NAMES = {
    "cnn": "CNN",
    "lstm": "LSTM",
    "att": "attention",
    "linear": "linear layer",
    "embed": "embedding",
    "op": "operation",
    "data": "tensor / data",
    "infer": "inference only",
}
TEXT = "#222222"
ARROW = "#444444"
SHAPE_FONT = {"family": "DejaVu Sans Mono", "size": 10, "color": "#333333"}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


class Box:
    """Where a drawn node sits: centre (x, y), width w, height h, in inches."""

    def __init__(self, x, y, w, h):
        self.x, self.y, self.w, self.h = x, y, w, h

    @property
    def left(self):
        return (self.x - self.w / 2, self.y)

    @property
    def right(self):
        return (self.x + self.w / 2, self.y)

    @property
    def top(self):
        return (self.x, self.y + self.h / 2)

    @property
    def bottom(self):
        return (self.x, self.y - self.h / 2)

    def at(self, fx, fy):
        """Point at fraction (fx, fy) of the box: (0, 0) bottom-left, (1, 1) top-right."""
        return (self.x - self.w / 2 + fx * self.w, self.y - self.h / 2 + fy * self.h)


def new_figure(width, height):
    """A white figure whose single axes covers it, with data units in inches."""
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="white")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def title(ax, text, subtitle=None):
    """Bold title in the top-left corner, with an optional grey subtitle under it."""
    _, top = ax.get_ylim()
    ax.text(0.3, top - 0.3, text, fontsize=15, fontweight="bold", color=TEXT, ha="left", va="top")
    if subtitle:
        ax.text(0.3, top - 0.68, subtitle, fontsize=11, color="#555555", ha="left", va="top")


def box(ax, x, y, w, h, text="", kind="data", fontsize=11, dashed=False, bold=False, **text_kw):
    """A rounded box centred at (x, y) with centred text; returns its Box."""
    face, edge = COLORS[kind]
    patch = FancyBboxPatch(
        (x - w / 2, y - h / 2), w, h,
        boxstyle="round,pad=0,rounding_size=0.08",
        facecolor=face, edgecolor=edge, linewidth=1.5,
        linestyle="--" if dashed else "-", zorder=2,
    )
    ax.add_patch(patch)
    if text:
        ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=TEXT,
                fontweight="bold" if bold else "normal", zorder=3, linespacing=1.35, **text_kw)
    return Box(x, y, w, h)


def circle(ax, x, y, r, text, kind="op", fontsize=14):
    """A small round node (add, multiply, concat) centred at (x, y); returns its Box."""
    face, edge = COLORS[kind]
    ax.add_patch(Circle((x, y), r, facecolor=face, edgecolor=edge, linewidth=1.5, zorder=2))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=TEXT, zorder=3)
    return Box(x, y, 2 * r, 2 * r)


def region(ax, x0, y0, x1, y1, label, color="#8899aa", label_side="top"):
    """A dashed frame grouping several boxes, with a label on its top or bottom edge."""
    ax.add_patch(FancyBboxPatch(
        (x0, y0), x1 - x0, y1 - y0, boxstyle="round,pad=0,rounding_size=0.15",
        facecolor="none", edgecolor=color, linewidth=1.3, linestyle=(0, (5, 3)), zorder=1,
    ))
    ly, va = (y1, "center") if label_side == "top" else (y0, "center")
    ax.text(x0 + 0.25, ly, label, fontsize=11, color=color, ha="left", va=va, style="italic",
            bbox=dict(facecolor="white", edgecolor="none", pad=2), zorder=1.5)


def arrow(ax, start, end, label=None, label_xy=None, offset=(0.0, 0.0), color=ARROW,
          dashed=False, rad=0.0, lw=1.5, shape=False, ha="center", va="center", fontsize=11):
    """An arrow from start to end; an optional label near its middle (or at label_xy).

    shape=True prints the label in the monospace "tensor shape" style.
    """
    ax.add_patch(FancyArrowPatch(
        start, end, arrowstyle="-|>", mutation_scale=15, color=color, linewidth=lw,
        linestyle=(0, (4, 3)) if dashed else "-", shrinkA=0, shrinkB=0,
        connectionstyle=f"arc3,rad={rad}", zorder=1.8,
    ))
    if label:
        if label_xy is None:
            label_xy = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
        style = dict(SHAPE_FONT) if shape else dict(fontsize=fontsize, color=TEXT)
        ax.text(*label_xy, label, ha=ha, va=va, zorder=4,
                bbox=dict(facecolor="white", edgecolor="none", pad=1.5, alpha=0.9), **style)


def path_arrow(ax, points, color=ARROW, dashed=False, lw=1.5):
    """An arrow along a polyline: straight segments, arrow head on the last one."""
    xs, ys = zip(*points[:-1])
    ax.plot(xs, ys, color=color, linewidth=lw, linestyle=(0, (4, 3)) if dashed else "-",
            solid_capstyle="butt", zorder=1.8)
    arrow(ax, points[-2], points[-1], color=color, dashed=dashed, lw=lw)


def shape_text(ax, x, y, text, ha="center", va="center", **kw):
    """A tensor shape written in the monospace style."""
    style = dict(SHAPE_FONT)
    style.update(kw)
    ax.text(x, y, text, ha=ha, va=va, zorder=4, **style)


def note(ax, x, y, text, fontsize=10.5, ha="left", va="top", color="#444444", **kw):
    ax.text(x, y, text, fontsize=fontsize, ha=ha, va=va, color=color, linespacing=1.45, zorder=4, **kw)


def legend(ax, kinds, x, y):
    """A row of small coloured swatches naming the module types, starting at (x, y)."""
    for kind in kinds:
        face, edge = COLORS[kind]
        ax.add_patch(FancyBboxPatch((x, y - 0.11), 0.3, 0.22, boxstyle="round,pad=0,rounding_size=0.04",
                                    facecolor=face, edgecolor=edge, linewidth=1.2))
        ax.text(x + 0.4, y, LEGEND_NAMES[kind], fontsize=10, color=TEXT, ha="left", va="center")
        x += 0.75 + 0.085 * len(LEGEND_NAMES[kind])  # swatch, gap and roughly the text width


def save(fig, name):
    path = os.path.join(OUT_DIR, name)
    fig.savefig(path, dpi=DPI, facecolor="white")
    plt.close(fig)
    return path


def feature_block(ax, x, y, w, h, depth, label, kind="cnn", n_lines=4):
    """A pseudo-3D block (a stack of channels) centred on its front face at (x, y)."""
    face, edge = COLORS[kind]
    dx, dy = depth * 0.6, depth * 0.45
    x0, y0 = x - w / 2, y - h / 2
    # back faces first, then the front face on top
    top = plt.Polygon([(x0, y0 + h), (x0 + dx, y0 + h + dy), (x0 + w + dx, y0 + h + dy), (x0 + w, y0 + h)],
                      facecolor=face, edgecolor=edge, linewidth=1.2, zorder=2)
    side = plt.Polygon([(x0 + w, y0), (x0 + w + dx, y0 + dy), (x0 + w + dx, y0 + h + dy), (x0 + w, y0 + h)],
                       facecolor=face, edgecolor=edge, linewidth=1.2, zorder=2)
    ax.add_patch(top)
    ax.add_patch(side)
    ax.add_patch(Rectangle((x0, y0), w, h, facecolor=face, edgecolor=edge, linewidth=1.4, zorder=2.1))
    for i in range(1, n_lines):  # a few lines on the top face hint at the channel stack
        f = i / n_lines
        ax.plot([x0 + f * dx, x0 + w + f * dx], [y0 + h + f * dy, y0 + h + f * dy],
                color=edge, linewidth=0.6, zorder=2.05)
    if label:
        ax.text(x, y, label, ha="center", va="center", fontsize=10.5, color=TEXT, zorder=3, linespacing=1.3)
    return Box(x + dx / 2, y + dy / 2, w + dx, h + dy)


def token(ax, x, y, text, fontsize=12):
    """A word token, drawn as plain text in a light rounded frame."""
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, color=TEXT, zorder=4,
            bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="#999999", linewidth=1.0))


# ---------------------------------------------------------------------------
# Figure 1: the encoder
# ---------------------------------------------------------------------------


def draw_encoder():
    fig, ax = new_figure(13, 7.2)
    title(ax, "Encoder: a pretrained CNN turns the image into 196 annotation vectors",
          "ResNet-50 by default; batch dimension omitted")

    # --- top row: image and the ResNet-50 stages (height ~ spatial size, width ~ channels)
    y_top = 4.55
    img_x = 0.95
    for i, col in enumerate(["#f4c7c3", "#c8e6c9", "#c5cae9"]):  # three channels R, G, B
        off = (2 - i) * 0.12
        ax.add_patch(Rectangle((img_x - 0.6 + off, y_top - 0.6 + off), 1.2, 1.2, facecolor=col,
                               edgecolor="#777777", linewidth=1.0, zorder=2 + i * 0.01))
    front_x0, front_y0 = img_x - 0.6, y_top - 0.6
    # a tiny landscape on the front channel: sun and two hills
    ax.add_patch(Circle((front_x0 + 0.85, front_y0 + 0.88), 0.13, facecolor="#f6d365", edgecolor="none", zorder=2.1))
    ax.add_patch(plt.Polygon([(front_x0 + 0.05, front_y0 + 0.05), (front_x0 + 0.45, front_y0 + 0.7),
                              (front_x0 + 0.85, front_y0 + 0.05)], facecolor="#8fb38a", edgecolor="none", zorder=2.1))
    ax.add_patch(plt.Polygon([(front_x0 + 0.5, front_y0 + 0.05), (front_x0 + 0.85, front_y0 + 0.5),
                              (front_x0 + 1.15, front_y0 + 0.05)], facecolor="#6f9a69", edgecolor="none", zorder=2.1))
    ax.text(img_x + 0.12, y_top - 1.0, "image", fontsize=11, ha="center", va="top", color=TEXT)
    shape_text(ax, img_x + 0.12, y_top - 1.3, "3 × H × W", va="top")
    shape_text(ax, img_x + 0.12, y_top - 1.6, "(3×256×256)", va="top", size=10, color="#777777")

    stages = [  # name, what it is, width (channels), height (spatial size), channels, spatial size
        ("stem", "conv 7×7/2\nmaxpool", 0.95, 2.1, "64", "H/4 × W/4"),
        ("layer1", "3 blocks", 0.95, 2.1, "256", "H/4 × W/4"),
        ("layer2", "4 blocks", 1.05, 1.55, "512", "H/8 × W/8"),
        ("layer3", "6 blocks", 1.15, 1.1, "1024", "H/16 × W/16"),
        ("layer4", "3 blocks", 1.25, 0.8, "2048", "H/32 × W/32"),
    ]
    x = 2.75
    prev = Box(img_x + 0.12, y_top, 1.45, 1.2)
    boxes = []
    for name, what, w, h, ch, hw in stages:
        b = box(ax, x, y_top, w, h, f"{name}\n{what}" if h > 1.0 else name, kind="cnn", fontsize=10.5)
        if h <= 1.0:
            ax.text(x, y_top + h / 2 + 0.08, what, fontsize=10, ha="center", va="bottom", color="#555555")
        shape_text(ax, x, y_top - 1.2, f"{ch} ch", va="center")
        shape_text(ax, x, y_top - 1.48, hw, va="center", size=10)
        arrow(ax, prev.right, b.left)
        prev = b
        boxes.append(b)
        x += w / 2 + 0.55 + (stages[len(boxes)][2] / 2 if len(boxes) < len(stages) else 0)
    region(ax, 1.95, y_top - 1.75, boxes[-1].x + 0.85, y_top + 1.45,
           "pretrained ResNet-50 (ImageNet weights; frozen, or fine-tune the later stages)", color="#4a78a8")

    # the classifier head is removed
    head = box(ax, 11.6, y_top, 1.7, 1.0, "", kind="dropped")
    for y0, y1 in ((y_top - 0.48, y_top + 0.48), (y_top + 0.48, y_top - 0.48)):
        ax.plot([head.x - 0.8, head.x + 0.8], [y0, y1], color="#e07070", linewidth=2.5, zorder=2.5)
    ax.text(head.x, y_top, "avgpool + fc\n(1000 classes)", fontsize=10.5, ha="center", va="center", color="#666666",
            zorder=3, bbox=dict(facecolor="white", edgecolor="none", pad=2, alpha=0.85))
    ax.text(head.x, y_top + 0.7, "dropped", fontsize=11, color="#d04040", ha="center", va="bottom",
            fontweight="bold")
    arrow(ax, boxes[-1].right, (head.left[0], y_top), dashed=True, color="#aaaaaa")

    # --- bottom row: adaptive pooling, feature map, flattening
    y_bot = 1.35
    l4 = boxes[-1]
    pool = box(ax, 2.0, y_bot, 2.3, 0.9, "AdaptiveAvgPool2d\n(14, 14)", kind="op", fontsize=10.5)
    # wrap the flow from layer4 down to the start of the bottom row
    y_wrap = y_top - 1.95
    ax.plot([l4.x, l4.x], [l4.bottom[1], y_top - 1.05], color=ARROW, linewidth=1.5, zorder=1.8)
    ax.plot([l4.x, l4.x], [y_top - 1.65, y_wrap], color=ARROW, linewidth=1.5, zorder=1.8)
    path_arrow(ax, [(l4.x, y_wrap), (pool.x, y_wrap), pool.top])

    fmap = feature_block(ax, 5.0, y_bot, 1.15, 1.15, 0.75, "2048\n× 14 × 14")
    arrow(ax, pool.right, (4.425, y_bot), label="fixed size for\nany H, W",
          label_xy=((pool.right[0] + 4.4) / 2, y_bot + 0.55), fontsize=10)

    flat = box(ax, 7.55, y_bot, 2.0, 0.9, "permute + flatten\n(14·14 = 196)", kind="op", fontsize=10.5)
    arrow(ax, (fmap.right[0] + 0.02, y_bot), flat.left)

    # the result: a num_pixels x encoder_dim matrix, one row per image region
    gx0, gy0, gw, gh = 9.35, y_bot - 0.95, 1.3, 1.9
    ax.add_patch(Rectangle((gx0, gy0), gw, gh, facecolor=COLORS["data"][0], edgecolor="#555555",
                           linewidth=1.4, zorder=2))
    for i in range(1, 14):
        yy = gy0 + i * gh / 14
        ax.plot([gx0, gx0 + gw], [yy, yy], color="#bbbbbb", linewidth=0.7, zorder=2.1)
    ax.add_patch(Rectangle((gx0, gy0 + 9 * gh / 14), gw, gh / 14, facecolor=COLORS["cnn"][0],
                           edgecolor=COLORS["cnn"][1], linewidth=1.2, zorder=2.2))
    arrow(ax, flat.right, (gx0, y_bot))
    shape_text(ax, gx0 + gw / 2, gy0 + gh + 0.15, "2048 = encoder_dim", size=10)
    ax.text(gx0 - 0.1, gy0 - 0.2, "196 = num_pixels rows", fontsize=10, ha="left", va="top", color=TEXT)
    ax.annotate(r"row $a_i$: one image region", xy=(gx0 + gw, gy0 + 9.5 * gh / 14),
                xytext=(gx0 + gw + 0.2, gy0 + gh + 0.05), fontsize=10.5, color=TEXT, ha="left", va="center",
                arrowprops=dict(arrowstyle="-", color="#777777", linewidth=1.0))
    note(ax, gx0 + gw + 0.2, y_bot + 0.05,
         "annotation vectors\n" r"$a = \{a_1, \ldots, a_{196}\}$" "\n(input to the decoder)", fontsize=10.5)
    return save(fig, "encoder.png")


# ---------------------------------------------------------------------------
# Figure 2 and 3: the decoder, without and with attention
# ---------------------------------------------------------------------------


def draw_init_state(ax, mean_xy, y_h, y_c, x_lin=1.6):
    """Mean over pixels -> Linear init_h / init_c.

    The mean box sits above or below the two linear boxes; its output a-bar runs
    along a vertical line on the left and branches into both. Returns (init_h, init_c).
    """
    mx, my = mean_xy
    mean = box(ax, mx, my, 1.9, 0.7, "mean over\n196 pixels", kind="op", fontsize=10.5)
    init_h = box(ax, x_lin, y_h, 1.3, 0.46, "Linear init_h", kind="linear", fontsize=10)
    init_c = box(ax, x_lin, y_c, 1.3, 0.46, "Linear init_c", kind="linear", fontsize=10)
    bus_x = mean.left[0] + 0.3
    above = my > y_h
    near, far = (init_h, init_c) if above else (init_c, init_h)
    start = mean.bottom[1] if above else mean.top[1]
    path_arrow(ax, [(bus_x, start), (bus_x, far.y), far.left])
    arrow(ax, (bus_x, near.y), near.left)
    ax.plot([bus_x], [near.y], marker="o", markersize=5, color=ARROW, zorder=2)
    edge = near.top[1] if above else near.bottom[1]
    shape_text(ax, bus_x + 0.12, (start + edge) / 2, "ā (2048)", ha="left")
    return init_h, init_c


def draw_decoder():
    fig, ax = new_figure(13, 7.6)
    title(ax, "Decoder without attention: an LSTM unrolled over time",
          r"the image is seen only once, through the initial state $h_0, c_0$")
    legend(ax, ["lstm", "linear", "embed", "op", "data"], 0.35, 6.5)

    y_in, y_emb, y_lstm, y_fc, y_out = 0.75, 1.75, 3.45, 5.05, 6.0
    y_h, y_c = y_lstm + 0.33, y_lstm - 0.33

    feat = box(ax, 1.15, 5.75, 1.9, 0.75, "encoder features\n" r"$a$: 196 × 2048", kind="data", fontsize=10.5)
    init_h, init_c = draw_init_state(ax, (1.15, 4.75), y_h, y_c)
    arrow(ax, feat.bottom, (1.15, 5.1))

    cols = [4.35, 6.7, 9.05, 11.85]
    x_dots = 10.45
    inputs = ["<start>", r"$w_1$", r"$w_2$", r"$w_{T-1}$"]
    outputs = [r"$w_1$", r"$w_2$", r"$w_3$", "<end>"]
    steps = ["t = 1", "t = 2", "t = 3", "t = T"]
    lstms = []
    for i, x in enumerate(cols):
        emb = box(ax, x, y_emb, 1.2, 0.55, "Embedding", kind="embed", fontsize=10.5)
        lstm = box(ax, x, y_lstm, 1.3, 1.3, "", kind="lstm")
        ax.text(x, y_lstm + 0.1, "LSTMCell", fontsize=11.5, fontweight="bold", ha="center", va="center")
        ax.text(x, y_lstm - 0.3, steps[i], fontsize=10.5, ha="center", va="center", color="#555555")
        fc = box(ax, x, y_fc, 1.2, 0.65, "Linear fc\n+ softmax", kind="linear", fontsize=10.5)
        token(ax, x, y_in, inputs[i])
        token(ax, x, y_out, outputs[i])
        arrow(ax, (x, y_in + 0.22), emb.bottom)
        arrow(ax, emb.top, (x, y_lstm - 0.65))
        arrow(ax, lstm.top, fc.bottom, label=f"$h_{{{i + 1 if i < 3 else 'T'}}}$", offset=(0.22, 0), ha="left")
        arrow(ax, fc.top, (x, y_out - 0.22))
        lstms.append(lstm)

    # initial state into the first cell, recurrent state between cells
    arrow(ax, init_h.right, (lstms[0].left[0], y_h), label="$h_0$", offset=(0, 0.17))
    arrow(ax, init_c.right, (lstms[0].left[0], y_c), label="$c_0$", offset=(0, -0.18))
    for i in range(len(cols) - 1):
        x0, x1 = lstms[i].right[0], lstms[i + 1].left[0]
        if i == 2:  # the gap with the dots: arrows in and out of the dots
            for xa, xb in ((x0, x_dots - 0.3), (x_dots + 0.3, x1)):
                arrow(ax, (xa, y_h), (xb, y_h))
                arrow(ax, (xa, y_c), (xb, y_c))
            for yy in (y_in, y_emb, y_lstm, y_fc, y_out):
                ax.text(x_dots, yy, "···", fontsize=16, ha="center", va="center", color="#555555")
            continue
        arrow(ax, (x0, y_h), (x1, y_h), label=f"$h_{i + 1}$", label_xy=(x0 + 0.25, y_h + 0.17))
        arrow(ax, (x0, y_c), (x1, y_c), label=f"$c_{i + 1}$", label_xy=(x0 + 0.25, y_c - 0.18))
        # the predicted word becomes the next input: down through the gap between the columns
        x_mid = (x0 + x1) / 2
        path_arrow(ax, [(cols[i] + 0.3, y_out), (x_mid, y_out), (x_mid, y_in), (cols[i + 1] - 0.3, y_in)],
                   dashed=True, color="#b59a2a", lw=1.3)

    note(ax, 0.3, 2.35,
         "dashed: the word predicted at\nstep t is the input at step t+1\n"
         "(in training: the ground-truth\nword instead, teacher forcing)", fontsize=10)
    return save(fig, "decoder.png")


def draw_decoder_att():
    fig, ax = new_figure(13, 9.5)
    title(ax, "Decoder with soft attention: the LSTM looks at the image at every step",
          r"input to the LSTM at step t = [ embedding of $y_{t-1}$ ; gated context $\beta_t \odot z_t$ ]")
    legend(ax, ["lstm", "att", "linear", "embed", "op", "data"], 0.35, 8.4)
    note(ax, 0.3, 8.05,
         r"orange: $h_{t-1}$ goes into the attention block and into the gate $\beta_t = \sigma(f_\beta(h_{t-1}))$",
         fontsize=10.5, color="#a0602a")

    y_bus, y_in, y_att, y_gate, y_cat, y_lstm, y_fc, y_out = 0.45, 1.05, 2.0, 3.25, 4.05, 5.35, 6.6, 7.45
    y_h, y_c = y_lstm + 0.3, y_lstm - 0.3

    # encoder features: a bus along the bottom that feeds every attention block
    feat = box(ax, 1.15, y_bus + 0.35, 1.9, 0.75, "encoder features\n" r"$a$: 196 × 2048", kind="data",
               fontsize=10.5)
    init_h, init_c = draw_init_state(ax, (1.15, 3.0), y_h, y_c)
    arrow(ax, feat.top, (1.15, 2.65))

    cols = [4.85, 7.85, 11.45]
    x_dots = 9.75
    inputs = ["<start>", r"$w_1$", r"$w_{T-1}$"]
    outputs = [r"$w_1$", r"$w_2$", "<end>"]
    steps = ["t = 1", "t = 2", "t = T"]
    ax.plot([feat.right[0], cols[-1] - 0.62], [y_bus, y_bus], color=COLORS["data"][1], linewidth=2.2, zorder=1.7)
    lstms, atts = [], []
    for i, x in enumerate(cols):
        xa, xe = x - 0.62, x + 0.72  # attention on the left, embedding on the right
        att = box(ax, xa, y_att, 1.15, 0.8, "Attention", kind="att", fontsize=11, bold=True)
        emb = box(ax, xe, y_att, 1.15, 0.55, "Embedding", kind="embed", fontsize=10.5)
        gate = circle(ax, xa, y_gate, 0.2, r"$\odot$", fontsize=15)
        cat = box(ax, x, y_cat, 1.0, 0.42, "concat", kind="op", fontsize=10.5)
        lstm = box(ax, x, y_lstm, 1.3, 1.0, "", kind="lstm")
        ax.text(x, y_lstm + 0.12, "LSTMCell", fontsize=11.5, fontweight="bold", ha="center", va="center")
        ax.text(x, y_lstm - 0.25, steps[i], fontsize=10.5, ha="center", va="center", color="#555555")
        fc = box(ax, x, y_fc, 1.3, 0.7, "Linear fc\n+ softmax", kind="linear", fontsize=10.5)
        token(ax, xe, y_in, inputs[i])
        token(ax, x, y_out, outputs[i])

        arrow(ax, (xa, y_bus), att.bottom)                     # features into attention
        ax.plot([xa], [y_bus], marker="o", markersize=5, color=COLORS["data"][1], zorder=2)
        arrow(ax, att.top, gate.bottom, label=r"$z_t$", offset=(0.15, 0), ha="left")
        arrow(ax, gate.top, cat.at(0.2, 0), label=r"$\beta_t \odot z_t$", offset=(-0.15, 0.02), ha="right")
        arrow(ax, (xe, y_in + 0.22), emb.bottom)
        arrow(ax, emb.top, cat.at(0.8, 0), label=r"$E\,y_{t-1}$", offset=(0.2, 0), ha="left")
        arrow(ax, cat.top, lstm.bottom)
        arrow(ax, lstm.top, fc.bottom, label=r"$h_t$", offset=(0.2, 0), ha="left")
        arrow(ax, fc.top, (x, y_out - 0.2))
        lstms.append(lstm)
        atts.append(att)

    # recurrent state; h_{t-1} also drops down into the attention block and the gate of step t
    prev_x = [init_h.right[0]] + [l.right[0] for l in lstms[:-1]]
    names = [("h_0", "c_0"), ("h_1", "c_1"), ("h_{T-1}", "c_{T-1}")]
    for i, x in enumerate(cols):
        xs = prev_x[i]
        if i == 2:  # going into and coming out of the dots
            arrow(ax, (xs, y_h), (x_dots - 0.3, y_h))
            arrow(ax, (xs, y_c), (x_dots - 0.3, y_c))
            for yy in (y_in, y_att, y_lstm, y_fc, y_out):
                ax.text(x_dots, yy, "···", fontsize=16, ha="center", va="center", color="#555555")
            xs = x_dots + 0.3
        x_branch = x - 1.45
        hname, cname = names[i]
        arrow(ax, (xs, y_h), (lstms[i].left[0], y_h), label=f"${hname}$", label_xy=(x_branch - 0.3, y_h + 0.2))
        arrow(ax, (xs, y_c), (lstms[i].left[0], y_c), label=f"${cname}$", label_xy=(x_branch - 0.3, y_c - 0.2))
        ax.plot([x_branch], [y_h], marker="o", markersize=5, color=ARROW, zorder=2)
        path_arrow(ax, [(x_branch, y_h), (x_branch, y_att), atts[i].left], color="#c9782e")
        # the gate beta_t = sigmoid(f_beta(h_{t-1})) also reads h_{t-1}
        arrow(ax, (x_branch, y_gate), (x - 0.62 - 0.2, y_gate), color="#c9782e")
        ax.plot([x_branch], [y_gate], marker="o", markersize=4, color="#c9782e", zorder=2)

    ax.text(feat.right[0] + 0.3, y_bus - 0.22,
            r"encoder features $a_1 \ldots a_{196}$ (num_pixels × encoder_dim), the same at every step",
            fontsize=10, ha="left", va="center", color="#555555")
    return save(fig, "decoder_att.png")


# ---------------------------------------------------------------------------
# Figure 4: the attention module in detail
# ---------------------------------------------------------------------------


def draw_att():
    fig, ax = new_figure(12.5, 10.0)
    title(ax, "Soft attention (one decoding step t)",
          "shapes without the batch dimension; num_pixels = 196, encoder_dim = 2048")
    legend(ax, ["att", "linear", "op", "data"], 0.35, 9.0)

    xl, xr, xm = 2.6, 8.4, 5.5
    a_box = box(ax, xl, 8.2, 2.9, 0.85, "encoder features  " r"$a_i$" "\nnum_pixels × encoder_dim",
                kind="data", fontsize=11)
    h_box = box(ax, xr, 8.2, 2.9, 0.85, "decoder state  " r"$h_{t-1}$" "\n(decoder_dim,)", kind="data",
                fontsize=11)
    wa = box(ax, xl, 6.75, 2.4, 0.7, r"Linear $W_a$  (encoder_att)", kind="linear", fontsize=11)
    wh = box(ax, xr, 6.75, 2.4, 0.7, r"Linear $W_h$  (decoder_att)", kind="linear", fontsize=11)
    arrow(ax, a_box.bottom, wa.top, label="computed once per image", offset=(0.15, 0), ha="left",
          fontsize=10)
    arrow(ax, h_box.bottom, wh.top, label="computed at every step", offset=(0.15, 0), ha="left", fontsize=10)

    add = circle(ax, xm, 5.45, 0.27, "+", fontsize=18)
    arrow(ax, wa.bottom, add.at(0.0, 0.7), label="(num_pixels, attention_dim)", shape=True,
          label_xy=(3.1, 5.6))
    arrow(ax, wh.bottom, add.at(1.0, 0.7), label="(attention_dim,)\nbroadcast over pixels", shape=True,
          label_xy=(8.0, 5.55))

    relu = box(ax, xm, 4.5, 1.5, 0.55, "ReLU", kind="op", fontsize=11)
    w = box(ax, xm, 3.45, 2.6, 0.65, r"Linear $w$  (full_att)" "\nattention_dim → 1", kind="linear", fontsize=10.5)
    soft = box(ax, xm, 2.3, 2.6, 0.6, "softmax over pixels", kind="op", fontsize=11)
    wsum = box(ax, xm, 0.95, 2.6, 0.75, "weighted sum\n" r"$\Sigma_i\, \alpha_{t,i}\, a_i$", kind="att",
               fontsize=11)
    arrow(ax, add.bottom, relu.top, label="(num_pixels, attention_dim)", shape=True, offset=(0.2, 0), ha="left")
    arrow(ax, relu.bottom, w.top, label="(num_pixels, attention_dim)", shape=True, offset=(0.2, 0), ha="left")
    arrow(ax, w.bottom, soft.top, label=r"scores $e_{t,i}$:  (num_pixels,)", offset=(0.2, 0), ha="left",
          fontsize=10.5)
    arrow(ax, soft.bottom, wsum.top,
          label=r"weights $\alpha_{t,i}$:  (num_pixels,),  $\Sigma_i\, \alpha_{t,i} = 1$",
          offset=(0.2, 0.02), ha="left", fontsize=10.5)

    # the features also go straight to the weighted sum
    x_side = 0.55
    path_arrow(ax, [a_box.left, (x_side, a_box.y), (x_side, wsum.y), wsum.left])
    ax.text(x_side + 0.12, 2.2, r"$a_i$" "\n(num_pixels,\nencoder_dim)", fontsize=10.5, ha="left",
            va="center", color=TEXT)

    z = box(ax, 9.6, wsum.y, 2.4, 0.75, r"context  $z_t$" "\n(encoder_dim,)", kind="data", fontsize=11)
    arrow(ax, wsum.right, z.left)
    note(ax, z.x - 1.2, z.y - 0.5, r"in the decoder: $z_t \leftarrow \beta_t \odot z_t$", fontsize=10.5)

    # a small picture of the weights: alpha reshaped to 14 x 14, one cell per image region
    yy, xx = np.mgrid[0:14, 0:14]
    alpha = np.exp(-((xx - 9.0) ** 2 + (yy - 4.5) ** 2) / 6.0) + 0.35 * np.exp(-((xx - 4) ** 2 + (yy - 9) ** 2) / 4.0)
    alpha /= alpha.sum()
    inset = fig.add_axes((9.15 / 12.5, 2.3 / 10.0, 1.55 / 12.5, 1.55 / 10.0))
    inset.imshow(alpha, cmap="Oranges", interpolation="nearest")
    inset.set_xticks([])
    inset.set_yticks([])
    for spine in inset.spines.values():
        spine.set_edgecolor("#c9782e")
    ax.text(9.92, 4.0, r"$\alpha_t$ as a 14 × 14 map", fontsize=10.5, ha="center", va="bottom", color=TEXT)
    arrow(ax, (soft.right[0] - 0.3, soft.bottom[1] - 0.05), (9.05, 3.0), dashed=True, color="#c9782e",
          rad=0.25, lw=1.2)

    # the same computation as formulas
    eq = (r"$e_{t,i} = w^\top\, \mathrm{ReLU}(W_a a_i + W_h h_{t-1})$" "\n"
          r"$\alpha_{t,i} = \exp(e_{t,i}) \,/\, \Sigma_k \exp(e_{t,k})$" "\n"
          r"$z_t = \Sigma_i\, \alpha_{t,i}\, a_i$")
    ax.text(0.9, 4.2, eq, fontsize=11.5, ha="left", va="center", color=TEXT, linespacing=1.9,
            bbox=dict(boxstyle="round,pad=0.5", facecolor="#fbfbfb", edgecolor="#cccccc"))
    return save(fig, "att.png")


# ---------------------------------------------------------------------------
# Figure 5: the whole model
# ---------------------------------------------------------------------------


def draw_overall():
    fig, ax = new_figure(13.2, 7.5)
    title(ax, "Show, Attend and Tell: the whole pipeline",
          "the encoder runs once per image; the decoder loop runs once per word")
    legend(ax, ["cnn", "att", "lstm", "linear", "embed", "data", "infer"], 0.35, 6.45)

    y = 3.45
    # image, with a tiny landscape on it
    ix, iy = 0.35, y - 0.6
    ax.add_patch(Rectangle((ix, iy), 1.2, 1.2, facecolor="#dcecf7", edgecolor="#777777", linewidth=1.0, zorder=2))
    ax.add_patch(Circle((ix + 0.9, iy + 0.92), 0.13, facecolor="#f6d365", edgecolor="none", zorder=2.1))
    ax.add_patch(plt.Polygon([(ix + 0.05, iy + 0.05), (ix + 0.45, iy + 0.72), (ix + 0.85, iy + 0.05)],
                             facecolor="#8fb38a", edgecolor="none", zorder=2.1))
    ax.add_patch(plt.Polygon([(ix + 0.5, iy + 0.05), (ix + 0.85, iy + 0.5), (ix + 1.15, iy + 0.05)],
                             facecolor="#6f9a69", edgecolor="none", zorder=2.1))
    ax.text(ix + 0.6, iy - 0.15, "image", fontsize=11, ha="center", va="top", color=TEXT)
    shape_text(ax, ix + 0.6, iy - 0.45, "3×256×256", va="top")

    enc = box(ax, 2.75, y, 1.5, 1.3, "Encoder\nResNet-50\n+ pool", kind="cnn", fontsize=11, bold=True)
    arrow(ax, (ix + 1.2, y), enc.left)
    feat = box(ax, 4.75, y, 1.55, 0.95, "features $a$\n196 × 2048", kind="data", fontsize=10.5)
    arrow(ax, enc.right, feat.left)
    init = box(ax, 4.75, 1.45, 1.55, 0.85, "init $h_0, c_0$\n(mean + Linear)", kind="linear", fontsize=10.5)
    arrow(ax, feat.bottom, init.top)

    # the decoding loop
    region(ax, 6.05, 0.55, 11.15, 5.75, "for t = 1, 2, … until <end> or max length", color="#4f8a44")
    att = box(ax, 7.3, 4.6, 1.7, 0.9, "Attention\n" r"$\alpha_t$, $z_t$", kind="att", fontsize=11, bold=True)
    emb = box(ax, 7.3, 2.3, 1.7, 0.75, "Embedding\n" r"of $y_{t-1}$", kind="embed", fontsize=10.5)
    lstm = box(ax, 9.35, y, 1.45, 1.15, "LSTMCell", kind="lstm", fontsize=11.5, bold=True)
    fc = box(ax, 9.35, 1.55, 1.6, 0.75, "Linear fc\n+ softmax", kind="linear", fontsize=10.5)
    ax.text(fc.x, fc.bottom[1] - 0.2, "over the vocabulary", fontsize=10, ha="center", va="center",
            color="#555555")

    path_arrow(ax, [feat.right, (5.8, y), (5.8, att.y), att.left])
    arrow(ax, att.at(0.8, 0), lstm.at(0, 0.82), label=r"$\beta_t \odot z_t$", label_xy=(8.85, 4.35))
    arrow(ax, emb.at(0.8, 1), lstm.at(0, 0.18), label=r"$E\,y_{t-1}$", label_xy=(8.75, 2.55))
    path_arrow(ax, [init.right, (6.3, init.y), (6.3, y), lstm.left])
    ax.text(7.3, y + 0.17, "$h_0, c_0$ (at t = 1)", fontsize=10.5, ha="center", va="center", color=TEXT)
    arrow(ax, lstm.bottom, fc.top, label="$h_t$", offset=(0.15, 0), ha="left")
    # recurrence: h_t goes to the next step's attention; h_t, c_t to the next step's LSTM
    path_arrow(ax, [lstm.at(0.5, 1), (lstm.x, 5.3), (att.x, 5.3), att.top], color="#4f8a44")
    ax.text((lstm.x + att.x) / 2, 5.45, r"$h_t$ → attention at step t+1", fontsize=10.5,
            ha="center", va="center", color="#4f8a44")
    arrow(ax, lstm.at(1, 0.75), lstm.at(1, 0.25), rad=-1.3, color="#4f8a44")
    ax.text(lstm.right[0] + 0.5, y, "$h_t, c_t$", fontsize=10.5, ha="left", va="center", color="#4f8a44")

    # output: next word, fed back; at inference, beam search over the softmax outputs
    word = box(ax, 11.8, fc.y, 1.05, 0.6, r"word $y_t$", kind="data", fontsize=11)
    arrow(ax, fc.right, word.left)
    path_arrow(ax, [word.bottom, (word.x, 0.25), (emb.x, 0.25), emb.bottom], color="#b59a2a", dashed=True)
    ax.text(9.35, 0.25, r"$y_t$ is the next input", fontsize=10.5, ha="center", va="center", color="#8a7520",
            bbox=dict(facecolor="white", edgecolor="none", pad=1.5))

    beam = box(ax, 12.15, y, 1.8, 1.25, "beam search\n(inference):\nkeep the k best\npartial captions",
               kind="infer", fontsize=10)
    arrow(ax, word.top, (word.x, beam.bottom[1]))
    cap = box(ax, 12.15, 5.05, 1.8, 0.7, "\u201ca dog runs on\nthe grass\u201d", kind="data", fontsize=10.5)
    arrow(ax, beam.top, cap.bottom)
    note(ax, 0.35, 1.75,
         "training: teacher forcing,\ncross-entropy on each word\n"
         r"+ $\lambda\, \Sigma_i (1 - \Sigma_t\, \alpha_{t,i})^2$", fontsize=10)
    return save(fig, "overall.png")


def main():
    for draw in (draw_encoder, draw_decoder, draw_decoder_att, draw_att, draw_overall):
        print(draw())


if __name__ == "__main__":
    main()
