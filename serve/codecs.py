"""Per task: a request -> model input rows, model output rows -> an answer.

Decoding uses the data loaders' own transforms (the functions training decodes its shards
with), so a served image or listening session reaches the model exactly as in training.
Everything a caller can get wrong raises BadInput, which the ingress answers with 422.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data_loaders.errors import DataError
from jobs import tasks
from jobs.tasks import Serving
from serve import schemas

DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, DataError)


class BadInput(ValueError):
    """A request the model cannot answer because of what was sent (HTTP 422)."""


def _bytes(b64: str, what: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{what} is not valid base64") from None


def _why(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # PIL names its buffer object, not the problem
        return "not an image PIL can read (PNG or JPEG)"
    return str(e).splitlines()[0][:200]


def image_size(
    data: bytes, what: str, max_pixels: float = float("inf"), max_aspect: float = float("inf")
) -> tuple[int, int]:
    """An image's (width, height) from its header alone, nothing decoded, within the endpoint's
    limits: a few hundred bytes of PNG may declare gigapixels, and decoding them is the attack."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except DECODE_ERRORS as e:
        raise BadInput(f"{what} does not decode: {_why(e)}") from None
    if w * h > max_pixels:
        raise BadInput(f"{what} is {w}x{h} pixels: over the limit of {max_pixels / 1e6:g} megapixels")
    if max(w, h) > max_aspect * max(1, min(w, h)):
        raise BadInput(f"{what} is {w}x{h} pixels: more elongated than the limit of {max_aspect:g}:1")
    return w, h


def _png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def tree_map(fn, x):
    """fn applied to every tensor of a model output (a tensor, or a dict/tuple of them)."""
    if isinstance(x, dict):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(tree_map(fn, v) for v in x)
    return fn(x)


class Codec:
    """Base: `decode(request) -> rows` (numpy arrays, one leading row dimension), `encode(output,
    rows) -> answer`, `example() -> request` (what the health check predicts)."""

    def __init__(self, card: dict, model_dir: Path):
        self.card, self.spec = card, card["input"]

    def decode(self, request: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode(self, output, rows: dict[str, np.ndarray], request: dict) -> dict:
        raise NotImplementedError

    def example(self) -> dict:
        raise NotImplementedError


class Retinopathy(Codec):
    # fundus cameras take 1-24 megapixels at about 1.5:1; padding to a square then needs
    # side^2 pixels, so the bound is on the longer side as well
    MAX_PIXELS, MAX_ASPECT = 40e6, 3.0

    def decode(self, request: dict) -> dict[str, np.ndarray]:
        from data_loaders.retinopathy import preprocess_image

        data = _bytes(request["image"], "image")
        image_size(data, "image", self.MAX_PIXELS, self.MAX_ASPECT)
        try:
            x = preprocess_image(data, self.spec["image_size"])
        except DECODE_ERRORS as e:
            raise BadInput(f"image does not decode: {_why(e)}") from None
        return {"image": x[None]}

    def encode(self, output, rows, request) -> dict:
        from data_loaders.retinopathy import GRADE_NAMES
        from jobs.tasks.retinopathy import REFERABLE

        p = torch.softmax(output[0].float(), -1)
        grade = int(p.argmax())
        referable = float(p[REFERABLE:].sum())
        return {
            "grade": grade,
            "grade_name": GRADE_NAMES[grade],
            "probabilities": [float(v) for v in p],
            "referable": referable >= 0.5,
            "referable_probability": referable,
        }

    def example(self) -> dict:
        size = self.spec["image_size"]
        rgb = np.zeros((size, size, 3), dtype=np.uint8)
        rgb[size // 8 : -size // 8, size // 8 : -size // 8] = (150, 70, 30)  # a reddish disc on black
        return {"image": _png(rgb)}


class Autonomous(Codec):
    DEPTH_STRIDE = 8  # the answer carries depth every 8 pixels: enough to steer by, 64x smaller

    def decode(self, request: dict) -> dict[str, np.ndarray]:
        from data_loaders.autonomous import preprocess_images

        h, w = self.spec["image_size"]
        datas = [_bytes(b64, f"camera {k} image") for k, b64 in enumerate(request["images"])]
        for k, data in enumerate(datas):  # every header before any pixel is decoded
            got = image_size(data, f"camera {k} image")
            if got != (w, h):
                raise BadInput(f"camera {k} image is {got[0]}x{got[1]} pixels: the model takes {w}x{h}")
        rgbs = []
        for k, data in enumerate(datas):
            try:
                rgbs.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except DECODE_ERRORS as e:
                raise BadInput(f"camera {k} image does not decode: {_why(e)}") from None
        try:
            return {"images": preprocess_images(rgbs, self.spec["image_size"])[None]}
        except DataError as e:
            raise BadInput(str(e)) from None

    def encode(self, output, rows, request) -> dict:
        from torchvision.ops import box_convert

        from data_loaders.autonomous import CLASSES

        h, w = self.spec["image_size"]
        threshold = request.get("score_threshold", 0.5)
        scores, labels = output["logits"][0].float().softmax(-1)[..., :-1].max(-1)  # [C, Q]
        boxes = box_convert(output["boxes"][0].float(), "cxcywh", "xyxy") * torch.tensor([w, h, w, h])
        lanes = output["lanes"][0].float() * torch.tensor([w, h])  # [C, L, P, 2]
        lane_p = torch.sigmoid(output["lane_logits"][0].float())  # [C, L]
        cameras = []
        for c in range(scores.shape[0]):
            keep = (scores[c] >= threshold).nonzero().flatten().tolist()
            cameras.append(
                {
                    "camera": c,
                    "objects": [
                        {
                            "label": CLASSES[int(labels[c, q])],
                            "score": float(scores[c, q]),
                            "box": [round(float(v), 2) for v in boxes[c, q]],
                        }
                        for q in sorted(keep, key=lambda q: -float(scores[c, q]))
                    ],
                    "lanes": [
                        {
                            "slot": slot,
                            "probability": float(lane_p[c, slot]),
                            "points": [[round(float(u), 2), round(float(v), 2)] for u, v in lanes[c, slot]],
                        }
                        for slot in range(lanes.shape[1])
                        if lane_p[c, slot] >= 0.5
                    ],
                }
            )
        s = self.DEPTH_STRIDE
        depth = torch.nn.functional.avg_pool2d(output["depth"][0].float()[:, None], s, s)[:, 0]
        return {"cameras": cameras, "depth": {"stride": s, "metres": depth.round(decimals=2).tolist()}}

    def example(self) -> dict:
        h, w = self.spec["image_size"]
        rgb = np.full((h, w, 3), 120, dtype=np.uint8)
        rgb[h // 2 :] = 70  # road below the horizon
        return {"images": [_png(rgb)] * self.spec["num_cameras"]}


class Recsys(Codec):
    def __init__(self, card: dict, model_dir: Path):
        from data_loaders.recsys import load_catalogue

        super().__init__(card, model_dir)
        self.catalogue = load_catalogue(str(model_dir))  # exported beside the weights

    def decode(self, request: dict) -> dict[str, np.ndarray]:
        from data_loaders.recsys import encode_query

        try:
            return encode_query(
                self.catalogue,
                request["history"],
                request["context"],
                request["candidates"],
                self.spec["history_len"],
            )
        except DataError as e:
            raise BadInput(str(e)) from None

    def encode(self, output, rows, request) -> dict:
        p = torch.sigmoid(output.float()).numpy()
        order = np.argsort(-p, kind="stable")
        return {
            "ranked": [
                {
                    "track_id": request["candidates"][i],
                    "rank": r + 1,
                    "play_probability": float(p[i]),
                    "cold": bool(rows["is_cold"][i]),
                }
                for r, i in enumerate(order)
            ]
        }

    def example(self) -> dict:
        ids = [str(t) for t in self.catalogue.track_id[1:4]]
        return {"history": [{"track_id": ids[0]}], "context": {}, "candidates": ids}


RETINOPATHY = Serving(schemas.RetinopathyRequest, schemas.RetinopathyResponse, Retinopathy)
AUTONOMOUS = Serving(schemas.AutonomousRequest, schemas.AutonomousResponse, Autonomous)
RECSYS = Serving(schemas.RecsysRequest, schemas.RecsysResponse, Recsys)


def get(task: str, card: dict, model_dir: Path) -> Codec:
    """The codec of a registered task (its TaskSpec's Serving) for one exported model."""
    return tasks.spec(task).api.codec(card, model_dir)
