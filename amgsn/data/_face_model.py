"""Parameters of a synthetic face: identity, FACS action units, and the per-image nuisance factors.

This module only *samples numbers* (no drawing; see ``_face_render``). Every function takes a
``numpy.random.Generator`` so the caller controls determinism (docs/method.md §6: same seed, same bytes).

Expressions follow Ekman & Friesen's prototypes (docs/method.md §6 table). Each action unit (AU) is a
continuous activation in [0, 1]; a sample's activations are its class prototype scaled by one
intensity (subtle → full), jittered per AU, with optional units sometimes missing, small random
activations everywhere, the identity's resting face added, and sometimes a partial blend of the
class's confusable partner — these are what make the set hard in the ways real FER is hard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .classes import RAFDB_CLASSES  # the generated set uses RAF-DB's order (docs/method.md §5, §6)

# The action units the renderer understands. AU43 stands for the lowered upper lids of sadness.
AUS = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU7", "AU9", "AU10", "AU12", "AU15", "AU16", "AU17",
       "AU20", "AU23", "AU25", "AU26", "AU43")

# Class prototypes: AU -> (weight, keep probability). Keep probability < 1 marks units that real
# people often leave out of the expression (partial prototypes are common in the wild).
PROTOTYPES: dict[str, dict[str, tuple[float, float]]] = {
    "Happiness": {"AU6": (0.9, 0.8), "AU12": (1.0, 1.0), "AU25": (0.7, 0.55)},
    "Sadness": {"AU1": (0.9, 0.9), "AU4": (0.6, 0.8), "AU15": (0.9, 0.9), "AU17": (0.6, 0.5),
                "AU43": (0.7, 0.6)},
    "Surprise": {"AU1": (1.0, 1.0), "AU2": (1.0, 0.95), "AU5": (0.9, 0.85), "AU26": (1.0, 0.85),
                 "AU25": (0.6, 0.6)},
    "Fear": {"AU1": (0.9, 1.0), "AU2": (0.7, 0.8), "AU4": (0.7, 0.85), "AU5": (0.9, 0.85),
             "AU7": (0.5, 0.6), "AU20": (1.0, 0.8), "AU25": (0.7, 0.8), "AU26": (0.55, 0.7)},
    "Anger": {"AU4": (1.0, 1.0), "AU5": (0.6, 0.7), "AU7": (0.8, 0.8), "AU23": (1.0, 0.8),
              "AU17": (0.4, 0.4)},
    "Disgust": {"AU9": (1.0, 0.9), "AU10": (0.9, 0.8), "AU15": (0.6, 0.6), "AU16": (0.6, 0.5),
                "AU4": (0.45, 0.6), "AU7": (0.3, 0.4)},
    "Neutral": {},
}

# Confusable partner per class (docs/method.md §6): a sample sometimes carries part of the partner's AUs.
PARTNER = {"Surprise": "Fear", "Fear": "Surprise", "Disgust": "Anger", "Anger": "Disgust",
           "Sadness": "Neutral", "Neutral": "Sadness", "Happiness": "Neutral"}

SKIN_TONES = np.array(  # light → dark, RGB
    [[255, 226, 204], [241, 200, 170], [224, 172, 136], [198, 140, 104], [160, 104, 72],
     [120, 76, 52], [86, 56, 40]], dtype=np.float64)
HAIR_COLOURS = np.array(
    [[28, 24, 22], [60, 40, 28], [100, 68, 42], [150, 110, 70], [205, 175, 115], [150, 72, 38],
     [165, 162, 158], [230, 228, 220]], dtype=np.float64)
IRIS_COLOURS = np.array(
    [[70, 45, 30], [40, 28, 20], [95, 70, 40], [70, 110, 150], [80, 120, 90], [110, 110, 115]],
    dtype=np.float64)


@dataclass
class Identity:
    """Person-level parameters (fixed across all images of one identity).

    Lengths are in face units (1 = half the face width before scaling), colours RGB floats.
    """

    name: str
    face_w: float  # half width of the face
    face_h_top: float  # forehead height above the eye line
    face_h_bot: float  # chin depth below the eye line
    jaw_exp: float  # superellipse exponent of the lower face (higher = squarer jaw)
    skin: np.ndarray
    hair: np.ndarray
    brow_colour: np.ndarray
    iris: np.ndarray
    lip: np.ndarray
    hair_style: str  # "bald", "short", "bangs", "long", "bun"
    hair_len: float
    eye_dx: float  # half distance between eye centres
    eye_y: float
    eye_w: float  # half width of an eye
    eye_up: float  # upper lid opening at rest
    eye_lo: float  # lower lid opening at rest
    eye_tilt: float  # radians, outer corner up > 0
    brow_y: float
    brow_thick: float
    brow_arch: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    lip_up: float
    lip_lo: float
    age: float  # 0..1, baseline depth of static lines (confusable with expression wrinkles)
    glasses: str  # "", "clear", "sun"
    glasses_colour: np.ndarray
    beard: str  # "", "stubble", "moustache", "full"
    clothes: np.ndarray
    resting: dict[str, float] = field(default_factory=dict)  # resting-face AU offsets


@dataclass
class Expression:
    """One image's expression: class name, intensity in [0, 1] and the AU activations."""

    label: str
    intensity: float
    aus: dict[str, float]
    asym: float  # signed asymmetry (-1 left-heavy .. 1 right-heavy), mostly used by disgust
    gaze: tuple[float, float]


@dataclass
class Nuisance:
    """Per-image capture conditions (pose, framing, light, background, occluders, degradations)."""

    yaw: float  # radians
    pitch: float
    roll: float
    scale: float
    shift: tuple[float, float]  # fraction of the image size
    light_angle: float
    light_strength: float
    ambient: float
    colour_gain: tuple[float, float, float]
    background: str  # "gradient", "blobs", "stripes", "noise"
    bg_colours: np.ndarray  # (3, 3) RGB
    occluder: str  # "", "hand", "object", "hair", "mask"
    occ_params: tuple[float, ...]
    occ_colour: np.ndarray
    blur: float  # Gaussian radius in output pixels
    lowres: float  # 1 = none, else the downscale factor applied then undone
    noise: float  # std of additive Gaussian noise (0..255 scale)
    jpeg_quality: int  # 0 = no intermediate re-encode
    grey: bool


def _lerp_palette(palette: np.ndarray, t: float) -> np.ndarray:
    t = min(max(t, 0.0), 1.0) * (len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    f = t - i
    return palette[i] * (1 - f) + palette[i + 1] * f


def sample_identity(rng: np.random.Generator, name: str) -> Identity:
    """Draw one person's face shape, colours, hair, accessories and resting face."""
    u = rng.uniform
    skin = _lerp_palette(SKIN_TONES, rng.beta(1.3, 1.5)) * rng.normal(1.0, 0.03, 3)
    hair_i = int(rng.choice(len(HAIR_COLOURS), p=[0.3, 0.22, 0.16, 0.08, 0.09, 0.05, 0.06, 0.04]))
    hair = HAIR_COLOURS[hair_i] * rng.normal(1.0, 0.08) * rng.normal(1.0, 0.02, 3)
    brow = hair * 0.75 if rng.random() < 0.8 else HAIR_COLOURS[int(rng.integers(0, 3))].copy()
    # Lips: the skin pulled towards red and slightly darker; sometimes lipstick.
    lip = skin * np.array([0.86, 0.6, 0.6]) + np.array([20.0, 0.0, 0.0])
    if rng.random() < 0.15:
        lip = np.array([u(150, 200), u(30, 70), u(50, 90)])
    style = str(rng.choice(["bald", "short", "bangs", "long", "bun"], p=[0.07, 0.38, 0.18, 0.27, 0.10]))
    beard = ""
    if rng.random() < 0.22:
        beard = str(rng.choice(["stubble", "moustache", "full"], p=[0.4, 0.3, 0.3]))
    glasses = ""
    if rng.random() < 0.18:
        glasses = "sun" if rng.random() < 0.15 else "clear"
    resting = {
        "AU15": max(0.0, rng.normal(0.0, 0.12)),  # naturally down-turned mouth corners
        "AU12": max(0.0, rng.normal(0.0, 0.08)),
        "AU4": max(0.0, rng.normal(0.0, 0.10)),
        "AU1": max(0.0, rng.normal(0.0, 0.07)),
        "AU43": max(0.0, rng.normal(0.0, 0.12)),
    }
    return Identity(
        name=name,
        face_w=u(0.9, 1.02), face_h_top=u(0.95, 1.12), face_h_bot=u(1.12, 1.32), jaw_exp=u(1.9, 2.9),
        skin=np.clip(skin, 0, 255), hair=np.clip(hair, 0, 255), brow_colour=np.clip(brow, 0, 255),
        iris=IRIS_COLOURS[int(rng.integers(0, len(IRIS_COLOURS)))] * rng.normal(1.0, 0.08, 3),
        lip=np.clip(lip, 0, 255), hair_style=style, hair_len=u(0.0, 1.0),
        eye_dx=u(0.34, 0.43), eye_y=u(-0.05, 0.03), eye_w=u(0.145, 0.185),
        eye_up=u(0.075, 0.1), eye_lo=u(0.045, 0.062), eye_tilt=rng.normal(0.0, 0.06),
        brow_y=u(-0.3, -0.24), brow_thick=u(0.035, 0.06), brow_arch=u(0.02, 0.06),
        nose_y=u(0.38, 0.46), nose_w=u(0.1, 0.15),
        mouth_y=u(0.72, 0.8), mouth_w=u(0.25, 0.31), lip_up=u(0.035, 0.06), lip_lo=u(0.045, 0.075),
        age=float(rng.beta(1.2, 3.0)), glasses=glasses,
        glasses_colour=np.array([u(10, 120), u(10, 90), u(10, 90)]), beard=beard,
        clothes=np.array([u(20, 230), u(20, 230), u(20, 230)]), resting=resting,
    )


def sample_expression(rng: np.random.Generator, label: str, identity: Identity) -> Expression:
    """Draw the AU activations for one image of class ``label`` (a name from RAFDB_CLASSES)."""
    if label not in PROTOTYPES:
        raise ValueError(f"label must be one of {RAFDB_CLASSES}, got {label!r}")
    aus = dict.fromkeys(AUS, 0.0)
    intensity = 0.0
    if label != "Neutral":
        # Subtle → full: a broad distribution with real mass near the low end, where the
        # expression is hard to tell from neutral (as in-the-wild data).
        intensity = float(0.1 + 0.9 * rng.beta(1.3, 1.1))
        for au, (w, keep) in PROTOTYPES[label].items():
            if rng.random() < keep:
                aus[au] = w * intensity * float(np.exp(rng.normal(0.0, 0.25)))
        # Partial blend with the confusable partner (fear in surprise, disgust in anger, ...).
        partner = PARTNER[label]
        if rng.random() < 0.3 and PROTOTYPES[partner]:
            mix = rng.uniform(0.15, 0.55) * intensity
            for au, (w, _) in PROTOTYPES[partner].items():
                aus[au] = max(aus[au], w * mix)
    # Anger sometimes as an open-mouthed snarl (teeth shown), which resembles disgust.
    if label == "Anger" and rng.random() < 0.25:
        aus["AU10"] = max(aus["AU10"], 0.6 * intensity)
        aus["AU25"] = max(aus["AU25"], 0.8 * intensity)
        aus["AU26"] = max(aus["AU26"], 0.35 * intensity)
        aus["AU23"] *= 0.3
    # Everyone's face moves a little: small random activations and the resting face.
    for au in AUS:
        aus[au] += abs(rng.normal(0.0, 0.04)) + identity.resting.get(au, 0.0)
        aus[au] = float(min(max(aus[au], 0.0), 1.0))
    asym = 0.0
    if label == "Disgust":
        asym = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.9))
    else:
        asym = float(rng.normal(0.0, 0.12))
    gaze = (float(rng.normal(0.0, 0.35)), float(rng.normal(0.0, 0.25)))
    if label == "Sadness":
        gaze = (gaze[0], gaze[1] + 0.4 * intensity)  # looking down
    return Expression(label=label, intensity=intensity, aus=aus, asym=asym, gaze=gaze)


def sample_nuisance(rng: np.random.Generator) -> Nuisance:
    """Draw one image's capture conditions."""
    u = rng.uniform
    deg = math.pi / 180.0
    occluder = ""
    occ_params: tuple[float, ...] = ()
    if rng.random() < 0.12:
        occluder = str(rng.choice(["hand", "object", "hair", "mask"], p=[0.4, 0.3, 0.2, 0.1]))
        # Centre (face units), size, angle. Hands and objects mostly cover the lower face or a
        # side, like a hand on the chin or a phone in front of the mouth.
        occ_params = (u(-0.9, 0.9), u(0.1, 1.2), u(0.35, 0.75), u(-1.0, 1.0))
    temp = rng.normal(0.0, 0.06)
    bg = str(rng.choice(["gradient", "blobs", "stripes", "noise"], p=[0.4, 0.3, 0.1, 0.2]))
    return Nuisance(
        yaw=float(np.clip(rng.normal(0.0, 9.0), -30, 30) * deg),
        pitch=float(np.clip(rng.normal(0.0, 6.0), -16, 16) * deg),
        roll=float(np.clip(rng.normal(0.0, 6.0), -20, 20) * deg),
        scale=u(0.86, 1.1),
        shift=(float(rng.normal(0.0, 0.03)), float(rng.normal(0.0, 0.03))),
        light_angle=u(0.0, 2 * math.pi),
        light_strength=u(0.0, 0.45),
        ambient=u(0.72, 1.12),
        # White balance: mostly along the warm/cool axis, little green/magenta drift.
        colour_gain=tuple(float(g) for g in (1.0 + temp * np.array([1.0, 0.1, -1.0]) + rng.normal(0, 0.015, 3))),
        background=bg,
        # Real backgrounds are mostly muted: half a random colour, half a grey level.
        bg_colours=0.5 * rng.uniform(0, 255, (3, 3)) + 0.5 * rng.uniform(40, 220, (3, 1)),
        occluder=occluder,
        occ_params=occ_params,
        occ_colour=rng.uniform(0, 255, 3),
        blur=u(0.3, 1.1) if rng.random() < 0.3 else 0.0,
        lowres=u(0.4, 0.75) if rng.random() < 0.2 else 1.0,
        noise=u(1.0, 7.0) if rng.random() < 0.5 else 0.0,
        jpeg_quality=int(rng.integers(25, 90)) if rng.random() < 0.6 else 0,
        grey=bool(rng.random() < 0.1),
    )
