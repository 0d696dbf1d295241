//! YuNet (OpenCV Zoo, 2023mar) face detection: letterbox, decode the three strides, NMS, map back.
//!
//! The file declares a fixed [1, 3, 640, 640] input, but the network is fully convolutional: the
//! pipeline frees its height and width at load ([`heimdex_models::shapes`]) and runs each frame at its
//! own letterboxed size, long side 640 and both sides a multiple of 32 (a 16:9 frame: 640×384, 40 %
//! less work than the square). A model left fixed gets the square. Input shapes differ between
//! frames, so the owner thread runs a batch as a loop of single runs into one reused input buffer;
//! batching still pays because requests from every task share the thread's queue.
//!
//! The decoder follows `yunet_count` in `shared/models/verify.py`: score = sqrt(cls·obj) (both
//! clamped to 0–1), centre ((col + dx)·s, (row + dy)·s), size (exp(dw)·s, exp(dh)·s), landmarks
//! ((col + lx)·s, (row + ly)·s), greedy NMS by descending score.

use std::sync::Arc;

use ort::session::Session;
use ort::value::TensorRef;

use super::preprocess::{Letterbox, letterbox_bgr};
use crate::engine::{BatchRunner, InferenceError};
use crate::media::frames::Frame;

/// The long side of the model's input, to which frames are scaled.
pub const INPUT_SIDE: u32 = 640;
const STRIDES: [u32; 3] = [8, 16, 32];
/// A free input's sides are padded to a multiple of the largest stride.
const ALIGN: u32 = 32;

/// One face, in the pixel coordinates of the image it was detected in (or mapped to).
#[derive(Clone, Debug, PartialEq)]
pub struct Face {
    /// Top-left corner and size.
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    /// Right eye, left eye, nose tip, right and left mouth corner, as (x, y) pairs.
    pub landmarks: [f32; 10],
    pub score: f32,
}

impl Face {
    /// Scales by (`sx`, `sy`) and clamps inside a `width`×`height` image.
    pub fn mapped(&self, sx: f32, sy: f32, width: f32, height: f32) -> Face {
        let x0 = (self.x * sx).clamp(0.0, width);
        let y0 = (self.y * sy).clamp(0.0, height);
        let x1 = ((self.x + self.w) * sx).clamp(0.0, width);
        let y1 = ((self.y + self.h) * sy).clamp(0.0, height);
        let mut landmarks = self.landmarks;
        for pair in landmarks.chunks_exact_mut(2) {
            pair[0] = (pair[0] * sx).clamp(0.0, width);
            pair[1] = (pair[1] * sy).clamp(0.0, height);
        }
        Face { x: x0, y: y0, w: x1 - x0, h: y1 - y0, landmarks, score: self.score }
    }

    fn iou(&self, other: &Face) -> f32 {
        let x1 = self.x.max(other.x);
        let y1 = self.y.max(other.y);
        let x2 = (self.x + self.w).min(other.x + other.w);
        let y2 = (self.y + self.h).min(other.y + other.h);
        let inter = (x2 - x1).max(0.0) * (y2 - y1).max(0.0);
        let union = self.w * self.h + other.w * other.h - inter;
        if union > 0.0 { inter / union } else { 0.0 }
    }
}

/// The raw outputs of one stride: `cls` and `obj` [A], `bbox` [A·4], `kps` [A·10].
pub struct StrideOutput<'a> {
    pub stride: u32,
    pub cls: &'a [f32],
    pub obj: &'a [f32],
    pub bbox: &'a [f32],
    pub kps: &'a [f32],
}

/// Decodes the strides of an input `width` pixels wide into faces in letterbox pixels, thresholds,
/// and applies NMS.
pub fn decode(strides: &[StrideOutput<'_>], width: u32, score_threshold: f32, nms_iou: f32) -> Vec<Face> {
    let mut faces = Vec::new();
    for s in strides {
        let cols = (width / s.stride) as usize;
        let st = s.stride as f32;
        for (i, (&cls, &obj)) in s.cls.iter().zip(s.obj).enumerate() {
            let score = (cls.clamp(0.0, 1.0) * obj.clamp(0.0, 1.0)).sqrt();
            if score <= score_threshold {
                continue;
            }
            let (row, col) = ((i / cols) as f32, (i % cols) as f32);
            let b = &s.bbox[i * 4..i * 4 + 4];
            let (cx, cy) = ((col + b[0]) * st, (row + b[1]) * st);
            let (w, h) = (b[2].exp() * st, b[3].exp() * st);
            let mut landmarks = [0.0; 10];
            for (k, pair) in landmarks.chunks_exact_mut(2).enumerate() {
                pair[0] = (col + s.kps[i * 10 + 2 * k]) * st;
                pair[1] = (row + s.kps[i * 10 + 2 * k + 1]) * st;
            }
            faces.push(Face { x: cx - w / 2.0, y: cy - h / 2.0, w, h, landmarks, score });
        }
    }
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Face> = Vec::new();
    for face in faces {
        if keep.iter().all(|k| face.iou(k) <= nms_iou) {
            keep.push(face);
        }
    }
    keep
}

/// The face detector's owner-thread runner: frames in, faces in frame pixels out.
pub struct YunetRunner {
    session: Session,
    input: String,
    score_threshold: f32,
    nms_iou: f32,
    /// Tensor sides are rounded up to a multiple of this: [`ALIGN`] for a free input, the side itself
    /// for a fixed square.
    multiple: u32,
    /// The one input tensor, reused by every run.
    buffer: Vec<f32>,
}

impl YunetRunner {
    /// Wraps a loaded YuNet session: one with a free height and width (see
    /// [`heimdex_models::shapes`]), or the file's own 640×640.
    ///
    /// # Errors
    /// The model lacks an input or one of the twelve outputs, or its input is fixed at another size.
    pub fn new(session: Session, score_threshold: f32, nms_iou: f32) -> Result<Self, InferenceError> {
        let model = "yunet";
        let first =
            session.inputs().first().ok_or_else(|| InferenceError::Model { model: model.into(), message: "has no inputs".into() })?;
        let input = first.name().to_string();
        let side = i64::from(INPUT_SIDE);
        let multiple = match first.dtype().tensor_shape().map(|s| s.to_vec()).as_deref() {
            Some([_, _, h, w]) if *h < 0 && *w < 0 => ALIGN,
            Some([_, _, h, w]) if *h == side && *w == side => INPUT_SIDE,
            other => {
                return Err(InferenceError::Model {
                    model: model.into(),
                    message: format!("input has shape {other:?}; expected [1, 3, 640, 640] or a free height and width"),
                });
            }
        };
        let names: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
        for s in STRIDES {
            for kind in ["cls", "obj", "bbox", "kps"] {
                let name = format!("{kind}_{s}");
                if !names.contains(&name.as_str()) {
                    return Err(InferenceError::Model { model: model.into(), message: format!("has no output {name} ({names:?})") });
                }
            }
        }
        Ok(Self { session, input, score_threshold, nms_iou, multiple, buffer: Vec::new() })
    }

    fn detect(&mut self, frame: &Frame) -> Result<Vec<Face>, InferenceError> {
        let lb: Letterbox = letterbox_bgr(&frame.rgb, frame.width, frame.height, INPUT_SIDE, self.multiple, &mut self.buffer)
            .map_err(|e| InferenceError::Model { model: "yunet".into(), message: e.to_string() })?;
        let (tw, th) = (lb.tensor_width as usize, lb.tensor_height as usize);
        let tensor = TensorRef::from_array_view(([1, 3, th, tw], self.buffer.as_slice()))?;
        let outputs = self.session.run(ort::inputs![self.input.as_str() => tensor])?;
        let mut strides = Vec::with_capacity(3);
        for s in STRIDES {
            let get = |kind: &str| outputs[format!("{kind}_{s}").as_str()].try_extract_tensor::<f32>().map(|(_, d)| d);
            strides.push(StrideOutput { stride: s, cls: get("cls")?, obj: get("obj")?, bbox: get("bbox")?, kps: get("kps")? });
        }
        let inv = 1.0 / lb.scale;
        let (w, h) = (frame.width as f32, frame.height as f32);
        Ok(decode(&strides, lb.tensor_width, self.score_threshold, self.nms_iou).iter().map(|f| f.mapped(inv, inv, w, h)).collect())
    }
}

impl BatchRunner for YunetRunner {
    type Input = Arc<Frame>;
    type Output = Vec<Face>;

    fn run(&mut self, inputs: Vec<Arc<Frame>>) -> Result<Vec<Vec<Face>>, InferenceError> {
        inputs.iter().map(|frame| self.detect(frame)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, y: f32, w: f32, score: f32) -> Face {
        Face { x, y, w, h: w, landmarks: [0.0; 10], score }
    }

    #[test]
    fn decode_thresholds_and_suppresses_overlaps() {
        // Stride 32: 20x20 anchors. Two overlapping candidates at anchor 21 and 22, one weak one.
        let mut cls = vec![0.0; 400];
        let mut obj = vec![0.0; 400];
        let mut bbox = vec![0.0; 1600];
        let kps = vec![0.5; 4000];
        for (i, c) in [(21usize, 0.9f32), (22, 0.8), (300, 0.3)] {
            cls[i] = c;
            obj[i] = 1.0;
            bbox[i * 4 + 2] = 1.0f32.ln() + 1.5; // width exp(1.5)·32 ≈ 143 px: anchors 21 and 22 overlap
            bbox[i * 4 + 3] = 1.5;
        }
        let out = StrideOutput { stride: 32, cls: &cls, obj: &obj, bbox: &bbox, kps: &kps };
        let faces = decode(&[out], INPUT_SIDE, 0.6, 0.3);
        assert_eq!(faces.len(), 1);
        let f = &faces[0];
        assert!((f.score - 0.9f32.sqrt()).abs() < 1e-6);
        // Anchor 21 = row 1, col 1: centre (32, 32).
        assert!((f.x + f.w / 2.0 - 32.0).abs() < 1e-3 && (f.y + f.h / 2.0 - 32.0).abs() < 1e-3);
        assert!((f.landmarks[0] - 48.0).abs() < 1e-3);
    }

    #[test]
    fn mapping_scales_and_clamps() {
        let f = face(-10.0, 5.0, 50.0, 0.9).mapped(2.0, 2.0, 60.0, 1000.0);
        assert_eq!((f.x, f.y, f.w, f.h), (0.0, 10.0, 60.0, 100.0));
    }
}
