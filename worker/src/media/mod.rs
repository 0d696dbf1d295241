//! Media decoding with ffmpeg, streamed.

pub mod frames;
