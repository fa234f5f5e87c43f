"""Face detection (YuNet, OpenCV model zoo) and the five-landmark alignment SFace was trained with.

    detector = face_detector()                 # shared, thread-safe, built once per process
    faces = detector.detect(rgb)               # [Detection(box, landmarks, score)], best first
    face = detector.best(rgb)                  # the best one, its landmarks refined (or None)
    crop = align(rgb, face.landmarks)          # (112, 112, 3) uint8, the SFace input

- The detector is the shipped int8 block-quantised graph (`assets.get("yunet")`); OpenCV 5
  reads it as it is (its graph engine folds the constant DequantizeLinear nodes: the same
  detections to the last bit as a float-dequantised copy, and as fast), so no conversion.
- Images are RGB uint8, (H, W, 3); grey (H, W) or (H, W, 1) and RGBA are accepted too.
  Detection runs on a rescaled copy: images with a long side above `max_side` are shrunk
  (YuNet misses very large faces: ORL faces, about 70 px wide, enlarged 7x are all found,
  10x in 45 % of the images, 14x in 8 %; and time grows with the pixel count), images with
  a short side below `min_side` are enlarged (YuNet finds few faces under ~30 px: a 23 x 28
  ORL face is found in 37 % of the images as it is and in all of them enlarged). Boxes and
  landmarks are mapped back to the input's pixels. The price of the shrinking: a face
  under about 20 px wide in the shrunk copy (1/32 of a photo's long side) is often missed.
- YuNet's landmarks move with the face's size in its input (on ORL by 6-12 % of the eye
  distance between scales, worst for faces 100-150 px wide), so `best` detects the chosen
  face again in a crop around it rescaled to a face width of 224 px (`refine`). That makes
  them steady across scales (3 % of the eye distance) and raises SFace's same-person
  similarity on ORL from 0.85 to 0.87 on average; it costs a second, small detection.
- Alignment: the least-squares similarity transform from the five landmarks (right eye,
  left eye, nose tip, right and left mouth corner, as YuNet orders them) to the standard
  ArcFace template, then `cv2.warpAffine`: the crop `cv2.FaceRecognizerSF.alignCrop` makes
  (equal to within rounding at 112; alignCrop is tied to a loaded SFace model and to 112 px).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import numpy as np

from fl_sim import assets

# The five-point template of 112 x 112 ArcFace / SFace crops (what FaceRecognizerSF.alignCrop uses).
SFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                           [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
TEMPLATE_SIZE = 112

# YuNet scores: ORL faces 0.88-0.94, DCGAN faces mostly above 0.9 (0.99 of them above 0.6),
# random noise and smooth random blobs never above 0.36 (measured, see the tests).
SCORE_THRESHOLD = 0.6
NMS_THRESHOLD = 0.3
REFINE_SIDE = 224

# How photos become face crops: `none` takes them as they are (already crops), `yunet` aligns each
# onto SFace's template, as a deployed recognition service enrols faces.
Alignment = Literal["none", "yunet"]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
REFINE_MARGIN = 0.5

_LOG_LEVEL_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class Detection:
    """One face, in the input image's pixel coordinates."""

    box: tuple[float, float, float, float]  # x, y, width, height
    landmarks: np.ndarray  # (5, 2) float32 x, y: right eye, left eye, nose tip, right, left mouth corner
    score: float

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    def contains(self, x: float, y: float) -> bool:
        bx, by, bw, bh = self.box
        return bx <= x <= bx + bw and by <= y <= by + bh


def as_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 from RGB, grey (H, W) / (H, W, 1) or RGBA (H, W, 4) uint8."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"face images are uint8, got {img.dtype}")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"a face image is (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {img.shape}")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return img[:, :, :3]


class FaceDetector:
    """YuNet over RGB uint8 images. One instance may be shared by threads: the OpenCV
    detector (which keeps its input size and buffers) is used under a lock."""

    def __init__(self, score_threshold: float = SCORE_THRESHOLD, nms_threshold: float = NMS_THRESHOLD,
                 top_k: int = 5000, max_side: int = 640, min_side: int = 128,
                 refine_side: int = REFINE_SIDE) -> None:
        import cv2

        self.score_threshold = float(score_threshold)
        self.max_side = int(max_side)
        self.min_side = int(min_side)
        self.refine_side = int(refine_side)
        path = str(assets.get("yunet"))
        # OpenCV 5's graph engine warns once per net that it ignores target selection; quieten it
        # (the log level is process-wide: constructions are serialised so it is always restored).
        with _LOG_LEVEL_LOCK:
            level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
            try:
                self._detector = cv2.FaceDetectorYN.create(path, "", (320, 320), self.score_threshold,
                                                           float(nms_threshold), int(top_k))
            finally:
                cv2.utils.logging.setLogLevel(level)
        self._lock = threading.Lock()

    def detection_size(self, height: int, width: int) -> tuple[int, int]:
        """(width, height) the detector sees for an input of this size."""
        long, short = max(height, width), min(height, width)
        scale = 1.0
        if long > self.max_side:
            scale = self.max_side / long
        elif short < self.min_side:
            scale = min(self.min_side / short, self.max_side / long)
        return max(1, round(width * scale)), max(1, round(height * scale))

    def detect(self, image: np.ndarray) -> list[Detection]:
        """The faces in an image, best score first (empty when there is none)."""
        import cv2

        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        if min(h, w) < 2:
            return []
        dw, dh = self.detection_size(h, w)
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        if (dw, dh) != (w, h):
            shrink = dw * dh < w * h
            bgr = cv2.resize(bgr, (dw, dh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        with self._lock:
            self._detector.setInputSize((dw, dh))
            _, faces = self._detector.detect(bgr)
        if faces is None or len(faces) == 0:
            return []
        out = [_detection(row, w / dw, h / dh) for row in np.asarray(faces, dtype=np.float32)]
        out.sort(key=lambda d: d.score, reverse=True)
        return out

    def best(self, image: np.ndarray, refine: bool = True) -> Detection | None:
        """The highest-scoring face (its landmarks refined, see `refine`), or None."""
        faces = self.detect(image)
        if not faces:
            return None
        return self.refine(image, faces[0]) if refine else faces[0]

    def refine(self, image: np.ndarray, face: Detection) -> Detection:
        """The face detected again in a crop around it rescaled so the face is `refine_side`
        pixels wide, where YuNet's landmarks are steadiest; the given detection when that
        finds no matching face."""
        import cv2

        rgb = as_rgb(image)
        h, w = rgb.shape[:2]
        x, y, bw, bh = face.box
        side = max(bw, bh)
        if side <= 1:
            return face
        cx, cy = face.centre
        half = side * (0.5 + REFINE_MARGIN)
        x0, y0 = max(0, int(np.floor(cx - half))), max(0, int(np.floor(cy - half)))
        x1, y1 = min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half)))
        if x1 - x0 < 2 or y1 - y0 < 2:
            return face
        crop = rgb[y0:y1, x0:x1]
        scale = self.refine_side / side
        cw, ch = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
        view = cv2.resize(np.ascontiguousarray(crop[:, :, ::-1]), (cw, ch),
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        with self._lock:
            self._detector.setInputSize((cw, ch))
            _, found = self._detector.detect(view)
        if found is None or len(found) == 0:
            return face
        sx, sy = (x1 - x0) / cw, (y1 - y0) / ch
        candidates = [_detection(row, sx, sy, x0, y0) for row in np.asarray(found, dtype=np.float32)]
        match = max(candidates, key=lambda d: _iou(d.box, face.box))
        return match if _iou(match.box, face.box) >= 0.5 else face


def _detection(row: np.ndarray, sx: float, sy: float, x0: float = 0.0, y0: float = 0.0) -> Detection:
    """A YuNet output row (15,) seen at scale (1/sx, 1/sy) with its origin at (x0, y0) -> input pixels."""
    landmarks = row[4:14].reshape(5, 2) * np.array([sx, sy], dtype=np.float32) + np.array([x0, y0], dtype=np.float32)
    landmarks.flags.writeable = False
    box = (float(row[0] * sx + x0), float(row[1] * sy + y0), float(row[2] * sx), float(row[3] * sy))
    return Detection(box, landmarks, float(row[14]))


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def similarity_transform(landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2 x 3 least-squares similarity transform taking the five landmarks onto the
    template (scaled to size x size)."""
    import cv2

    src = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    dst = SFACE_TEMPLATE * (size / TEMPLATE_SIZE)
    # RANSAC with an unbounded threshold keeps every point an inlier; the Levenberg-Marquardt
    # refinement then gives the least-squares fit over all five, the transform alignCrop
    # computes (LMEDS would drop up to two landmarks and differ from it on some faces).
    matrix, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1e9)
    if matrix is None or not np.all(np.isfinite(matrix)):
        raise ValueError("degenerate landmarks: no similarity transform onto the template")
    return matrix


def align(image: np.ndarray, landmarks: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The (size, size, 3) uint8 face crop SFace reads: the image warped so its five landmarks
    land on the template; outside the image is black, as in alignCrop."""
    import cv2

    rgb = as_rgb(image)
    points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
    matrix = similarity_transform(points, size)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:  # a large face: shrink it to about the crop's scale with area averaging first,
        f = scale  # so the bilinear warp does not alias
        h, w = rgb.shape[:2]
        nw, nh = max(1, round(w * f)), max(1, round(h * f))
        rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        points = points * np.array([nw / w, nh / h], dtype=np.float32)
        matrix = similarity_transform(points, size)
    return cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def align_face(image: np.ndarray, size: int = TEMPLATE_SIZE, min_score: float = SCORE_THRESHOLD) -> np.ndarray | None:
    """The best face of an RGB image aligned onto the template, (size, size, 3) uint8; None when
    YuNet finds no face scoring at least min_score."""
    face = face_detector(min_score).best(image)
    return None if face is None else align(image, face.landmarks, size)


def align_images(images, alignment: Alignment, size: int = TEMPLATE_SIZE, drop_missing: bool = False):
    """(N, 3, H, W) float images in [0, 1] -> ((M, 3, size, size) crops, the kept indices).
    `none` returns them as they are; `yunet` aligns each (`align_face`). A photo in which YuNet
    finds no face raises (naming it) unless `drop_missing`, which leaves it out: a gallery must
    not silently lose a photo, a pile of public faces may."""
    import torch

    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    if alignment == "none":
        return images, list(range(len(images)))
    crops, kept = [], []
    for n, image in enumerate(images):
        rgb = np.ascontiguousarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        crop = align_face(rgb, size)
        if crop is None:
            if drop_missing:
                continue
            raise ValueError(f"no face found in image {n} (YuNet score below {SCORE_THRESHOLD})")
        crops.append(torch.from_numpy(crop).permute(2, 0, 1).float() / 255)
        kept.append(n)
    empty = torch.empty(0, 3, size, size)
    return (torch.stack(crops) if crops else empty), kept


@lru_cache(maxsize=4)
def face_detector(score_threshold: float = SCORE_THRESHOLD) -> FaceDetector:
    """The shared detector of a process (one per score threshold), built on first use."""
    return FaceDetector(score_threshold=score_threshold)


def face_score(image: np.ndarray, min_score: float = SCORE_THRESHOLD) -> float:
    """The best YuNet face score of an RGB image (H, W, 3) uint8; 0.0 when no face reaches min_score."""
    faces = face_detector(min_score).detect(image)
    return faces[0].score if faces else 0.0


def has_face(image: np.ndarray, min_score: float = SCORE_THRESHOLD) -> bool:
    """The face gate's test: does the image show a face (a YuNet detection scoring at least min_score)?"""
    return face_score(image, min_score) >= min_score


__all__ = ["ALIGNMENTS", "Alignment", "Detection", "FaceDetector", "SFACE_TEMPLATE", "SCORE_THRESHOLD", "align",
           "align_face", "align_images", "as_rgb", "face_detector", "similarity_transform"]
