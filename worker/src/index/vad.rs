//! Silero VAD v6 behind an owner thread: speech probability per 32 ms frame (512 samples at 16 kHz,
//! with the previous frame's last 64 samples prepended as context, as the reference implementation does).
//!
//! Batching: the model is recurrent, so one stream's frames must run in order, each with the state the
//! previous frame returned. Batching is therefore *across streams*: a request carries a window of one
//! stream's frames plus that stream's state, and the owner thread runs every waiting stream's frame `t`
//! as one batch row, for t = 0, 1, ... (rows whose window is shorter drop out). Concurrent tasks share
//! batches; one stream costs one channel round trip per window (about 2 s of audio), not per frame.
//!
//! Digitally silent frames (peak below [`SILENCE_PEAK`]) are not run: they score 0 and reset the stream
//! to the model's start state, as if it began there. That makes hours of silence nearly free.

use ort::session::Session;
use ort::value::Tensor;

use crate::engine::{BatchRunner, InferenceError};

/// Samples per frame at 16 kHz.
pub const FRAME: usize = 512;
/// Context samples prepended to a frame.
pub const CONTEXT: usize = 64;
/// Recurrent state floats per stream ([2, 1, 128]).
pub const STATE: usize = 2 * 128;
/// Frames whose absolute peak is below this are silence without asking the model (−80 dBFS).
pub const SILENCE_PEAK: f32 = 1e-4;

/// One stream's recurrent state between windows.
#[derive(Clone, Debug)]
pub struct VadState {
    state: Vec<f32>,
    context: Vec<f32>,
}

impl Default for VadState {
    fn default() -> Self {
        Self { state: vec![0.0; STATE], context: vec![0.0; CONTEXT] }
    }
}

/// A window of one stream: whole frames (`samples.len()` is a multiple of [`FRAME`]) and its state.
#[derive(Debug)]
pub struct VadRequest {
    pub samples: Vec<f32>,
    pub state: VadState,
}

/// Speech probability of each frame of the window, and the state to send with the next window.
#[derive(Debug)]
pub struct VadResponse {
    pub probs: Vec<f32>,
    pub state: VadState,
    /// The window's samples, handed back so the caller can keep them without a copy.
    pub samples: Vec<f32>,
}

/// Owns the Silero session.
pub struct VadRunner {
    session: Session,
}

impl VadRunner {
    pub fn new(session: Session) -> Self {
        Self { session }
    }
}

impl BatchRunner for VadRunner {
    type Input = VadRequest;
    type Output = VadResponse;

    fn run(&mut self, inputs: Vec<VadRequest>) -> Result<Vec<VadResponse>, InferenceError> {
        let mut rows: Vec<VadResponse> = inputs
            .into_iter()
            .map(|r| VadResponse { probs: Vec::with_capacity(r.samples.len() / FRAME), state: r.state, samples: r.samples })
            .collect();
        let frames = rows.iter().map(|r| r.samples.len() / FRAME).max().unwrap_or(0);
        let sr = Tensor::from_array(((), vec![16_000i64]))?;
        for t in 0..frames {
            // Rows that have frame t and are not digitally silent run; silent ones reset.
            let mut active = Vec::with_capacity(rows.len());
            for (i, row) in rows.iter_mut().enumerate() {
                let Some(frame) = row.samples.get(t * FRAME..(t + 1) * FRAME) else { continue };
                if frame.iter().all(|s| s.abs() < SILENCE_PEAK) {
                    row.probs.push(0.0);
                    row.state = VadState::default();
                } else {
                    active.push(i);
                }
            }
            if active.is_empty() {
                continue;
            }
            let b = active.len();
            let mut input = Vec::with_capacity(b * (CONTEXT + FRAME));
            let mut state = vec![0f32; STATE * b];
            for (k, &i) in active.iter().enumerate() {
                let row = &rows[i];
                input.extend_from_slice(&row.state.context);
                input.extend_from_slice(&row.samples[t * FRAME..(t + 1) * FRAME]);
                // [2, B, 128]: layer l of row k lives at (l * B + k) * 128.
                for l in 0..2 {
                    state[(l * b + k) * 128..(l * b + k + 1) * 128].copy_from_slice(&row.state.state[l * 128..(l + 1) * 128]);
                }
            }
            let outputs = self.session.run(ort::inputs![
                "input" => Tensor::from_array(([b, CONTEXT + FRAME], input))?,
                "state" => Tensor::from_array(([2, b, 128], state))?,
                "sr" => sr.view(),
            ])?;
            let (_, probs) = outputs["output"].try_extract_tensor::<f32>()?;
            let (_, new_state) = outputs["stateN"].try_extract_tensor::<f32>()?;
            if probs.len() != b || new_state.len() != STATE * b {
                return Err(InferenceError::Model { model: super::SILERO_VAD.into(), message: "unexpected output shape".into() });
            }
            for (k, &i) in active.iter().enumerate() {
                let row = &mut rows[i];
                row.probs.push(probs[k]);
                for l in 0..2 {
                    row.state.state[l * 128..(l + 1) * 128].copy_from_slice(&new_state[(l * b + k) * 128..(l * b + k + 1) * 128]);
                }
                row.state.context.copy_from_slice(&row.samples[(t + 1) * FRAME - CONTEXT..(t + 1) * FRAME]);
            }
        }
        Ok(rows)
    }
}
