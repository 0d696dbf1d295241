//! Scene cuts from frame differences.
//!
//! Each sampled frame is reduced to a grey thumbnail; when the mean absolute difference to the
//! previous frame's thumbnail exceeds `vision.scene_threshold` (0–1), a new scene starts at that frame.
//! This catches hard cuts at the sampling rate, which is what the index needs (a scene is a search
//! unit with a mean embedding), and costs nothing next to the models. Gradual fades below the
//! threshold stay inside one scene.
//!
//! The detector is fed frames in order and keeps only the previous thumbnail and each scene's running
//! embedding sum, so it is O(1) in the length of the video apart from its output.

use super::preprocess::mean_abs_diff;
use crate::engine::l2_normalise;

/// One scene: sampled frames `first_frame..first_frame + frame_count`.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub index: u32,
    pub start_s: f64,
    pub end_s: f64,
    pub first_frame: u32,
    pub frame_count: u32,
    /// The mean of its frames' embeddings, re-normalised to unit length.
    pub embedding: Vec<f32>,
}

/// Streams frames into scenes.
#[derive(Debug)]
pub struct SceneDetector {
    threshold: f32,
    /// Seconds one sampled frame stands for (1 / rate), used to close the last scene.
    frame_period: f64,
    previous: Option<Vec<f32>>,
    scenes: Vec<Scene>,
    sum: Vec<f32>,
}

impl SceneDetector {
    pub fn new(threshold: f32, frame_period: f64) -> Self {
        Self { threshold, frame_period, previous: None, scenes: Vec::new(), sum: Vec::new() }
    }

    /// Adds the next frame (in order) and returns the index of the scene it belongs to.
    pub fn push(&mut self, frame_index: u32, ts: f64, thumbnail: Vec<f32>, embedding: &[f32]) -> u32 {
        let cut = match &self.previous {
            None => true,
            Some(prev) => mean_abs_diff(prev, &thumbnail) > self.threshold,
        };
        if cut {
            self.close_current(ts);
            self.scenes.push(Scene {
                index: self.scenes.len() as u32,
                start_s: ts,
                end_s: ts,
                first_frame: frame_index,
                frame_count: 0,
                embedding: Vec::new(),
            });
            self.sum = vec![0.0; embedding.len()];
        }
        for (s, e) in self.sum.iter_mut().zip(embedding) {
            *s += e;
        }
        let scene = self.scenes.last_mut().expect("a scene was opened above");
        scene.frame_count += 1;
        scene.end_s = ts + self.frame_period;
        self.previous = Some(thumbnail);
        scene.index
    }

    fn close_current(&mut self, next_start: f64) {
        if let Some(scene) = self.scenes.last_mut() {
            scene.end_s = next_start;
            let mut mean = std::mem::take(&mut self.sum);
            l2_normalise(&mut mean);
            scene.embedding = mean;
        }
    }

    /// Closes the last scene (its end clamped to `duration` when known) and returns every scene.
    pub fn finish(mut self, duration: Option<f64>) -> Vec<Scene> {
        let end = self.scenes.last().map(|s| s.end_s);
        if let Some(end) = end {
            let end = duration.filter(|d| *d > 0.0).map_or(end, |d| end.min(d.max(self.scenes.last().map_or(0.0, |s| s.start_s))));
            self.close_current(end);
        }
        self.scenes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_where_the_picture_changes() {
        let mut d = SceneDetector::new(0.12, 1.0);
        let (dark, light) = (vec![0.1; 16], vec![0.9; 16]);
        let scenes: Vec<u32> = [&dark, &dark, &light, &light, &light, &dark]
            .iter()
            .enumerate()
            .map(|(i, t)| d.push(i as u32, i as f64, (*t).clone(), &[1.0, 0.0]))
            .collect();
        assert_eq!(scenes, vec![0, 0, 1, 1, 1, 2]);
        let out = d.finish(Some(5.5));
        assert_eq!(out.len(), 3);
        assert_eq!((out[1].start_s, out[1].end_s, out[1].frame_count), (2.0, 5.0, 3));
        assert_eq!(out[2].end_s, 5.5);
        assert_eq!(out[0].embedding, vec![1.0, 0.0]);
    }
}
