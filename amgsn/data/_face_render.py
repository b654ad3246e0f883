"""Draw one synthetic face from its identity, expression (action units) and nuisance parameters.

Everything is drawn with PIL on a 3x super-sampled canvas from point lists in *face units*
(1 = half the face width, y down, eye line near 0). Each point gets a depth from an ellipsoidal
head so that yaw and pitch move the central features more than the outline (a cheap but
convincing 3D turn); roll, scale and shift are applied after projection. The canvas is then
box-downsampled (anti-aliasing) and degraded (lighting, low resolution, blur, noise, JPEG).

Only ``render_face`` is public; the ``_draw_*`` helpers each draw one facial part.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ._face_model import Expression, Identity, Nuisance

SUPERSAMPLE = 3


class _Pose:
    """Maps face-unit points (with optional extra depth) to canvas pixel coordinates."""

    def __init__(self, ident: Identity, nz: Nuisance, canvas: int):
        self.rx = ident.face_w
        self.cy, self.ry, self.rz = 0.15, 1.35, 0.85
        self.cyaw, self.syaw = math.cos(nz.yaw), math.sin(nz.yaw)
        self.cpit, self.spit = math.cos(nz.pitch), math.sin(nz.pitch)
        self.croll, self.sroll = math.cos(nz.roll), math.sin(nz.roll)
        self.px = canvas * 0.355 * nz.scale  # pixels per face unit
        self.ox = canvas * (0.5 + nz.shift[0])
        self.oy = canvas * (0.45 + nz.shift[1])

    def depth(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = 1.0 - (x / self.rx) ** 2 - ((y - self.cy) / self.ry) ** 2
        return self.rz * np.sqrt(np.clip(r, 0.0, None))

    def __call__(self, pts: np.ndarray, dz: float | np.ndarray = 0.0, surface: bool = True) -> list:
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        x, y = pts[:, 0], pts[:, 1]
        z = (self.depth(x, y) if surface else 0.0) + dz
        # The head turns about a point behind the face (z = -0.6), so the outline moves little.
        z = z + 0.6
        x1 = x * self.cyaw + z * self.syaw
        z1 = -x * self.syaw + z * self.cyaw
        y1 = y * self.cpit - z1 * self.spit
        xr = x1 * self.croll - y1 * self.sroll
        yr = x1 * self.sroll + y1 * self.croll
        return list(zip((self.ox + xr * self.px).tolist(), (self.oy + yr * self.px).tolist()))

    def width(self, w: float) -> int:
        return max(1, int(round(w * self.px)))


def _rgba(c: np.ndarray, a: float = 255) -> tuple[int, int, int, int]:
    c = np.clip(c, 0, 255)
    return int(c[0]), int(c[1]), int(c[2]), int(np.clip(a, 0, 255))


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24, rot: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    cr, sr = math.cos(rot), math.sin(rot)
    return np.stack([cx + x * cr - y * sr, cy + x * sr + y * cr], 1)


def _curve(p0, p1, p2, n: int = 12) -> np.ndarray:
    """Quadratic Bezier from p0 to p2 with control p1."""
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _face_outline(ident: Identity, jaw_drop: float, n: int = 72) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    e_up, e_lo = 2.0 / 2.3, 2.0 / ident.jaw_exp
    x = np.where(lower, ident.face_w * np.sign(c) * np.abs(c) ** e_lo, ident.face_w * np.sign(c) * np.abs(c) ** e_up)
    h_bot = ident.face_h_bot + 0.22 * jaw_drop
    y = np.where(lower, h_bot * np.abs(s) ** e_lo, -ident.face_h_top * np.abs(s) ** e_up)
    # Narrow the lower face towards the chin a little more than a superellipse does.
    x = x * np.where(lower, 1.0 - 0.18 * np.abs(s) ** 2, 1.0)
    return np.stack([x, y + 0.05], 1)


def _draw_background(nz: Nuisance, size: int, rng: np.random.Generator) -> Image.Image:
    c = nz.bg_colours
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    if nz.background == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + (xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a), 0, 1)[..., None]
        img = c[0] * (1 - t) + c[1] * t
    elif nz.background == "stripes":
        a, f = rng.uniform(0, math.pi), rng.uniform(2, 8)
        t = (0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a))))[..., None]
        img = c[0] * (1 - t) + c[1] * t
    else:
        k = 4 if nz.background == "blobs" else 12
        low = rng.uniform(0, 1, (k, k, 3)).astype(np.float32)
        low = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        t = low.astype(np.float32) / 255.0
        img = c[0] * (1 - t) + c[2] * t
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _draw_hair_back(d: ImageDraw.ImageDraw, P: _Pose, ident: Identity) -> None:
    if ident.hair_style not in ("long", "bun"):
        return
    w = ident.face_w
    bottom = 0.4 + 1.0 * ident.hair_len if ident.hair_style == "long" else 0.0
    top = _face_outline(ident, 0.0, 48)
    top = top[top[:, 1] < 0.1] * np.array([1.14, 1.1]) + np.array([0.0, -0.06])
    top = top[np.argsort(np.arctan2(top[:, 1], top[:, 0]))]  # left → right over the top
    pts = np.concatenate([[[-1.22 * w, bottom]], top, [[1.22 * w, bottom]]])
    d.polygon(P(pts, dz=-0.5, surface=False), fill=_rgba(ident.hair * 0.85))
    if ident.hair_style == "bun":
        d.polygon(P(_ellipse(0.0, -ident.face_h_top - 0.25, 0.32, 0.24), dz=-0.3, surface=False),
                  fill=_rgba(ident.hair * 0.9))


def _draw_body(d: ImageDraw.ImageDraw, P: _Pose, ident: Identity) -> None:
    w = ident.face_w
    neck = np.array([[-0.45 * w, 0.6], [0.45 * w, 0.6], [0.5 * w, 2.2], [-0.5 * w, 2.2]])
    d.polygon(P(neck, dz=-0.4, surface=False), fill=_rgba(ident.skin * 0.8))
    body = np.array([[-2.4, 2.8], [-2.0, 1.85], [-0.55 * w, 1.55], [0.0, 1.75], [0.55 * w, 1.55], [2.0, 1.85],
                     [2.4, 2.8]])
    d.polygon(P(body, dz=-0.4, surface=False), fill=_rgba(ident.clothes))
    for s in (-1, 1):  # ears
        ear = _ellipse(s * (ident.face_w + 0.02), 0.12, 0.1, 0.2)
        d.polygon(P(ear, dz=-0.55, surface=False), fill=_rgba(ident.skin * 0.92))
        d.line(P(_ellipse(s * (ident.face_w + 0.03), 0.12, 0.05, 0.12, 12), dz=-0.55, surface=False),
               fill=_rgba(ident.skin * 0.7, 160), width=P.width(0.015))


def _draw_hair_front(d: ImageDraw.ImageDraw, P: _Pose, ident: Identity, rng: np.random.Generator) -> None:
    if ident.hair_style == "bald":
        return
    w, top = ident.face_w, ident.face_h_top
    xs = np.linspace(-1.06 * w, 1.06 * w, 25)
    u = xs / (1.06 * w)
    if ident.hair_style == "bangs":
        line = -0.42 - 0.08 * (1 - u**2) + 0.3 * u**4 + rng.uniform(-0.025, 0.025, len(xs))
    else:
        part = rng.uniform(-0.3, 0.3)
        line = -0.58 - 0.22 * (1 - u**2) + 0.45 * u**4 + 0.06 * np.exp(-((u - part) / 0.15) ** 2)
    line = np.minimum(line, -0.05)
    hairline = np.stack([xs, line], 1)
    crown = _face_outline(ident, 0.0, 48)
    crown = crown[crown[:, 1] < -0.02] * np.array([1.09, 1.12]) + np.array([0.0, -0.08 - 0.05 * ident.hair_len])
    crown = crown[np.argsort(-np.arctan2(crown[:, 1], crown[:, 0]))]  # right → left over the top
    pts = np.concatenate([hairline, crown])
    d.polygon(P(pts, dz=-0.15, surface=False), fill=_rgba(ident.hair))
    # A few strands for texture.
    dark = _rgba(ident.hair * 0.7, 120)
    for _ in range(6):  # strands end just above the hairline, never on the skin
        x0 = rng.uniform(-0.7, 0.7) * w
        x1 = x0 * 1.15
        y1 = float(np.interp(x1, xs, line)) - 0.06
        d.line(P(_curve((x0, -top - 0.05), (x0 + rng.uniform(-0.2, 0.2), (y1 - top) / 2), (x1, y1), 6),
                 dz=-0.15, surface=False), fill=dark, width=P.width(0.012))


def _line(d, P, pts, colour, alpha, width, dz=0.0) -> None:
    if alpha > 4:
        d.line(P(pts, dz=dz), fill=_rgba(colour, alpha), width=P.width(width), joint="curve")


def _draw_wrinkles(d, P, ident: Identity, ex: Expression) -> None:
    a, skin = ex.aus, ident.skin
    line_c = skin * 0.62
    by = ident.eye_y + ident.brow_y
    # Forehead lines: AU1 lifts the centre, AU2 the sides (surprise, fear); age adds static lines.
    lift = 0.55 * a["AU1"] + 0.45 * a["AU2"]
    alpha = 230 * np.clip(1.5 * lift - 0.15, 0, 1) + 45 * ident.age
    span = 0.28 + 0.3 * a["AU2"] / max(lift, 1e-3) * min(lift * 2, 1)
    for k in range(3):
        y0 = by - 0.2 - 0.11 * k - 0.08 * lift
        xs = np.linspace(-span, span, 9)
        ys = y0 + 0.05 * (xs / span) ** 2 - 0.05 * a["AU1"] * (1 - (xs / span) ** 2)
        _line(d, P, np.stack([xs, ys], 1), line_c, alpha * (1 - 0.2 * k), 0.016)
    # Glabellar lines between the brows: AU4 (anger, fear, sadness, a bit of disgust).
    g = 240 * np.clip(1.6 * a["AU4"] - 0.15, 0, 1) + 25 * ident.age
    for s in (-1, 1):
        _line(d, P, _curve((s * 0.045, by - 0.06), (s * 0.03, by + 0.02), (s * 0.05, by + 0.1), 5), line_c, g, 0.016)
    # Nose wrinkles: AU9 (disgust).
    n = 250 * np.clip(1.6 * a["AU9"] - 0.1, 0, 1)
    for k in range(3):
        y0 = ident.eye_y + 0.02 + 0.05 * k
        _line(d, P, _curve((-0.08, y0 + 0.02), (0.0, y0 - 0.02), (0.08, y0 + 0.02), 5), line_c, n, 0.014, dz=0.1)
    for s in (-1, 1):
        _line(d, P, _curve((s * 0.08, ident.eye_y + 0.02), (s * 0.12, ident.eye_y + 0.1),
                           (s * 0.14, ident.eye_y + 0.2), 5), line_c, n * 0.8, 0.014, dz=0.05)
    # Crow's feet at the outer eye corners: AU6 (genuine smile).
    cf = 230 * np.clip(1.5 * a["AU6"] - 0.1, 0, 1) + 40 * ident.age
    for s in (-1, 1):
        x0 = s * (ident.eye_dx + ident.eye_w + 0.04)
        for ang in (-0.45, 0.0, 0.45):
            pts = np.array([[x0, ident.eye_y], [x0 + s * 0.09 * math.cos(ang), ident.eye_y + 0.09 * math.sin(ang)]])
            _line(d, P, pts, line_c, cf, 0.012)
        # Raised cheek: the furrow under the lower lid moves up and deepens.
        yc = ident.eye_y + ident.eye_lo + 0.1 - 0.05 * a["AU6"]
        xc = s * ident.eye_dx
        _line(d, P, _curve((xc - 0.13, yc - 0.02), (xc, yc + 0.05), (xc + s * 0.16, yc - 0.03), 7),
              line_c, 60 + 190 * a["AU6"], 0.015)
        # Cheek apples lifted and highlighted.
        cy = 0.32 - 0.1 * a["AU6"] - 0.04 * a["AU12"]
        d.polygon(P(_ellipse(s * 0.48, cy, 0.17, 0.11, 16)), fill=_rgba(skin * 1.08 + 10, 50 + 110 * a["AU6"]))


def _mouth_geometry(ident: Identity, ex: Expression):
    """Return u samples and the mouth curves (closed line, opening edges, lip contours)."""
    a = ex.aus
    u = np.linspace(-1, 1, 25)
    side = np.where(u < 0, -1.0, 1.0)
    asym = 1.0 + np.clip(ex.asym * side, -0.8, 0.8)  # one side of a disgust sneer is stronger
    mw = ident.mouth_w * (1 + 0.2 * a["AU12"] + 0.4 * a["AU20"] - 0.25 * a["AU23"]
                          - 0.3 * a["AU26"] * (1 - a["AU20"]) - 0.08 * a["AU17"])
    my = ident.mouth_y - 0.04 * a["AU17"]
    cdy = (-0.17 * a["AU12"] + 0.13 * a["AU15"] + 0.05 * a["AU20"] + 0.06 * a["AU16"]
           - 0.05 * a["AU10"] * asym)
    line = my + cdy * np.abs(u) ** 1.7 - 0.025 * a["AU17"] * (1 - u**2)
    opening = 0.4 * a["AU26"] + 0.05 * a["AU25"] + 0.06 * a["AU25"] * a["AU12"]
    env = (1 - u**2) ** 0.55
    up = 0.3 * opening * env + 0.09 * a["AU10"] * asym * (1 - u**2) ** 0.4
    lo = 0.7 * opening * env + 0.08 * a["AU16"] * (1 - u**2) ** 0.6 + 0.05 * a["AU20"] * a["AU25"] * env
    # A laughing mouth: the lower edge hangs in a U under the lifted corners.
    lo = lo + 0.06 * a["AU12"] * a["AU25"] * env
    edge_u, edge_l = line - up, line + lo
    tu = ident.lip_up * (1 - 0.75 * a["AU23"]) * (1 - 0.3 * a["AU12"]) * (1 - 0.3 * a["AU20"])
    tl = ident.lip_lo * (1 - 0.7 * a["AU23"]) * (1 - 0.25 * a["AU20"]) * (1 + 0.3 * a["AU16"])
    bow = 1 - 0.35 * np.exp(-((u / 0.14) ** 2)) + 0.15 * np.exp(-(((np.abs(u) - 0.35) / 0.2) ** 2))
    top = edge_u - tu * np.sqrt(1 - u**2) * bow - 0.004
    bottom = edge_l + tl * np.sqrt(1 - u**2) + 0.004
    return u * mw, line, edge_u, edge_l, top, bottom, mw


def _draw_mouth(d, P, ident: Identity, ex: Expression) -> None:
    a = ex.aus
    x, line, eu, el, top, bottom, mw = _mouth_geometry(ident, ex)
    skin = ident.skin
    dz = 0.08
    pts = lambda ys: np.stack([x, ys], 1)  # noqa: E731
    # Lines around the mouth: marionette lines (AU15), chin boss (AU17).
    for s in (-1, 1):
        _line(d, P, _curve((s * (mw + 0.01), line[-1 if s > 0 else 0] + 0.02), (s * (mw + 0.03), line[-1] + 0.1),
                           (s * (mw + 0.01), line[-1] + 0.2), 5), skin * 0.62, 230 * a["AU15"] + 40 * ident.age, 0.015)
    mid = len(x) // 2
    chin_y = bottom[mid] + 0.06
    _line(d, P, _curve((-0.12, chin_y), (0, chin_y + 0.04 - 0.06 * a["AU17"]), (0.12, chin_y), 7),
          skin * 0.6, 40 + 200 * a["AU17"], 0.016)
    open_ = (el - eu) > 0.012
    if open_.any():
        d.polygon(P(np.concatenate([pts(eu), pts(el)[::-1]]), dz=dz), fill=_rgba(np.array([70, 22, 28])))
        # Upper teeth right under the upper edge; lower teeth when the lower lip is pulled down.
        th_u = np.minimum(eu + 0.07, el)
        inner = np.abs(x) < 0.9 * mw
        if inner.sum() > 2:
            xi = x[inner]
            d.polygon(P(np.concatenate([np.stack([xi, eu[inner]], 1), np.stack([xi, th_u[inner]], 1)[::-1]]), dz=dz),
                      fill=_rgba(np.array([236, 232, 218])))
            low_h = 0.05 * np.clip(a["AU16"] + 0.6 * a["AU20"] + 0.4 * a["AU10"], 0, 1)
            if low_h > 0.008:
                th_l = np.maximum(el - low_h, th_u)
                d.polygon(P(np.concatenate([np.stack([xi, th_l[inner]], 1), np.stack([xi, el[inner]], 1)[::-1]]),
                            dz=dz), fill=_rgba(np.array([220, 214, 200])))
    lip = ident.lip
    d.polygon(P(np.concatenate([pts(top), pts(eu)[::-1]]), dz=dz), fill=_rgba(lip * 0.92))
    d.polygon(P(np.concatenate([pts(el), pts(bottom)[::-1]]), dz=dz), fill=_rgba(lip))
    # The line where the lips meet (always visible, darker when pressed: AU23).
    _line(d, P, pts((eu + el) / 2 if not open_.any() else eu), lip * 0.45, 200 + 55 * a["AU23"], 0.014, dz=dz)
    if open_.any():
        _line(d, P, pts(el), lip * 0.6, 150, 0.01, dz=dz)
    for s, i in ((-1, 0), (1, -1)):  # corner shadows, deeper when the corners are pulled
        c = np.array([[x[i] + s * 0.012, line[i]]])
        d.polygon(P(_ellipse(c[0, 0], c[0, 1], 0.02, 0.014, 8), dz=dz), fill=_rgba(skin * 0.55, 120 + 100 * a["AU12"]))


def _draw_nose(d, P, ident: Identity, ex: Expression, light_side: float) -> None:
    a, skin, ny, nw = ex.aus, ident.skin, ident.nose_y, ident.nose_w
    lift = 0.04 * a["AU9"] + 0.025 * a["AU10"]
    flare = 1 + 0.3 * a["AU9"]
    # Side of the nose in shadow (the side away from the light).
    s = -1.0 if light_side > 0 else 1.0
    d.polygon(P(np.array([[s * 0.05, ident.eye_y + 0.06], [s * 0.1, ny - 0.1], [s * nw * 0.9, ny - 0.02],
                          [s * 0.03, ny - 0.06]]), dz=0.2), fill=_rgba(skin * 0.8, 70))
    d.polygon(P(_ellipse(0, ny - 0.05 - lift, 0.07, 0.06, 12), dz=0.3), fill=_rgba(skin * 1.06 + 8, 90))
    for s in (-1, 1):
        d.polygon(P(_ellipse(s * nw * 0.5, ny + 0.015 - lift, 0.038 * flare, 0.02, 12), dz=0.2),
                  fill=_rgba(skin * 0.35, 230))
        _line(d, P, _curve((s * nw * flare, ny - 0.09 - lift), (s * (nw * flare + 0.04), ny - lift),
                           (s * nw * 0.55, ny + 0.04 - lift), 7), skin * 0.6, 170 + 60 * a["AU9"], 0.016, dz=0.15)
    _line(d, P, _curve((-0.04, ny + 0.035 - lift), (0, ny + 0.05 - lift), (0.04, ny + 0.035 - lift), 5),
          skin * 0.65, 120, 0.012, dz=0.25)
    # Nasolabial folds: deepened by smiling (AU6/12) and by the disgust units (AU9/10).
    depth = 30 + 60 * ident.age + 190 * a["AU12"] + 60 * a["AU6"] + 200 * a["AU10"] + 130 * a["AU9"]
    x_m, line, *_, mw = _mouth_geometry(ident, ex)
    for s, i in ((-1, 0), (1, -1)):
        end = (s * (mw + 0.07), line[i] + 0.08)
        _line(d, P, _curve((s * (nw + 0.07), ny - 0.06 - lift), (s * (mw + 0.13), (ny + line[i]) / 2), end, 9),
              skin * 0.6, min(depth, 245), 0.018)


def _draw_eye(d, P, ident: Identity, ex: Expression, s: int) -> None:
    a = ex.aus
    cx, cy, ew = s * ident.eye_dx, ident.eye_y, ident.eye_w
    hu = ident.eye_up * (1 + 1.0 * a["AU5"] - 0.3 * a["AU6"] - 0.2 * a["AU7"] - 0.15 * a["AU4"] - 0.45 * a["AU43"]
                         - 0.15 * a["AU9"])
    hl = ident.eye_lo * (1 - 0.65 * a["AU6"] - 0.55 * a["AU7"] + 0.1 * a["AU5"] - 0.2 * a["AU9"])
    hu, hl = max(hu, 0.012), max(hl, 0.006)
    u = np.linspace(-1, 1, 17)
    xs = cx + s * u * ew
    tilt = ident.eye_tilt * u * ew * -1  # outer corner (u = 1) up when tilt > 0
    upper = cy + tilt - hu * (1 - u**2) ** 0.75 * (1 + 0.15 * u)
    lower = cy + tilt + hl * (1 - u**2) ** (1.0 - 0.4 * a["AU7"])
    up_pts, lo_pts = np.stack([xs, upper], 1), np.stack([xs, lower], 1)
    white = np.array([238, 234, 226]) * 0.85 + ident.skin * 0.15
    d.polygon(P(np.concatenate([up_pts, lo_pts[::-1]])), fill=_rgba(white))
    r = 0.52 * ew
    ix, iy = cx + ex.gaze[0] * 0.3 * ew, cy + ex.gaze[1] * 0.03
    d.polygon(P(_ellipse(ix, iy, r, r, 20)), fill=_rgba(ident.iris))
    d.polygon(P(_ellipse(ix, iy, 0.45 * r, 0.45 * r, 12)), fill=_rgba(np.array([12, 10, 10])))
    glint = _ellipse(ix + 0.3 * r, iy - 0.3 * r, 0.15 * r, 0.15 * r, 8)
    d.polygon(P(glint), fill=_rgba(np.array([250, 250, 250]), 220))
    # Lid skin hides whatever of the iris lies outside the opening.
    reach = r + 0.06
    lid = ident.skin * 0.97
    d.polygon(P(np.concatenate([up_pts, [[xs[-1] + s * 0.01, iy - reach], [xs[0] - s * 0.01, iy - reach]]])),
              fill=_rgba(lid))
    d.polygon(P(np.concatenate([lo_pts, [[xs[-1] + s * 0.01, iy + reach], [xs[0] - s * 0.01, iy + reach]]])),
              fill=_rgba(ident.skin))
    # Lid crease (hidden when the lid is raised, AU5, or drooping, AU43), lash line, lower lid.
    crease = 0.035 + 0.02 * (1 - a["AU5"])
    _line(d, P, np.stack([xs, upper - crease * (1 - u**2) ** 0.6], 1)[2:-2], ident.skin * 0.7,
          130 * (1 - a["AU5"]) * (1 - a["AU43"]), 0.012)
    _line(d, P, up_pts, np.array([25, 18, 15]), 255, 0.022)
    _line(d, P, lo_pts, ident.skin * 0.55, 150, 0.01)
    # Tense lower lid (AU7): a bulge line under it.
    _line(d, P, np.stack([xs, lower + 0.03], 1)[3:-3], ident.skin * 0.65, 190 * a["AU7"], 0.012)


def _draw_brow(d, P, ident: Identity, ex: Expression, s: int) -> None:
    a = ex.aus
    by = ident.eye_y + ident.brow_y
    inner = np.array([0.1 - 0.06 * a["AU4"], by + 0.01 - 0.16 * a["AU1"] + 0.14 * a["AU4"] + 0.05 * a["AU9"]])
    peak = np.array([ident.eye_dx + 0.03, by - ident.brow_arch * (1 - 0.6 * a["AU4"]) - 0.05 * a["AU1"]
                     - 0.12 * a["AU2"] + 0.05 * a["AU4"] + 0.02 * a["AU9"]])
    outer = np.array([ident.eye_dx + ident.eye_w + 0.11, by + 0.03 - 0.12 * a["AU2"] + 0.01 * a["AU4"]])
    t = np.linspace(0, 1, 12)[:, None]
    # Quadratic through inner (t=0), peak (t=0.55) and outer (t=1): Lagrange form.
    t1 = 0.55
    l0 = (t - t1) * (t - 1) / (t1 * 1.0)
    l1 = t * (t - 1) / (t1 * (t1 - 1))
    l2 = t * (t - t1) / (1 - t1)
    c = l0 * inner + l1 * peak + l2 * outer
    tang = np.gradient(c, axis=0)
    nrm = np.stack([-tang[:, 1], tang[:, 0]], 1)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
    # Lowered brows bunch up and look thicker at the inner end.
    th = ident.brow_thick * (1 + 0.35 * a["AU4"]) * (1.15 - 0.7 * t[:, 0])[:, None] / 2
    band = np.concatenate([c + nrm * th, (c - nrm * th)[::-1]])
    band[:, 0] *= s
    d.polygon(P(band), fill=_rgba(ident.brow_colour))


def _draw_beard(d, P, ident: Identity, ex: Expression, rng: np.random.Generator, moustache_pass: bool) -> None:
    if not ident.beard:
        return
    col = ident.hair * 0.8
    x, line, eu, el, top, bottom, mw = _mouth_geometry(ident, ex)
    if moustache_pass:
        if ident.beard in ("moustache", "full"):
            m = np.stack([x * 1.15, top - 0.01], 1)
            band = np.concatenate([m, (m + np.array([0.0, -0.07]))[::-1]])
            d.polygon(P(band, dz=0.08), fill=_rgba(col, 235))
        return
    outline = _face_outline(ident, ex.aus["AU26"], 72)
    low = outline[outline[:, 1] > 0.45]
    if ident.beard == "full":
        d.polygon(P(low * np.array([1.0, 1.03])), fill=_rgba(col, 230))
    elif ident.beard == "stubble":
        n = 260
        pts = np.stack([rng.uniform(-0.8, 0.8, n), rng.uniform(0.55, 1.3, n)], 1)
        for p in pts:
            d.point(P(p[None]), fill=_rgba(col, 110))


def _draw_glasses(d, P, ident: Identity) -> None:
    if not ident.glasses:
        return
    frame = _rgba(ident.glasses_colour, 255)
    w = P.width(0.022)
    lens_fill = _rgba(np.array([20, 20, 25]), 235) if ident.glasses == "sun" else _rgba(np.array([200, 220, 235]), 30)
    for s in (-1, 1):
        cx, cy = s * ident.eye_dx, ident.eye_y + 0.01
        t = np.linspace(0, 2 * math.pi, 28, endpoint=False)
        c, sn = np.cos(t), np.sin(t)
        rx, ry = ident.eye_w + 0.085, 0.14
        lens = np.stack([cx + rx * np.sign(c) * np.abs(c) ** 0.6, cy + ry * np.sign(sn) * np.abs(sn) ** 0.6], 1)
        q = P(lens, dz=0.12)
        d.polygon(q, fill=lens_fill)
        d.line(q + q[:1], fill=frame, width=w)
        d.line(P(np.array([[s * (ident.eye_dx + rx), cy - 0.05], [s * (ident.face_w + 0.02), cy - 0.02]]), dz=0.05),
               fill=frame, width=w)
    d.line(P(_curve((-ident.eye_dx + ident.eye_w + 0.08, cy - 0.03), (0, cy - 0.08), (ident.eye_dx - ident.eye_w - 0.08,
                                                                                         cy - 0.03), 6), dz=0.3),
           fill=frame, width=w)


def _draw_occluder(d, P, ident: Identity, nz: Nuisance) -> None:
    if not nz.occluder:
        return
    x0, y0, size, ang = nz.occ_params
    if nz.occluder == "hand":
        skin = ident.skin * np.array([1.0, 0.97, 0.95])
        cx, cy = 0.7 * x0, 0.7 + 0.4 * (y0 - 0.6)
        d.polygon(P(_ellipse(cx, cy, 0.55 * size, 0.42 * size, 20, rot=ang * 0.5), dz=0.6, surface=False),
                  fill=_rgba(skin))
        for k in range(4):
            a = -math.pi / 2 + ang * 0.5 + (k - 1.5) * 0.28
            base = np.array([cx + 0.3 * size * math.cos(a), cy + 0.3 * size * math.sin(a)])
            tip = base + 0.55 * size * np.array([math.cos(a), math.sin(a)])
            d.line(P(np.stack([base, tip]), dz=0.6, surface=False), fill=_rgba(skin * 0.97),
                   width=P.width(0.13 * size), joint="curve")
            d.line(P(np.stack([base, tip]), dz=0.6, surface=False), fill=_rgba(skin * 0.7, 90), width=1)
    elif nz.occluder == "object":
        cx, cy = 0.8 * x0, 0.4 + 0.6 * (y0 - 0.6)
        hw, hh = 0.28 * size, 0.5 * size
        c, s = math.cos(ang * 0.6), math.sin(ang * 0.6)
        box = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]]) @ np.array([[c, s], [-s, c]]) + [cx, cy]
        d.polygon(P(box, dz=0.6, surface=False), fill=_rgba(nz.occ_colour))
    elif nz.occluder == "hair":
        cx = 0.6 * x0
        pts = _curve((cx, -1.15), (cx + 0.5 * ang, -0.4), (cx + 0.3 * ang, 0.35), 10)
        d.line(P(pts, dz=0.2), fill=_rgba(ident.hair), width=P.width(0.09 + 0.08 * size), joint="curve")
    elif nz.occluder == "mask":
        ny = ident.nose_y - 0.02
        outline = _face_outline(ident, 0.0, 72)
        low = outline[outline[:, 1] > ny]
        d.polygon(P(low * np.array([0.98, 1.0]), dz=0.05), fill=_rgba(nz.occ_colour * 0.3 + 170))
        for k in range(3):
            y = ny + 0.15 + 0.12 * k
            d.line(P(np.array([[-0.6, y], [0.6, y]]), dz=0.1), fill=_rgba(nz.occ_colour * 0.3 + 120, 120), width=1)


def _degrade(img: Image.Image, nz: Nuisance, rng: np.random.Generator) -> Image.Image:
    size = img.size[0]
    arr = np.asarray(img).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size / 2) - 1.0
    shade = nz.ambient * (1 + nz.light_strength * (xx * math.cos(nz.light_angle) + yy * math.sin(nz.light_angle)))
    arr = arr * np.clip(shade, 0.25, 1.8)[..., None] * np.asarray(nz.colour_gain, dtype=np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if nz.lowres < 1.0:
        small = max(8, int(round(size * nz.lowres)))
        img = img.resize((small, small), Image.BILINEAR).resize((size, size), Image.BICUBIC)
    if nz.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(nz.blur * size / 112))
    if nz.noise > 0:
        arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, nz.noise, (size, size, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if nz.jpeg_quality:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=nz.jpeg_quality)
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    if nz.grey:
        img = img.convert("L").convert("RGB")
    return img


def render_face(ident: Identity, ex: Expression, nz: Nuisance, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one ``size`` x ``size`` RGB image of ``ident`` showing ``ex`` under ``nz``."""
    canvas = size * SUPERSAMPLE
    img = _draw_background(nz, size, rng).resize((canvas, canvas), Image.BILINEAR)
    d = ImageDraw.Draw(img, "RGBA")
    P = _Pose(ident, nz, canvas)
    light_side = math.cos(nz.light_angle)
    _draw_hair_back(d, P, ident)
    _draw_body(d, P, ident)
    d.polygon(P(_face_outline(ident, ex.aus["AU26"]), dz=-0.35, surface=False), fill=_rgba(ident.skin))
    _draw_beard(d, P, ident, ex, rng, moustache_pass=False)
    _draw_wrinkles(d, P, ident, ex)
    _draw_nose(d, P, ident, ex, light_side)
    _draw_mouth(d, P, ident, ex)
    _draw_beard(d, P, ident, ex, rng, moustache_pass=True)
    for s in (-1, 1):
        _draw_eye(d, P, ident, ex, s)
        _draw_brow(d, P, ident, ex, s)
    _draw_hair_front(d, P, ident, rng)
    _draw_glasses(d, P, ident)
    _draw_occluder(d, P, ident, nz)
    img = img.resize((size, size), Image.BOX)
    return _degrade(img, nz, rng)
